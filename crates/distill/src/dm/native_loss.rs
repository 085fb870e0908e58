//! DM's loss as one candle op on the CPU, with its gradient from the native embedding backward.
//!
//! [`EmbeddingTarget::loss`](super::EmbeddingTarget::loss) off the CPU records the synthetic
//! embeddings op by op and lets candle differentiate that graph. On the CPU the loss is a
//! [`CustomOp1`] of the synthetic images: its forward runs the native forward pass to the
//! embeddings and the distance; its backward gets `V = dD / dphi` from candle's autograd on the
//! small embedding matrix alone, then `dD / dx = cpu::embedding_input_gradient(V)`: one forward
//! pass keeping its caches and one backward pass to the images. Tests compare both in f64.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var};
use debiasdd_model::ConvNetConfig;
use debiasdd_model::backend::{Segments, cpu};

use crate::cpu_loss::{input_images, scalar_output};

use super::embedding_distance;

/// Everything the loss depends on besides the synthetic images. One op serves one application
/// (the target builds a fresh one per loss), so the embeddings its forward pass keeps belong to
/// the images its backward pass receives.
#[derive(Debug)]
pub(crate) struct NativeEmbeddingLoss {
    pub model: ConvNetConfig,
    pub params: Vec<Tensor>,
    pub real_means: Tensor,
    pub syn_segments: Segments,
    pub syn_index: Option<Tensor>,
    /// The synthetic embeddings of the forward pass, for the backward pass.
    pub embeddings: Mutex<Option<Tensor>>,
}

impl NativeEmbeddingLoss {
    /// The kept embeddings; a poisoned lock (a panic elsewhere) still holds valid ones.
    fn kept(&self) -> std::sync::MutexGuard<'_, Option<Tensor>> {
        self.embeddings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn distance(&self, embeddings: &Tensor) -> Result<Tensor> {
        embedding_distance(
            embeddings,
            &self.syn_segments,
            self.syn_index.as_ref(),
            &self.real_means,
        )
    }
}

impl CustomOp1 for NativeEmbeddingLoss {
    fn name(&self) -> &'static str {
        "debiasdd-native-embedding-loss"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let syn = input_images(storage, layout, "embedding loss")?;
        let embeddings = cpu::embeddings(&self.model, &self.params, &syn)?;
        let loss = self
            .distance(&embeddings)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        *self.kept() = Some(embeddings);
        Ok(scalar_output(storage, loss))
    }

    fn bwd(&self, syn: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let syn = syn.detach();
        // Taken, not copied: the op's one backward pass is their last use.
        let kept = self.kept().take();
        let embeddings = match kept {
            Some(e) => e,
            None => cpu::embeddings(&self.model, &self.params, &syn)?,
        };
        let embeddings = Var::from_tensor(&embeddings)?;
        let backward = self.distance(embeddings.as_tensor())?.backward()?;
        let directions = match backward.get(embeddings.as_tensor()) {
            Some(g) => g.clone(),
            None => embeddings.as_tensor().zeros_like()?,
        };
        let dx = cpu::embedding_input_gradient(&self.model, &self.params, &syn, &directions)?;
        Ok(Some(dx.broadcast_mul(&grad.to_dtype(dx.dtype())?)?))
    }
}
