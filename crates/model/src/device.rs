//! Turning `--device cpu|cuda[:N]|metal[:N]` into a candle `Device`, with an error that says
//! which feature to rebuild with. The only place that knows which backends were compiled in.

use candle_core::Device;

use crate::error::ModelError;

/// Parses a device name. `cuda` and `metal` take an optional ordinal (`cuda:1`).
pub fn parse_device(name: &str) -> Result<Device, ModelError> {
    let err = |reason: &str| ModelError::Device {
        spec: name.to_owned(),
        reason: reason.to_owned(),
    };
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, n)) => {
            let ordinal = n
                .parse::<usize>()
                .map_err(|_| err("the device number must be an integer"))?;
            (kind, ordinal)
        }
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if candle_core::utils::cuda_is_available() => {
            Device::new_cuda(ordinal).map_err(|e| err(&format!("cannot open it: {e}")))
        }
        "cuda" => Err(err(
            "this build has no CUDA support: rebuild with `--features cuda` (see README)",
        )),
        "metal" if candle_core::utils::metal_is_available() => {
            Device::new_metal(ordinal).map_err(|e| err(&format!("cannot open it: {e}")))
        }
        "metal" => Err(err(
            "this build has no Metal support: rebuild with `--features metal` on macOS",
        )),
        _ => Err(err("unknown device: use cpu, cuda[:N] or metal[:N]")),
    }
}

/// Lets CUDA's f32 matrix products (and so candle's convolutions, which run as im2col + matmul)
/// use TF32 tensor cores: inputs rounded to a 10-bit mantissa, accumulation in f32. Faster on
/// Ampere and later (a paper-size DC iteration 1.3-1.4x on an H100, where a short distillation's
/// losses moved by under 1e-4 relative). Process-wide (candle keeps it in a global), off unless
/// asked for, and without effect on the CPU and Metal backends.
pub fn set_tf32(enabled: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(enabled);
}

/// The devices of `ranks` ranks of one run from one `--device` name: every rank on the CPU for
/// `cpu`; for `cuda` / `cuda:K`, one GPU each from K on (K, K + 1, ...). Metal has one device
/// per machine, so it takes one rank.
pub fn parse_rank_devices(name: &str, ranks: usize) -> Result<Vec<Device>, ModelError> {
    let err = |reason: String| ModelError::Device {
        spec: name.to_owned(),
        reason,
    };
    if ranks == 0 {
        return Err(err("a run needs at least 1 rank (--ranks 1)".into()));
    }
    if ranks == 1 {
        return Ok(vec![parse_device(name)?]);
    }
    let (kind, first) = match name.split_once(':') {
        Some((kind, n)) => (
            kind,
            n.parse::<usize>()
                .map_err(|_| err("the device number must be an integer".into()))?,
        ),
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(vec![Device::Cpu; ranks]),
        "cuda" => (first..first + ranks)
            .map(|i| parse_device(&format!("cuda:{i}")))
            .collect(),
        "metal" => Err(err(format!(
            "{ranks} ranks on Metal: a machine has one Metal device; use --ranks 1"
        ))),
        _ => parse_device(name).map(|_| Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_others_explain_themselves() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("cpu, cuda"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("integer"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }

    #[test]
    fn ranks_get_one_device_each() {
        let cpus = parse_rank_devices("cpu", 3).unwrap();
        assert_eq!(cpus.len(), 3);
        assert!(cpus.iter().all(|d| matches!(d, Device::Cpu)));
        assert_eq!(parse_rank_devices("cpu", 1).unwrap().len(), 1);
        let err = parse_rank_devices("cpu", 0).unwrap_err().to_string();
        assert!(err.contains("at least 1 rank"), "{err}");
        let err = parse_rank_devices("metal", 2).unwrap_err().to_string();
        assert!(err.contains("--ranks 1"), "{err}");
        let err = parse_rank_devices("gpu", 2).unwrap_err().to_string();
        assert!(err.contains("unknown device"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_rank_devices("cuda:1", 2).unwrap_err().to_string();
            assert!(
                err.contains("cuda:1") && err.contains("--features cuda"),
                "{err}"
            );
        }
    }
}
