//! The CUDA kernels of `src/backend/cuda/kernels.cu` on a machine without a GPU: `cuda_emulation.cpp`
//! includes them as C++ and runs each launch with one host thread per GPU thread (a barrier for
//! `__syncthreads`), checking im2col against plain loops, col2im by the adjoint identity, and the
//! fused instance-norm block forward against a direct computation and its backward against finite
//! differences. Needs a C++20 compiler (`CXX`, default `g++`); says so and skips without one.
//! On a GPU, `xtask/gpu/check.sh` compares whole CUDA runs with the CPU.

// The skip notice goes to stderr, as in the other tests that skip.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_agree_with_references_under_host_emulation() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("cuda_emulation");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emulation.cpp");
    let compiled = match Command::new(&cxx)
        .args(["-std=c++20", "-O1", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "SKIPPED: no C++ compiler `{cxx}` ({e}); set CXX to a C++20 compiler to check the CUDA kernels here"
            );
            return;
        }
    };
    assert!(
        compiled.status.success(),
        "`{cxx}` could not build the CUDA kernels' emulation:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the emulated CUDA kernels disagree:\n{report}"
    );
    assert!(report.contains("all ok"), "{report}");
    // Every check ran: 3 paddings x (im2col, col2im), 4 norm settings x (fwd, f32, bwd).
    assert_eq!(report.lines().count(), 6 + 12 + 1, "{report}");
}
