//! DM's loss as one candle op on the CPU, with its gradient from the native embedding backward.
//!
//! [`EmbeddingTarget::loss`](super::EmbeddingTarget::loss) off the CPU records the synthetic
//! embeddings op by op and lets candle differentiate that graph. On the CPU the loss is a
//! [`CustomOp1`] of the synthetic images: its forward runs the native forward pass to the
//! embeddings and the distance; its backward gets `V = dD / dphi` from candle's autograd on the
//! small embedding matrix alone, then `dD / dx = cpu::embedding_input_gradient(V)`: one forward
//! pass keeping its caches and one backward pass to the images. Tests compare both in f64.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use debiasdd_model::ConvNetConfig;
use debiasdd_model::backend::{Segments, cpu};

use super::embedding_distance;

/// Everything the loss depends on besides the synthetic images.
#[derive(Debug)]
pub(crate) struct NativeEmbeddingLoss {
    pub model: ConvNetConfig,
    pub params: Vec<Tensor>,
    pub real_means: Tensor,
    pub syn_segments: Segments,
    pub syn_index: Option<Tensor>,
}

impl NativeEmbeddingLoss {
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
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("embedding loss: the synthetic images must be contiguous")
        };
        let syn = match storage {
            CpuStorage::F32(d) => Tensor::from_slice(&d[start..end], layout.shape(), &Device::Cpu)?,
            CpuStorage::F64(d) => Tensor::from_slice(&d[start..end], layout.shape(), &Device::Cpu)?,
            _ => candle_core::bail!("embedding loss: only f32 and f64 are supported"),
        };
        let embeddings = cpu::embeddings(&self.model, &self.params, &syn)?;
        let loss = self
            .distance(&embeddings)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let out = match storage {
            CpuStorage::F32(_) => CpuStorage::F32(vec![loss as f32]),
            _ => CpuStorage::F64(vec![loss]),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(&self, syn: &Tensor, _loss: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let syn = syn.detach();
        let embeddings = Var::from_tensor(&cpu::embeddings(&self.model, &self.params, &syn)?)?;
        let backward = self.distance(embeddings.as_tensor())?.backward()?;
        let directions = match backward.get(embeddings.as_tensor()) {
            Some(g) => g.clone(),
            None => embeddings.as_tensor().zeros_like()?,
        };
        let dx = cpu::embedding_input_gradient(&self.model, &self.params, &syn, &directions)?;
        Ok(Some(dx.broadcast_mul(&grad.to_dtype(dx.dtype())?)?))
    }
}
