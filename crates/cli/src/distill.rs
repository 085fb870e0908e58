//! `debiasdd distill`: learns a synthetic set from a dataset's train split with a method (DC
//! gradient matching or DM distribution matching) over strata (class-wise, group-wise,
//! class-vs-groups or class-vs-group-mean), with checkpoints,
//! resume, grids and a progress bar. The loop and its driver are `debiasdd_distill`'s; this
//! module wires options, files and Ctrl-C to them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::DType;
use clap::Args;
use debiasdd_distill::{
    CollectiveKind, Distance, DistillConfig, Distiller, Init, MatchMode, MethodKind, Overrides,
    Preset, RunFiles, RunOutcome, drive,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Dataset file from `debiasdd generate` or `debiasdd import` (its train split is distilled).
    #[arg(long)]
    data: PathBuf,
    /// What is matched: dc (gradients of a network trained on the way) or dm (mean embeddings
    /// of fresh random networks).
    #[arg(long, default_value = "dc")]
    method: MethodKind,
    /// class (vanilla), group (debiased, one term per (class, colour)), class-vs-groups (FairDD:
    /// the class against each of its groups) or class-vs-group-mean (COBRA: the class against
    /// the unweighted mean of its groups).
    #[arg(long, default_value = "group")]
    mode: MatchMode,
    /// quick: minutes on a 2-core CPU at width 32 (DC: real batch 64 per class or 16 per group,
    /// loops 5/10, 20 iterations; DM: real init, 256 per class or 64 per group, 1000
    /// iterations);
    /// paper: the method's protocol (width 128, real batch 256; DC: loops from the ipc table,
    /// 1000 iterations; DM: 20000 iterations).
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
    /// class) [DC noise, DM real].
    #[arg(long)]
    init: Option<Init>,
    /// Iterations [preset].
    #[arg(long)]
    iterations: Option<usize>,
    /// ConvNet width [preset].
    #[arg(long)]
    width: Option<usize>,
    /// ConvNet depth [3].
    #[arg(long)]
    depth: Option<usize>,
    /// Real images per class or group, per step [preset].
    #[arg(long)]
    batch_real: Option<usize>,
    /// DC: synthetic updates per iteration [preset].
    #[arg(long)]
    outer_loop: Option<usize>,
    /// DC: network epochs on the synthetic set between updates [preset].
    #[arg(long)]
    inner_loop: Option<usize>,
    /// Learning rate of the synthetic images [DC 0.1, DM 1.0].
    #[arg(long)]
    lr_img: Option<f64>,
    /// DC: learning rate of the inner-loop network training [0.01].
    #[arg(long)]
    lr_net: Option<f64>,
    /// DC: gradient distance: ours (DC's layer-wise cosine), mse or cos.
    #[arg(long)]
    distance: Option<Distance>,
    /// Differentiable Siamese augmentation of every matching term (the official parameters,
    /// no flip) [DC off, DM on]; with DC it also augments the inner-loop training.
    #[arg(long, conflicts_with = "no_dsa")]
    dsa: bool,
    /// No differentiable Siamese augmentation.
    #[arg(long)]
    no_dsa: bool,
    /// Write one JSON line per iteration (iteration, loss, seconds) to this file; on --resume
    /// it keeps the lines up to the checkpoint's iteration.
    #[arg(long)]
    history: Option<PathBuf>,
    /// cpu, cuda[:N] or metal (the latter two need a build with --features cuda / metal).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Split every step's matching terms over this many ranks (threads of this process), their
    /// gradients summed: with --device cuda[:K] one GPU each (K, K + 1, ...); on the CPU they
    /// share the cores (same images within rounding, for checking; not faster).
    #[arg(long, default_value_t = 1)]
    ranks: usize,
    /// How the ranks sum their gradients: auto (NCCL when every rank has its own GPU and the
    /// build has --features nccl, otherwise host), host (through host memory, in f64, any
    /// devices) or nccl (between the GPUs, one per rank).
    #[arg(long, default_value = "auto")]
    collective: CollectiveKind,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl DistillArgs {
    fn config(&self) -> anyhow::Result<DistillConfig> {
        let overrides = Overrides {
            iterations: self.iterations,
            batch_real: self.batch_real,
            lr_img: self.lr_img,
            init: self.init,
            width: self.width,
            depth: self.depth,
            seed: Some(self.seed),
            dsa: (self.dsa || self.no_dsa).then_some(self.dsa),
            outer_loop: self.outer_loop,
            inner_loop: self.inner_loop,
            lr_net: self.lr_net,
            distance: self.distance,
        };
        Ok(
            DistillConfig::preset(self.method, self.preset, self.mode, self.ipc)
                .with_overrides(&overrides)?,
        )
    }
}

/// The checkpoint path: explicit, or next to the output.
fn checkpoint_path(args: &DistillArgs) -> PathBuf {
    args.checkpoint
        .clone()
        .unwrap_or_else(|| args.out.with_extension("ckpt.safetensors"))
}

/// Runs the distillation; `Interrupted` when Ctrl-C stopped it (its checkpoint written).
pub fn run(args: DistillArgs) -> anyhow::Result<RunOutcome> {
    let config = args.config()?;
    config.validate()?;
    if args.grid_every == 0 || args.checkpoint_every == 0 {
        anyhow::bail!("--grid-every and --checkpoint-every must be at least 1");
    }
    let devices = debiasdd_model::device::parse_rank_devices(&args.device, args.ranks)?;
    let collective = args.collective.resolve(&devices)?;
    let data = debiasdd_data::file::load(&args.data)?;
    // Every rank's distiller, built alike (and resumed alike).
    let build = |rank: usize| -> Result<Distiller, debiasdd_distill::DistillError> {
        let mut d = Distiller::new(config.clone(), &data.train, &devices[rank], DType::F32)?;
        if let Some(resume) = &args.resume {
            d.load_checkpoint(resume)?;
        }
        Ok(d)
    };
    let mut distiller = build(0)?;
    if let Some(resume) = &args.resume {
        println!(
            "resumed {} at iteration {}/{}",
            resume.display(),
            distiller.iteration(),
            config.settings.iterations
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

    let s = &config.settings;
    println!(
        "distill: method {}, mode {}, preset {}, ipc {} ({} images), {} matching terms per step, width {}, real batch {}, {}, {} iterations, init {}, {}",
        config.method.kind(),
        s.mode,
        args.preset,
        s.ipc,
        config.n_synthetic(),
        distiller.n_terms(),
        s.model.width,
        s.batch_real,
        config.method.describe(),
        s.iterations,
        s.init,
        match &s.dsa {
            Some(dsa) => format!("DSA {}", dsa.describe()),
            None => "no DSA".to_owned(),
        },
    );
    if args.ranks > 1 {
        println!(
            "ranks: {} (threads of this process on {}, summing {}); terms per rank (share of the estimated cost): {}",
            args.ranks,
            args.device,
            match collective {
                CollectiveKind::Nccl => "with NCCL",
                _ => "through host memory",
            },
            debiasdd_distill::ranks::shard::describe(distiller.plan(), s.batch_real, args.ranks)
                .iter()
                .map(|(terms, share)| format!("{terms} ({:.0} %)", 100.0 * share))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if s.mode != MatchMode::Class && !distiller.empty_groups().is_empty() {
        println!(
            "{} groups have no real training images and are skipped (their synthetic images stay as initialised): {:?}",
            distiller.empty_groups().len(),
            distiller.empty_groups()
        );
    }

    let bar = ProgressBar::new(s.iterations as u64);
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
    let files = RunFiles {
        checkpoint: Some(&ckpt),
        checkpoint_every: args.checkpoint_every,
        history: args.history.as_deref(),
    };
    let mut on_iteration = |distiller: &Distiller, stats: &debiasdd_distill::IterationStats| {
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
        let i = stats.iteration;
        if let Some(dir) = &args.grid {
            if i % args.grid_every == 0 || i == 1 {
                write_grid(distiller, &dir.join(format!("iter-{i:05}.png")))?;
            }
        }
        Ok(())
    };
    let (outcome, distiller) = if args.ranks == 1 {
        let outcome = drive(&mut distiller, files, &stop, &mut on_iteration)?;
        (outcome, distiller)
    } else {
        drop(distiller);
        debiasdd_distill::drive_ranks(&devices, collective, build, files, &stop, &mut on_iteration)?
    };
    if outcome == RunOutcome::Interrupted {
        bar.abandon();
        println!(
            "interrupted after iteration {}; checkpoint {}; continue with the same command plus --resume {}",
            distiller.iteration(),
            ckpt.display(),
            ckpt.display()
        );
        return Ok(outcome);
    }
    bar.finish();
    let set = distiller.synthetic_set()?;
    set.save(&args.out)?;
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
    Ok(outcome)
}

fn write_grid<M: debiasdd_distill::Matcher>(
    distiller: &Distiller<M>,
    path: &Path,
) -> Result<(), debiasdd_distill::DistillError> {
    debiasdd_distill::grid::save(&distiller.synthetic_set()?, path)
}
