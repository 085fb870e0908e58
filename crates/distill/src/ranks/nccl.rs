//! Ranks on several GPUs of one process, summing through NCCL (the `nccl` feature): cudarc's
//! NCCL bindings, on the stream of each rank's candle device, so the sum is ordered with the
//! rank's own kernels and never leaves the GPUs.
//!
//! Only CUDA tensors (the gradient with respect to the synthetic images, a few MB) go through
//! NCCL. Host tensors (the step's loss and real-image count, the stop flag) go through the
//! group's [`ThreadRank`], whose rendezvous also carries failures: a rank that fails aborts it,
//! and the others return [`DistillError::RankFailed`] at their next host collective. The engine
//! sums the host values of a step before its gradient, so a rank that fails while computing its
//! terms stops the others before any of them enqueues that step's NCCL call (which would wait for
//! the failed rank forever); a failure inside NCCL itself is reported by NCCL to every rank.
//!
//! `ncclCommInitRank` blocks until every rank has called it, so ranks first meet on the host
//! (a rank whose distiller could not be built aborts there instead of leaving the others in
//! NCCL), then create their communicators together.
//!
//! Still on paper: ranks in several processes or on several machines. NCCL supports them with the
//! same calls; what is missing is handing the [`Id`] from rank 0 to the others (a file on a
//! shared disk or a TCP rendezvous) and a host collective between processes for the loss and the
//! stop flag.
#![allow(unsafe_code)]

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::Collective;
use super::threads::ThreadRank;
use crate::error::DistillError;

/// What every rank of one NCCL group needs to join it: the group's NCCL id, made once.
#[derive(Debug)]
pub(crate) struct Bootstrap {
    id: Id,
}

impl Bootstrap {
    pub(crate) fn new() -> Result<Self, DistillError> {
        let id = Id::new().map_err(|e| DistillError::Nccl {
            rank: 0,
            problem: format!("ncclGetUniqueId failed ({e:?})"),
        })?;
        Ok(Self { id })
    }

    /// This rank's end of the group, on `device` (a CUDA device, one per rank): meets the other
    /// ranks on the host first, then creates the NCCL communicator with them.
    pub(crate) fn join(
        &self,
        host: Arc<ThreadRank>,
        device: &Device,
    ) -> Result<NcclRank, DistillError> {
        let rank = host.rank();
        let Device::Cuda(cuda) = device else {
            return Err(DistillError::Nccl {
                rank,
                problem: format!(
                    "NCCL sums CUDA tensors, but this rank is on {:?}",
                    device.location()
                ),
            });
        };
        // Every rank has built its distiller: none is left waiting in ncclCommInitRank.
        host.all_reduce_sum(&Tensor::new(&[1f64], &Device::Cpu)?)?;
        let comm =
            Comm::from_rank(cuda.cuda_stream(), rank, host.size(), self.id).map_err(|e| {
                DistillError::Nccl {
                    rank,
                    problem: format!("ncclCommInitRank failed ({e:?})"),
                }
            })?;
        Ok(NcclRank {
            host,
            comm: Mutex::new(SendComm(comm)),
        })
    }
}

/// One rank of an NCCL group.
#[derive(Debug)]
pub(crate) struct NcclRank {
    host: Arc<ThreadRank>,
    comm: Mutex<SendComm>,
}

/// A communicator that may move to the rank's thread.
#[derive(Debug)]
struct SendComm(Comm);

// SAFETY: `Comm` is not `Send` only because it holds NCCL's raw `ncclComm_t` handle (its stream
// is an `Arc<CudaStream>`, which cudarc makes `Send + Sync`). NCCL allows a communicator to be
// used from any thread as long as calls on it do not overlap; the `Mutex` in `NcclRank`
// serialises every use, and the handle is destroyed once, by `Comm`'s `Drop`.
unsafe impl Send for SendComm {}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn size(&self) -> usize {
        self.host.size()
    }

    fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor, DistillError> {
        if !tensor.device().is_cuda() {
            return self.host.all_reduce_sum(tensor);
        }
        if let Some(failed) = self.host.aborted() {
            return Err(failed);
        }
        let comm = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        let sum = tensor
            .contiguous()?
            .apply_op1_no_bwd(&AllReduceSum { comm: &comm.0 })
            .map_err(|e| DistillError::Nccl {
                rank: self.rank(),
                problem: e.to_string(),
            })?;
        Ok(sum)
    }

    fn abort(&self, why: &str) {
        self.host.abort(why);
    }
}

/// `ncclAllReduce` with `ncclSum` as a candle op: a new tensor of the sum, written on the
/// communicator's stream (the device's own).
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "the NCCL all-reduce takes CUDA tensors; host tensors go to the host group"
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        fn go<T>(
            comm: &Comm,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<CudaStorage>
        where
            T: CudaDType + DeviceRepr + ValidAsZeroBits + NcclType,
        {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("the NCCL all-reduce needs a contiguous tensor");
            };
            let src = storage.as_cuda_slice::<T>()?.slice(start..end);
            let device = storage.device();
            let mut dst = device.alloc_zeros::<T>(end - start)?;
            comm.all_reduce(&src, &mut dst, &ReduceOp::Sum)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce failed ({e:?})")))?;
            Ok(CudaStorage::wrap_cuda_slice(dst, device.clone()))
        }
        let out = match storage.dtype() {
            DType::F32 => go::<f32>(self.comm, storage, layout)?,
            DType::F64 => go::<f64>(self.comm, storage, layout)?,
            dtype => candle_core::bail!("the NCCL all-reduce sums f32 and f64, got {dtype:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}
