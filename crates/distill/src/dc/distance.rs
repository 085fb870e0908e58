//! Distances between synthetic and real gradients, as in the DC code (`match_loss`).
//!
//! Gradients arrive as one tensor per parameter with a leading "pair" dimension P (one row per
//! matching term), so a whole outer step's terms are scored in a few batched ops.

use std::fmt;
use std::str::FromStr;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// The denominator guard of the cosine terms (DC's 0.000001).
pub const COSINE_EPS: f64 = 1e-6;

/// A gradient distance D(g_syn, g_real).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distance {
    /// DC's layer-wise distance ("ours"): for every parameter of rank >= 2, reshaped to
    /// (out, rest), the sum over output units of 1 - cos(g_syn[o], g_real[o]); rank-1 parameters
    /// (biases, norm affine) contribute 0.
    Ours,
    /// Sum of squared differences over all parameters.
    Mse,
    /// 1 - cos over all parameters flattened into one vector.
    Cos,
}

impl Distance {
    pub const ALL: [Distance; 3] = [Distance::Ours, Distance::Mse, Distance::Cos];

    pub fn name(self) -> &'static str {
        match self {
            Distance::Ours => "ours",
            Distance::Mse => "mse",
            Distance::Cos => "cos",
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Distance {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Distance::ALL
            .into_iter()
            .find(|d| d.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown distance `{s}`; expected one of: ours, mse, cos"))
    }
}

/// Sum over the P pairs of D(syn[p], real[p]). `syn` and `real` hold one tensor per parameter,
/// each of shape (P, *parameter shape); `syn` may carry a graph.
pub fn distance(kind: Distance, syn: &[Tensor], real: &[Tensor]) -> Result<Tensor> {
    if syn.len() != real.len() || syn.is_empty() {
        candle_core::bail!(
            "distance: {} synthetic against {} real gradient tensors",
            syn.len(),
            real.len()
        )
    }
    let pairs = syn[0].dim(0)?;
    match kind {
        Distance::Ours => {
            let mut total: Option<Tensor> = None;
            for (s, r) in syn.iter().zip(real) {
                if s.rank() < 3 {
                    continue; // (P, n): a 1-D parameter
                }
                let out = s.dim(1)?;
                let s = s.reshape((pairs, out, ()))?;
                let r = r.reshape((pairs, out, ()))?;
                let dot = (&s * &r)?.sum(2)?;
                let norms = (s.sqr()?.sum(2)?.sqrt()? * r.sqr()?.sum(2)?.sqrt()?)?;
                let term = (1.0 - (dot / (norms + COSINE_EPS)?)?)?.sum_all()?;
                total = Some(match total {
                    Some(t) => (t + term)?,
                    None => term,
                });
            }
            match total {
                Some(t) => Ok(t),
                None => Tensor::zeros((), syn[0].dtype(), syn[0].device()),
            }
        }
        Distance::Mse => {
            let mut total = Tensor::zeros((), syn[0].dtype(), syn[0].device())?;
            for (s, r) in syn.iter().zip(real) {
                total = (total + (s - r)?.sqr()?.sum_all()?)?;
            }
            Ok(total)
        }
        Distance::Cos => {
            let mut dot: Option<Tensor> = None;
            let mut ss: Option<Tensor> = None;
            let mut rr: Option<Tensor> = None;
            let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
                Ok(Some(match acc {
                    Some(a) => (a + t)?,
                    None => t,
                }))
            };
            for (s, r) in syn.iter().zip(real) {
                let s = s.reshape((pairs, ()))?;
                let r = r.reshape((pairs, ()))?;
                dot = add(dot, (&s * &r)?.sum(1)?)?;
                ss = add(ss, s.sqr()?.sum(1)?)?;
                rr = add(rr, r.sqr()?.sum(1)?)?;
            }
            let (dot, ss, rr) = (dot.unwrap(), ss.unwrap(), rr.unwrap());
            let norms = (ss.sqrt()? * rr.sqrt()?)?;
            (1.0 - (dot / (norms + COSINE_EPS)?)?)?.sum_all()
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn hand_computed_cases() -> Result<()> {
        let dev = Device::Cpu;
        // One pair; a (2, 2) weight and a bias.
        let sw = Tensor::new(&[[[1f64, 0.], [0., 2.]]], &dev)?;
        let rw = Tensor::new(&[[[1f64, 0.], [3., 0.]]], &dev)?;
        let sb = Tensor::new(&[[1f64, 1.]], &dev)?;
        let rb = Tensor::new(&[[1f64, -1.]], &dev)?;
        let syn = [sw, sb];
        let real = [rw, rb];
        // ours: row 0 parallel (1 - 1/(1+eps)), row 1 orthogonal (1 - 0); the bias is skipped.
        let ours = distance(Distance::Ours, &syn, &real)?.to_scalar::<f64>()?;
        let expected = (1.0 - 1.0 / (1.0 + COSINE_EPS)) + 1.0;
        assert!((ours - expected).abs() < 1e-12, "{ours} vs {expected}");
        // mse: (0 + 0 + 9 + 4) + (0 + 4).
        let mse = distance(Distance::Mse, &syn, &real)?.to_scalar::<f64>()?;
        assert!((mse - 17.0).abs() < 1e-12, "{mse}");
        // cos over [1 0 0 2 1 1] and [1 0 3 0 1 -1]: dot 1, norms sqrt(7) sqrt(12).
        let cos = distance(Distance::Cos, &syn, &real)?.to_scalar::<f64>()?;
        let expected = 1.0 - 1.0 / (7f64.sqrt() * 12f64.sqrt() + COSINE_EPS);
        assert!((cos - expected).abs() < 1e-12, "{cos} vs {expected}");
        Ok(())
    }

    #[test]
    fn pairs_add_up() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[[1f64, 2.]], [[0., 1.]]], &dev)?;
        let b = Tensor::new(&[[[2f64, 1.]], [[1., 1.]]], &dev)?;
        for kind in Distance::ALL {
            let both = distance(kind, std::slice::from_ref(&a), std::slice::from_ref(&b))?
                .to_scalar::<f64>()?;
            let first =
                distance(kind, &[a.narrow(0, 0, 1)?], &[b.narrow(0, 0, 1)?])?.to_scalar::<f64>()?;
            let second =
                distance(kind, &[a.narrow(0, 1, 1)?], &[b.narrow(0, 1, 1)?])?.to_scalar::<f64>()?;
            assert!((both - first - second).abs() < 1e-12, "{kind}");
        }
        Ok(())
    }

    #[test]
    fn parses_names() {
        assert_eq!("OURS".parse::<Distance>(), Ok(Distance::Ours));
        assert!(
            "l2".parse::<Distance>()
                .unwrap_err()
                .contains("ours, mse, cos")
        );
    }
}
