//! The networks of debiasdd (work in progress).
