//! `debiasdd distill`: learns a synthetic set from a Colored MNIST train split by gradient
//! matching (class-wise, group-wise or class-vs-groups), with checkpoints, resume, grids and a
//! progress bar. The loop itself is `debiasdd_distill::Distiller`; this module wires options,
//! files and Ctrl-C to it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use debiasdd_distill::{Distance, DistillConfig, Distiller, Init, MatchMode, Preset};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Colored MNIST file (its train split is distilled).
    #[arg(long)]
    data: PathBuf,
    /// class (vanilla DC), group (debiased, one term per (class, colour)) or class-vs-groups
    /// (FairDD).
    #[arg(long, default_value = "group")]
    mode: MatchMode,
    /// quick: width 32, real batch 64 per class or 16 per group, loops 5/10, 20 iterations
    /// (minutes on a 2-core CPU);
    /// paper: the protocol (width 128, real batch 256, loops from the ipc table, 1000 iterations).
    #[arg(long, default_value = "quick")]
    preset: Preset,
    /// Synthetic images per class.
    #[arg(long, default_value_t = 10)]
    ipc: usize,
    /// Where to write the synthetic set.
    #[arg(long)]
    out: PathBuf,
    /// Write a PNG grid of the synthetic images into this folder every --grid-every iterations
    /// (and at the end): rows = classes, columns = that class's images.
    #[arg(long)]
    grid: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    grid_every: usize,
    /// Checkpoint file [default: OUT with extension .ckpt.safetensors], written every
    /// --checkpoint-every iterations, at the end, and on Ctrl-C.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Continue from a checkpoint of a run with the same settings (--iterations may grow).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// noise (N(0,1) in normalised space) or real (random real images of the image's group or
    /// class).
    #[arg(long)]
    init: Option<Init>,
    /// Iterations (fresh networks) [preset].
    #[arg(long)]
    iterations: Option<usize>,
    /// ConvNet width [preset].
    #[arg(long)]
    width: Option<usize>,
    /// ConvNet depth [3].
    #[arg(long)]
    depth: Option<usize>,
    /// Real images per class or group, per outer step [preset].
    #[arg(long)]
    batch_real: Option<usize>,
    /// Synthetic updates per iteration [preset].
    #[arg(long)]
    outer_loop: Option<usize>,
    /// Network epochs on the synthetic set between updates [preset].
    #[arg(long)]
    inner_loop: Option<usize>,
    /// Learning rate of the synthetic images [0.1].
    #[arg(long)]
    lr_img: Option<f64>,
    /// Learning rate of the inner-loop network training [0.01].
    #[arg(long)]
    lr_net: Option<f64>,
    /// Gradient distance: ours (DC's layer-wise cosine), mse or cos.
    #[arg(long)]
    distance: Option<Distance>,
    /// Append one JSON line per iteration (iteration, loss, seconds) to this file.
    #[arg(long)]
    history: Option<PathBuf>,
    /// cpu, cuda[:N] or metal (the latter two need a build with --features cuda / metal).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl DistillArgs {
    fn config(&self) -> DistillConfig {
        let mut c = DistillConfig::preset(self.preset, self.mode, self.ipc);
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field { c.$field = v; })* };
        }
        set!(
            iterations, batch_real, outer_loop, inner_loop, lr_img, lr_net, distance, init
        );
        if let Some(w) = self.width {
            c.model.width = w;
        }
        if let Some(d) = self.depth {
            c.model.depth = d;
        }
        c.seed = self.seed;
        c
    }
}

/// The checkpoint path: explicit, or next to the output.
fn checkpoint_path(args: &DistillArgs) -> PathBuf {
    args.checkpoint
        .clone()
        .unwrap_or_else(|| args.out.with_extension("ckpt.safetensors"))
}

pub fn run(args: DistillArgs) -> anyhow::Result<()> {
    let config = args.config();
    config.validate()?;
    if args.grid_every == 0 || args.checkpoint_every == 0 {
        anyhow::bail!("--grid-every and --checkpoint-every must be at least 1");
    }
    let device = debiasdd_model::device::parse_device(&args.device)?;
    let data = debiasdd_cmnist::io::load(&args.data)?;
    let mut distiller = Distiller::new(config.clone(), &data.train, &device, DType::F32)?;
    if let Some(resume) = &args.resume {
        distiller.load_checkpoint(resume)?;
        println!(
            "resumed {} at iteration {}/{}",
            resume.display(),
            distiller.iteration(),
            config.iterations
        );
    }
    let ckpt = checkpoint_path(&args);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing this iteration, then writing a checkpoint");
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    println!(
        "distill: mode {}, preset {}, ipc {} ({} images), {} matching terms per outer step, width {}, real batch {}, loops {}/{}, {} iterations, init {}, distance {}",
        config.mode,
        args.preset,
        config.ipc,
        config.n_synthetic(),
        distiller.n_terms(),
        config.model.width,
        config.batch_real,
        config.outer_loop,
        config.inner_loop,
        config.iterations,
        config.init,
        config.distance
    );
    if config.mode != MatchMode::Class && !distiller.empty_groups().is_empty() {
        println!(
            "{} groups have no real training images and are skipped (their synthetic images stay as initialised): {:?}",
            distiller.empty_groups().len(),
            distiller.empty_groups()
        );
    }

    let mut history = match &args.history {
        Some(path) => Some({
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?
        }),
        None => None,
    };
    let bar = ProgressBar::new(config.iterations as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} iterations  {msg}  (ETA {eta})",
        )
        .expect("valid template"),
    );
    bar.set_position(distiller.iteration() as u64);
    bar.reset_eta();
    bar.enable_steady_tick(Duration::from_millis(250));
    let started = Instant::now();
    while !distiller.is_done() {
        if stop.load(Ordering::SeqCst) {
            distiller.save_checkpoint(&ckpt)?;
            bar.abandon();
            println!(
                "interrupted after iteration {}; checkpoint {}; continue with the same command plus --resume {}",
                distiller.iteration(),
                ckpt.display(),
                ckpt.display()
            );
            return Ok(());
        }
        let stats = distiller.step()?;
        bar.set_position(stats.iteration as u64);
        bar.set_message(format!(
            "loss {:.4}  {:.1} s/it  {:.0} real img/s",
            stats.loss,
            stats.seconds,
            stats.real_images as f64 / stats.seconds
        ));
        tracing::info!(
            iteration = stats.iteration,
            loss = stats.loss,
            seconds = stats.seconds,
            real_seconds = stats.real_seconds,
            synthetic_seconds = stats.synthetic_seconds,
            inner_seconds = stats.inner_seconds
        );
        if let Some(file) = history.as_mut() {
            writeln!(file, "{}", serde_json::to_string(&stats)?)?;
        }
        let i = stats.iteration;
        if let Some(dir) = &args.grid {
            if i % args.grid_every == 0 || i == 1 {
                write_grid(&distiller, &dir.join(format!("iter-{i:05}.png")))?;
            }
        }
        if i % args.checkpoint_every == 0 {
            distiller.save_checkpoint(&ckpt)?;
        }
    }
    bar.finish();
    let set = distiller.synthetic_set()?;
    set.save(&args.out)?;
    distiller.save_checkpoint(&ckpt)?;
    if let Some(dir) = &args.grid {
        write_grid(&distiller, &dir.join("final.png"))?;
        println!("grids: {}", dir.display());
    }
    println!(
        "synthetic set: {} ({} images) after {:.1} s; checkpoint {}",
        args.out.display(),
        set.set.len(),
        started.elapsed().as_secs_f64(),
        ckpt.display()
    );
    Ok(())
}

fn write_grid(distiller: &Distiller, path: &Path) -> anyhow::Result<()> {
    debiasdd_distill::grid::save(&distiller.synthetic_set()?, path)?;
    Ok(())
}
