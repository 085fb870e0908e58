//! With the `cuda` feature, compiles `src/backend/cuda/kernels.cu` to PTX with `nvcc` (the `NVCC`
//! variable, else `nvcc` on the PATH) for compute capability `CUDA_COMPUTE_CAP` (default 75; the
//! driver compiles PTX for newer cards when it loads it). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/backend/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "75".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/backend/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| {
            panic!("the `cuda` feature needs nvcc to build src/backend/cuda/kernels.cu; running `{nvcc}` failed: {e} (set NVCC or put nvcc on the PATH)")
        });
    assert!(
        status.success(),
        "nvcc failed on src/backend/cuda/kernels.cu ({status})"
    );
}
