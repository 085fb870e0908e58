//! `cargo xtask bench`, the PyTorch side: the virtual environment under `target/torch-venv`
//! (made, and given the pinned torch with pip, on first use), the import probe, and running
//! the reference script.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::BenchArgs;
use super::report::{TorchReport, last_line, parse_torch_report};

/// The pinned PyTorch and the pure-Python packages it imports (its other dependencies are the
/// CUDA runtime wheels, which a CPU run may not need).
const TORCH_REQUIREMENT: &str = "torch==2.15.0";
const TORCH_PURE_DEPS: &[&str] = &[
    "filelock",
    "typing-extensions",
    "sympy",
    "networkx",
    "jinja2",
    "fsspec",
    "mpmath",
    "markupsafe",
];
/// Imports torch and multiplies on the CPU; prints the version.
const TORCH_PROBE: &str = "import warnings; warnings.filterwarnings('ignore'); import torch; \
    assert float(torch.ones(2) @ torch.ones(2)) == 2.0; print(torch.__version__)";

const TORCH_SCRIPT: &str = "xtask/bench/torch_reference.py";
const VENV_DIR: &str = "target/torch-venv";

/// Makes `target/torch-venv` if needed and installs torch there unless it already imports.
/// Returns the environment's Python. First tries `pip install --no-deps` of torch and its
/// pure-Python dependencies (no CUDA wheels); when torch does not import that way (the Linux
/// x86-64 wheel on PyPI is a CUDA build that links the CUDA runtime), installs it normally.
pub(super) fn ensure_torch(python: &str, root: &Path) -> Result<PathBuf> {
    let venv = root.join(VENV_DIR);
    let venv_python = venv.join("bin/python");
    if !venv_python.exists() {
        println!("== making {}", venv.display());
        run_quiet(Command::new(python).args(["-m", "venv"]).arg(&venv))
            .with_context(|| format!("`{python} -m venv` failed"))?;
    }
    if let Ok(version) = torch_probe(&venv_python) {
        println!("== PyTorch {version} already in {}", venv.display());
        return Ok(venv_python);
    }

    println!(
        "== installing {TORCH_REQUIREMENT} (--no-deps) into {}",
        venv.display()
    );
    pip_install(&venv_python, &["--no-deps", TORCH_REQUIREMENT])?;
    pip_install(&venv_python, TORCH_PURE_DEPS)?;
    match torch_probe(&venv_python) {
        Ok(version) => {
            println!("== PyTorch {version} imports without its CUDA dependencies");
            return Ok(venv_python);
        }
        Err(e) => println!(
            "== torch does not import without its dependencies ({}); installing them (CUDA \
             runtime wheels, several GB)",
            last_line(&format!("{e:#}"))
        ),
    }
    pip_install(&venv_python, &[TORCH_REQUIREMENT])?;
    let version = torch_probe(&venv_python).context("torch still does not import")?;
    println!("== PyTorch {version} installed");
    Ok(venv_python)
}

fn pip_install(venv_python: &Path, packages: &[&str]) -> Result<()> {
    let status = Command::new(venv_python)
        .args(["-m", "pip", "install", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .context("cannot run pip")?;
    if !status.success() {
        bail!(
            "`pip install {}` failed ({status}; is PyPI reachable?)",
            packages.join(" ")
        );
    }
    Ok(())
}

/// Imports torch with `venv_python` and multiplies two vectors; returns `torch.__version__`.
fn torch_probe(venv_python: &Path) -> Result<String> {
    let output = Command::new(venv_python)
        .args(["-c", TORCH_PROBE])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", venv_python.display()))?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Runs `cmd`, hiding its output unless it fails.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let output = cmd.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        bail!(
            "{} ({})",
            last_line(&String::from_utf8_lossy(&output.stderr)),
            output.status
        );
    }
    Ok(())
}

pub(super) fn run_torch_script(
    python: &Path,
    args: &BenchArgs,
    root: &Path,
) -> Result<TorchReport> {
    let runs = args.torch_runs.unwrap_or(if args.quick { 3 } else { 10 });
    let warmup = if args.quick { 1 } else { 3 };
    println!("== PyTorch reference ({TORCH_SCRIPT}, median of {runs} after {warmup} warm-up)");
    let mut cmd = Command::new(python);
    cmd.current_dir(root)
        .arg(TORCH_SCRIPT)
        .args(["--runs", &runs.to_string(), "--warmup", &warmup.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(filter) = &args.filter {
        cmd.args(["--filter", filter]);
    }
    let output = cmd.output().context("cannot run the PyTorch script")?;
    if !output.status.success() {
        bail!("{TORCH_SCRIPT} exited with {}", output.status);
    }
    parse_torch_report(&String::from_utf8_lossy(&output.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_note_pins_the_same_torch() {
        let note = include_str!("../../bench/requirements.txt");
        assert!(note.lines().any(|l| l.trim() == TORCH_REQUIREMENT));
    }
}
