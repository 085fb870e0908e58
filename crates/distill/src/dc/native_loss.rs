//! The matching loss as one candle op on the CPU, with its gradient from the native kernels.
//!
//! [`MatchingTarget::loss`](super::MatchingTarget::loss) on other devices records the synthetic
//! gradients op by op (`candle_ops::segment_gradients`) and lets candle differentiate that
//! graph. On the CPU (where the run's route says `native_second_order`) the same loss is a
//! [`CustomOp1`] of the synthetic images: its forward computes the synthetic gradients with
//! `debiasdd_model::backend::cpu` and the distance; its backward gets `V = dD / dg_syn` from
//! candle's autograd on the small gradient tensors alone, then
//! `dD / dx = cpu::gradient_of_gradients(V)` (forward-over-reverse). No graph over activations
//! is built, and tests compare both routes in f64. The forward keeps the synthetic gradients for
//! the backward, so each op runs the first-order pass once.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};
use debiasdd_model::ConvNetConfig;
use debiasdd_model::backend::{Segments, cpu};

use crate::cpu_loss::{input_images, scalar_output};

use super::distance::{Distance, distance};

/// Everything the loss depends on besides the synthetic images. One op serves one application
/// (the engine builds a fresh one per loss), so the gradients its forward pass keeps belong to
/// the images its backward pass receives.
#[derive(Debug)]
pub(crate) struct NativeMatchingLoss {
    pub model: ConvNetConfig,
    pub distance: Distance,
    pub params: Vec<Tensor>,
    pub g_real: Vec<Tensor>,
    pub syn_labels: Tensor,
    pub syn_segments: Segments,
    pub syn_index: Option<Tensor>,
    /// The synthetic gradients of the forward pass, for the backward pass.
    pub syn_grads: Mutex<Option<Vec<Tensor>>>,
}

impl NativeMatchingLoss {
    /// The synthetic gradients of every term (rows picked by `syn_index`).
    fn term_gradients(&self, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        match &self.syn_index {
            None => Ok(grads.to_vec()),
            Some(index) => grads.iter().map(|g| g.index_select(index, 0)).collect(),
        }
    }

    /// The kept synthetic gradients; a poisoned lock (a panic elsewhere) still holds valid ones.
    fn cached(&self) -> std::sync::MutexGuard<'_, Option<Vec<Tensor>>> {
        self.syn_grads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn syn_gradients(&self, syn: &Tensor) -> Result<Vec<Tensor>> {
        Ok(cpu::segment_gradients(
            &self.model,
            &self.params,
            syn,
            &self.syn_labels,
            &self.syn_segments,
        )?
        .grads)
    }
}

impl CustomOp1 for NativeMatchingLoss {
    fn name(&self) -> &'static str {
        "debiasdd-native-matching-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let syn = input_images(storage, layout, "matching loss")?;
        let grads = self.syn_gradients(&syn)?;
        let loss = distance(self.distance, &self.term_gradients(&grads)?, &self.g_real)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        *self.cached() = Some(grads);
        Ok(scalar_output(storage, loss))
    }

    fn bwd(&self, syn: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let syn = syn.detach();
        // Taken, not copied: the op's one backward pass is their last use.
        let kept = self.cached().take();
        let grads = match kept {
            Some(grads) => grads,
            None => self.syn_gradients(&syn)?,
        };
        let vars = grads
            .iter()
            .map(Var::from_tensor)
            .collect::<Result<Vec<_>>>()?;
        let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = distance(self.distance, &self.term_gradients(&tensors)?, &self.g_real)?;
        let backward = loss.backward()?;
        let directions = vars
            .iter()
            .map(|v| match backward.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(), // a parameter the distance skips
            })
            .collect::<Result<Vec<_>>>()?;
        let dx = cpu::gradient_of_gradients(
            &self.model,
            &self.params,
            &syn,
            &self.syn_labels,
            &self.syn_segments,
            &directions,
        )?;
        Ok(Some(dx.broadcast_mul(&grad.to_dtype(dx.dtype())?)?))
    }
}
