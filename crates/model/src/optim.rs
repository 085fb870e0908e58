//! Stochastic gradient descent with PyTorch's semantics (momentum, weight decay, Nesterov),
//! which candle-nn's `SGD` lacks. Used to train networks and to update synthetic images.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// SGD hyper-parameters. The default is plain SGD at lr 0.01 (DC's `lr_net` during
/// distillation); DC's evaluation uses momentum 0.9 and weight decay 5e-4.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl SgdConfig {
    /// Checks that the values are finite and non-negative, and that Nesterov has momentum.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (name, value) in [
            ("lr", self.lr),
            ("momentum", self.momentum),
            ("weight_decay", self.weight_decay),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ModelError::InvalidOptimizer(format!(
                    "{name} must be finite and >= 0, got {value}"
                )));
            }
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(ModelError::InvalidOptimizer(
                "nesterov needs momentum > 0".to_owned(),
            ));
        }
        Ok(())
    }
}

/// SGD over a fixed list of variables, as `torch.optim.SGD` (dampening 0). For each variable
/// with a gradient `grad`:
///
/// ```text
/// g   = grad + weight_decay * p
/// buf = g                       on the variable's first step
/// buf = momentum * buf + g      afterwards
/// g   = g + momentum * buf      if nesterov, else g = buf
/// p   = p - lr * g
/// ```
///
/// Variables without a gradient in the store are skipped (their momentum is left untouched).
#[derive(Debug)]
pub struct Sgd {
    vars: Vec<Var>,
    buffers: Vec<Option<Tensor>>,
    config: SgdConfig,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self, ModelError> {
        config.validate()?;
        let buffers = vec![None; vars.len()];
        Ok(Self {
            vars,
            buffers,
            config,
        })
    }

    /// One update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        let per_var: Vec<Option<Tensor>> =
            self.vars.iter().map(|v| grads.get(v).cloned()).collect();
        self.update(per_var)
    }

    /// One update with gradients given in [`Sgd::vars`] order (for example from
    /// [`crate::backend::Route::batch_gradients`]).
    pub fn step_tensors(&mut self, grads: &[Tensor]) -> candle_core::Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "sgd: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )
        }
        self.update(grads.iter().cloned().map(Some).collect())
    }

    fn update(&mut self, grads: Vec<Option<Tensor>>) -> candle_core::Result<()> {
        let SgdConfig {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } = self.config;
        for ((var, buffer), grad) in self.vars.iter().zip(self.buffers.iter_mut()).zip(grads) {
            let Some(grad) = grad else {
                continue;
            };
            let param = var.as_detached_tensor();
            let mut g = grad.detach();
            if weight_decay != 0.0 {
                g = (g + (&param * weight_decay)?)?;
            }
            if momentum != 0.0 {
                let buf = match buffer.take() {
                    None => g.clone(),
                    Some(buf) => ((buf * momentum)? + &g)?,
                };
                g = if nesterov {
                    (g + (&buf * momentum)?)?
                } else {
                    buf.clone()
                };
                *buffer = Some(buf);
            }
            var.set(&(param - (g * lr)?)?)?;
        }
        Ok(())
    }

    /// `loss.backward()` then [`Sgd::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    pub fn lr(&self) -> f64 {
        self.config.lr
    }

    /// Changes the learning rate for the following steps (momentum buffers are kept).
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Forgets the momentum buffers, as a freshly built optimiser.
    pub fn reset(&mut self) {
        self.buffers.iter_mut().for_each(|b| *b = None);
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
        Sgd::new(vars, config).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Sgd::step(self, grads)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}
