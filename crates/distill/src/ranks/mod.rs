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
//!
//! [`CollectiveKind`] picks how the ranks sum, in this one place: through host memory (any
//! devices), or with NCCL between GPUs (`nccl` feature, `nccl.rs`), which `auto` takes when
//! every rank has its own GPU and the build has NCCL.

#[cfg(feature = "nccl")]
mod nccl;
pub mod shard;
mod threads;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, DeviceLocation, Tensor};

use crate::config::name_traits;
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

/// How the ranks of one process sum their gradients (`--collective`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveKind {
    /// NCCL when every rank has its own GPU and this build has the `nccl` feature, otherwise
    /// through host memory.
    #[default]
    Auto,
    /// Through host memory, in f64 and rank order ([`ThreadGroup`]): any devices, the same
    /// bytes whatever the device.
    Host,
    /// NCCL between the GPUs (the `nccl` feature): one CUDA device per rank; the sum stays on
    /// the GPUs, in the tensors' dtype.
    Nccl,
}

impl CollectiveKind {
    pub const ALL: [Self; 3] = [Self::Auto, Self::Host, Self::Nccl];

    /// Whether this build can sum with NCCL.
    pub const NCCL_BUILT: bool = cfg!(feature = "nccl");

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Host => "host",
            Self::Nccl => "nccl",
        }
    }

    /// The collective that ranks on `devices` (one per rank) use: `Host` or `Nccl`, never
    /// `Auto`. Fails when `Nccl` is asked for and cannot be had, saying why.
    pub fn resolve(self, devices: &[Device]) -> Result<Self, DistillError> {
        let gpus: Vec<Option<usize>> = devices
            .iter()
            .map(|d| match d.location() {
                DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
                _ => None,
            })
            .collect();
        let problem = if !Self::NCCL_BUILT {
            Some(
                "this build has no NCCL: rebuild with `--features nccl` (xtask/gpu/nccl-toolchain.sh)"
                    .to_owned(),
            )
        } else if devices.len() < 2 {
            Some("one rank has nobody to sum with (--ranks 2 or more)".to_owned())
        } else if let Some(r) = gpus.iter().position(Option::is_none) {
            Some(format!(
                "NCCL sums between GPUs, but rank {r} is on {:?}; give --device cuda",
                devices[r].location()
            ))
        } else {
            (1..gpus.len()).find_map(|j| {
                (0..j).find(|&i| gpus[i] == gpus[j]).map(|i| {
                    format!(
                        "NCCL needs one GPU per rank, but ranks {i} and {j} are both on cuda:{}",
                        gpus[j].unwrap_or_default()
                    )
                })
            })
        };
        match (self, problem) {
            (Self::Host, _) => Ok(Self::Host),
            (Self::Auto, None) | (Self::Nccl, None) => Ok(Self::Nccl),
            (Self::Auto, Some(_)) => Ok(Self::Host),
            (Self::Nccl, Some(problem)) => Err(DistillError::InvalidConfig {
                field: "collective",
                problem: format!("nccl: {problem}; or pass --collective host"),
            }),
        }
    }
}

name_traits!(CollectiveKind, "auto, host, nccl");

/// What a rank joins after its distiller is built.
enum Connector {
    Host,
    #[cfg(feature = "nccl")]
    Nccl(nccl::Bootstrap),
}

impl Connector {
    fn new(kind: CollectiveKind) -> Result<Self, DistillError> {
        match kind {
            #[cfg(feature = "nccl")]
            CollectiveKind::Nccl => Ok(Self::Nccl(nccl::Bootstrap::new()?)),
            _ => Ok(Self::Host),
        }
    }

    #[cfg_attr(not(feature = "nccl"), allow(unused_variables))]
    fn connect(
        &self,
        host: &Arc<ThreadRank>,
        device: &Device,
    ) -> Result<Arc<dyn Collective>, DistillError> {
        match self {
            Self::Host => Ok(Arc::clone(host) as Arc<dyn Collective>),
            #[cfg(feature = "nccl")]
            Self::Nccl(bootstrap) => Ok(Arc::new(bootstrap.join(Arc::clone(host), device)?)),
        }
    }
}

/// Runs a distillation over one in-process rank per device of `devices` until done or stopped,
/// summing with `collective` ([`CollectiveKind::resolve`]): `build(rank)` makes each rank's
/// distiller (on `devices[rank]`, already resumed where the run resumes; every rank must be built
/// alike), rank 0 runs on this thread with `files` and `on_iteration`, the others on scoped
/// threads without files. Returns rank 0's outcome and distiller (whose synthetic set every rank
/// holds). The first error of any rank is returned; the ranks it stopped do not hide it.
pub fn drive_ranks<M, F>(
    devices: &[Device],
    collective: CollectiveKind,
    build: F,
    files: RunFiles<'_>,
    stop: &AtomicBool,
    on_iteration: &mut OnIteration<'_, M>,
) -> Result<(RunOutcome, Distiller<M>), DistillError>
where
    M: Matcher,
    F: Fn(usize) -> Result<Distiller<M>, DistillError> + Sync,
{
    if devices.is_empty() {
        return Err(DistillError::InvalidConfig {
            field: "ranks",
            problem: "must be at least 1".into(),
        });
    }
    let connector = Connector::new(collective.resolve(devices)?)?;
    let mut group = ThreadGroup::new(devices.len()).into_iter();
    let first = group.next().expect("at least one rank");
    let run_rank = |host: ThreadRank,
                    files: RunFiles<'_>,
                    on_iteration: &mut OnIteration<'_, M>|
     -> Result<(RunOutcome, Distiller<M>), DistillError> {
        let host = Arc::new(host);
        let rank = host.rank();
        let body = std::panic::AssertUnwindSafe(|| {
            let distiller = build(rank)?;
            let collective = connector.connect(&host, &devices[rank])?;
            let mut distiller = distiller.with_collective(collective)?;
            drive(&mut distiller, files, stop, on_iteration).map(|o| (o, distiller))
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
            host.abort(&e.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collective_is_chosen_in_one_place_and_refusals_say_why() {
        let cpus = vec![Device::Cpu; 2];
        assert_eq!(
            CollectiveKind::Auto.resolve(&cpus).unwrap(),
            CollectiveKind::Host
        );
        assert_eq!(
            CollectiveKind::Host.resolve(&cpus).unwrap(),
            CollectiveKind::Host
        );
        let err = CollectiveKind::Nccl.resolve(&cpus).unwrap_err().to_string();
        let why = if CollectiveKind::NCCL_BUILT {
            "rank 0 is on Cpu"
        } else {
            "rebuild with `--features nccl`"
        };
        assert!(
            err.contains(why) && err.contains("--collective host"),
            "{err}"
        );
        for kind in CollectiveKind::ALL {
            assert_eq!(kind.name().parse::<CollectiveKind>().unwrap(), kind);
        }
        let err = "mpi".parse::<CollectiveKind>().unwrap_err();
        assert!(
            err.contains("`mpi`") && err.contains("auto, host, nccl"),
            "{err}"
        );
    }
}
