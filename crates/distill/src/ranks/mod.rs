//! One distillation over several ranks (GPUs, or threads for tests): the matching terms of a
//! step split over the ranks by cost; each rank computes its terms' contribution to the loss
//! gradient with respect to the synthetic images, and an all-reduce sums them.
//!
//! Every rank holds the whole state: the train split, the synthetic images and their momentum,
//! the method (DC's network, trained between steps on the whole synthetic set) and the same
//! random streams. Only [`Matcher::target`](crate::Matcher::target) and the loss are split: a
//! rank draws the step's real batch as one rank would (the generator advances over every
//! stratum) but gathers only its strata's images, builds its target from the plan of its own
//! synthetic segments ([`MatchingPlan::part`](crate::MatchingPlan::part)), and differentiates
//! the loss of its terms with respect to the whole synthetic set (zero outside its rows).
//! [`Collective::all_reduce_sum`] then sums the gradients and the loss values, so every rank
//! takes the same SGD step. A synthetic row belongs to one rank, whose gradient the others add
//! zeros to, so the rank count changes nothing but the rounding of the passes that now see
//! fewer strata at once.
//!
//! The split ([`shard::assign`]) balances an estimate of each synthetic segment's cost (its
//! real images plus [`shard::SYNTHETIC_WEIGHT`] times its synthetic images) by
//! longest-processing-time first, deterministically. DC's inner loop (training the network on
//! the small synthetic set) and DM's nothing-between-steps run on every rank, replicated.
//!
//! [`ThreadGroup`] is the in-process implementation: ranks as threads of one process, each with
//! its own device (every CPU rank shares the cores; `cuda:0`, `cuda:1`, ... one GPU each), the
//! sum staged through host memory in f64, in rank order, so every rank gets the same bytes.
//! [`drive_ranks`] runs a distillation that way: rank 0 on the calling thread with the run's
//! files and callback, the others on scoped threads. A rank that fails aborts the group, so
//! the others return instead of waiting for it.

pub mod shard;
mod threads;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::Tensor;

use crate::driver::{OnIteration, RunFiles, RunOutcome, drive};
use crate::engine::Distiller;
use crate::error::DistillError;
use crate::matcher::Matcher;

pub use threads::{ThreadGroup, ThreadRank};

/// The operations the ranks of one distillation share.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank's index, `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// The sum over all ranks of `tensor` (the same shape and dtype on every rank), on
    /// `tensor`'s device and in its dtype; every rank gets the same values. Blocks until every
    /// rank has called it; fails when a rank aborted.
    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor, DistillError>;

    /// Tells the other ranks that this one failed (`why`): their waiting and later collectives
    /// fail with [`DistillError::RankFailed`] instead of waiting for it.
    fn abort(&self, why: &str);
}

/// Runs a distillation over `ranks` in-process ranks ([`ThreadGroup`]) until done or stopped:
/// `build(rank)` makes each rank's distiller (on its own device, already resumed where the run
/// resumes; every rank must be built alike), rank 0 runs on this thread with `files` and
/// `on_iteration`, the others on scoped threads without files. Returns rank 0's outcome and
/// distiller (whose synthetic set every rank holds). The first error of any rank is returned;
/// the ranks it stopped do not hide it.
pub fn drive_ranks<M, F>(
    ranks: usize,
    build: F,
    files: RunFiles<'_>,
    stop: &AtomicBool,
    on_iteration: &mut OnIteration<'_, M>,
) -> Result<(RunOutcome, Distiller<M>), DistillError>
where
    M: Matcher,
    F: Fn(usize) -> Result<Distiller<M>, DistillError> + Sync,
{
    if ranks == 0 {
        return Err(DistillError::InvalidConfig {
            field: "ranks",
            problem: "must be at least 1".into(),
        });
    }
    let mut group = ThreadGroup::new(ranks).into_iter();
    let first = group.next().expect("at least one rank");
    let run_rank = |collective: ThreadRank,
                    files: RunFiles<'_>,
                    on_iteration: &mut OnIteration<'_, M>|
     -> Result<(RunOutcome, Distiller<M>), DistillError> {
        let collective: Arc<dyn Collective> = Arc::new(collective);
        let rank = collective.rank();
        let body = std::panic::AssertUnwindSafe(|| {
            build(rank)
                .and_then(|d| d.with_collective(Arc::clone(&collective)))
                .and_then(|mut d| drive(&mut d, files, stop, on_iteration).map(|o| (o, d)))
        });
        let result = std::panic::catch_unwind(body).unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            Err(DistillError::RankPanicked { rank, message })
        });
        if let Err(e) = &result {
            collective.abort(&e.to_string());
        }
        result
    };
    let no_files = RunFiles {
        checkpoint: None,
        history: None,
        ..files
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = group
            .map(|collective| {
                let run_rank = &run_rank;
                scope.spawn(move || {
                    run_rank(collective, no_files, &mut |_, _| Ok(())).map(|(outcome, _)| outcome)
                })
            })
            .collect();
        let mine = run_rank(first, files, on_iteration);
        let theirs: Vec<Result<RunOutcome, DistillError>> = others
            .into_iter()
            .map(|h| h.join().expect("a rank's panic is caught in its thread"))
            .collect();
        // The error that caused the others: one that is not a rank reporting another's failure.
        let mut errors: Vec<DistillError> = Vec::new();
        let mut outcome = None;
        match mine {
            Ok(pair) => outcome = Some(pair),
            Err(e) => errors.push(e),
        }
        errors.extend(theirs.into_iter().filter_map(Result::err));
        if let Some(i) = errors
            .iter()
            .position(|e| !matches!(e, DistillError::RankFailed { .. }))
        {
            return Err(errors.swap_remove(i));
        }
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        Ok(outcome.expect("rank 0 succeeded"))
    })
}
