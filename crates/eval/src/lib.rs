//! Evaluation of training sets (work in progress).
