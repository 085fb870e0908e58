//! Ranks as threads of one process: the in-process [`Collective`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor};

use super::Collective;
use crate::error::DistillError;

/// A group of in-process ranks sharing one rendezvous.
#[derive(Debug)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// The `size` ranks of a new group, rank 0 first; hand one to each thread.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(size: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(State {
                generation: 0,
                arrived: 0,
                slots: vec![None; size],
                result: None,
                aborted: None,
            }),
            wake: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                shared: Arc::clone(&shared),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
#[derive(Debug)]
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    size: usize,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug)]
struct State {
    /// Collectives completed so far.
    generation: u64,
    /// Ranks that have handed in their tensor for the current one.
    arrived: usize,
    /// Each rank's tensor of the current collective (host, f64).
    slots: Vec<Option<Tensor>>,
    /// The sum of the last completed collective.
    result: Option<Tensor>,
    /// The first rank that aborted, and why.
    aborted: Option<(usize, String)>,
}

impl Shared {
    /// The state; a rank that panicked while holding the lock left it consistent (every update
    /// under the lock is a single assignment or completes before unlocking).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn failed((rank, problem): &(usize, String)) -> DistillError {
    DistillError::RankFailed {
        rank: *rank,
        problem: problem.clone(),
    }
}

impl ThreadRank {
    /// The failure of the rank that aborted the group, if one did.
    #[cfg(feature = "nccl")]
    pub(crate) fn aborted(&self) -> Option<DistillError> {
        self.shared.lock().aborted.as_ref().map(failed)
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor, DistillError> {
        let (device, dtype) = (tensor.device().clone(), tensor.dtype());
        let host = tensor.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let mut state = self.shared.lock();
        if let Some(abort) = &state.aborted {
            return Err(failed(abort));
        }
        let generation = state.generation;
        state.slots[self.rank] = Some(host);
        state.arrived += 1;
        if state.arrived == self.shared.size {
            // The last to arrive sums in rank order, so the bytes do not depend on who that is.
            let slots: Vec<Tensor> = state
                .slots
                .iter_mut()
                .map(|s| s.take())
                .collect::<Option<_>>()
                .ok_or_else(|| candle_core::Error::Msg("a rank's slot is empty".into()))?;
            let mut sum = slots[0].clone();
            for other in &slots[1..] {
                if other.dims() != sum.dims() {
                    let problem = format!(
                        "all_reduce_sum of tensors of shapes {:?} and {:?}: every rank must hand in the same shape",
                        sum.dims(),
                        other.dims()
                    );
                    state.aborted = Some((self.rank, problem));
                    self.shared.wake.notify_all();
                    return Err(failed(state.aborted.as_ref().expect("just set")));
                }
                sum = (sum + other)?;
            }
            state.result = Some(sum);
            state.arrived = 0;
            state.generation += 1;
            self.shared.wake.notify_all();
        } else {
            // A completed collective counts even if a rank aborted after it.
            while state.generation == generation {
                if let Some(abort) = &state.aborted {
                    return Err(failed(abort));
                }
                state = self
                    .shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        // No rank can complete the next collective before this one has read this result: the
        // next one needs this rank too.
        let sum = state.result.clone().expect("a completed collective");
        drop(state);
        Ok(sum.to_dtype(dtype)?.to_device(&device)?)
    }

    fn abort(&self, why: &str) {
        let mut state = self.shared.lock();
        if state.aborted.is_none() {
            state.aborted = Some((self.rank, why.to_owned()));
        }
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_sum_in_rank_order() {
        let ranks = ThreadGroup::new(3);
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut out = Vec::new();
                        // Several collectives in a row, with different values each time.
                        for round in 0..5 {
                            let v = (r.rank() * 10 + round) as f32;
                            let t = Tensor::new(&[v, 1.0], &Device::Cpu).unwrap();
                            let sum = r.all_reduce_sum(&t).unwrap();
                            assert_eq!(sum.dtype(), DType::F32);
                            out.extend(sum.to_vec1::<f32>().unwrap());
                        }
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for sum in &sums {
            assert_eq!(sum, &sums[0]);
        }
        // Round k: (0 + k) + (10 + k) + (20 + k), and 3 ones.
        let expected: Vec<f32> = (0..5).flat_map(|k| [(30 + 3 * k) as f32, 3.0]).collect();
        assert_eq!(sums[0], expected);
    }

    #[test]
    fn an_aborted_rank_releases_the_others() {
        let ranks = ThreadGroup::new(3);
        let results: Vec<Result<Tensor, DistillError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        if r.rank() == 2 {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            r.abort("out of memory");
                            return Err(DistillError::InvalidConfig {
                                field: "test",
                                problem: "rank 2 failed".into(),
                            });
                        }
                        r.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for result in &results[..2] {
            let err = result.as_ref().unwrap_err().to_string();
            assert!(
                err.contains("rank 2") && err.contains("out of memory"),
                "{err}"
            );
        }
        // Later collectives fail at once too.
        let err = ranks[0]
            .all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
            .unwrap_err();
        assert!(
            matches!(err, DistillError::RankFailed { rank: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn shapes_that_differ_between_ranks_are_an_error_not_a_wrong_sum() {
        let ranks = ThreadGroup::new(2);
        let results: Vec<Result<Tensor, DistillError>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let t = Tensor::zeros(r.rank() + 1, DType::F32, &Device::Cpu).unwrap();
                        r.all_reduce_sum(&t)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for result in results {
            let err = result.unwrap_err().to_string();
            assert!(err.contains("same shape"), "{err}");
        }
    }
}
