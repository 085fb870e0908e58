//! A method written outside the crate runs through the unchanged loop, checkpoints and driver:
//! "mean matching" pulls each term's mean synthetic image towards the mean of its real batch.
//! It implements `Matcher` and `Target` and nothing else; the test distils with it, stops it,
//! resumes it bit-identically, and has its checkpoint refused by DC.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use debiasdd_distill::{
    DistillConfig, DistillError, Distiller, MatchMode, Matcher, MethodKind, Preset, Problem,
    RealBatch, RunFiles, RunOutcome, Target, drive,
};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

mod common;
use common::{tiny_split, values};

/// The method: its own setting, and a per-iteration random weight drawn from the loop's stream
/// (to show that its draws are replayed on resume).
#[derive(Debug)]
struct MeanMatch {
    steps: usize,
    weight: f64,
}

/// Per term: || mean(synthetic segment) - mean(real stratum) ||^2, weighted.
struct MeanTarget {
    /// (terms, C*H*W) real means, and the synthetic segment of every term.
    real_means: Tensor,
    syn_ranges: Vec<(usize, usize)>,
    weight: f64,
}

impl Target for MeanTarget {
    fn loss(&self, synthetic: &Tensor) -> Result<Tensor, DistillError> {
        let flat = synthetic.flatten_from(1)?;
        let means = self
            .syn_ranges
            .iter()
            .map(|&(start, len)| flat.narrow(0, start, len)?.mean(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let syn_means = Tensor::stack(&means, 0)?;
        Ok(((syn_means - &self.real_means)?.sqr()?.sum_all()? * self.weight)?)
    }
}

impl Matcher for MeanMatch {
    fn name(&self) -> &'static str {
        "mean-match"
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::json!({ "steps": self.steps })
    }

    fn steps(&self) -> usize {
        self.steps
    }

    fn begin_iteration(
        &mut self,
        _problem: &Problem<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        self.weight = rng.random_range(0.5..1.5);
        Ok(())
    }

    fn target(
        &mut self,
        problem: &Problem<'_>,
        real: &RealBatch,
    ) -> Result<Box<dyn Target>, DistillError> {
        let flat = real.images.flatten_from(1)?;
        let strata: Vec<(usize, usize)> = real.segments.ranges().collect();
        let syn: Vec<(usize, usize)> = problem.plan.syn_segments().ranges().collect();
        let mut real_means = Vec::new();
        let mut syn_ranges = Vec::new();
        for term in problem.plan.terms() {
            let means = term
                .strata
                .iter()
                .map(|&s| flat.narrow(0, strata[s].0, strata[s].1)?.mean(0))
                .collect::<candle_core::Result<Vec<_>>>()?;
            real_means.push((Tensor::stack(&means, 0)?.mean(0))?);
            syn_ranges.push(syn[term.syn_segment]);
        }
        Ok(Box::new(MeanTarget {
            real_means: Tensor::stack(&real_means, 0)?,
            syn_ranges,
            weight: self.weight,
        }))
    }

    fn between_steps(
        &mut self,
        _problem: &Problem<'_>,
        _synthetic: &Tensor,
        _rng: &mut ChaCha8Rng,
    ) -> Result<(), DistillError> {
        Ok(())
    }
}

fn settings(iterations: usize) -> debiasdd_distill::Settings {
    let mut s = DistillConfig::preset(MethodKind::Dc, Preset::Quick, MatchMode::Group, 10).settings;
    s.model.width = 2;
    s.model.depth = 1;
    s.batch_real = 3;
    s.iterations = iterations;
    s.seed = 4;
    s
}

fn method() -> MeanMatch {
    MeanMatch {
        steps: 2,
        weight: 0.0,
    }
}

#[test]
fn a_method_from_outside_distils_checkpoints_and_resumes() -> anyhow::Result<()> {
    let split = tiny_split(None);
    let dir = tempfile::tempdir()?;
    let (ckpt, history) = (dir.path().join("m.ckpt"), dir.path().join("m.jsonl"));
    let files = RunFiles {
        checkpoint: Some(&ckpt),
        checkpoint_every: 2,
        history: Some(&history),
    };

    // Straight through, 6 iterations.
    let mut straight =
        Distiller::with_matcher(settings(6), method(), &split, &Device::Cpu, DType::F64)?;
    let mut losses = Vec::new();
    let outcome = drive(
        &mut straight,
        files,
        &AtomicBool::new(false),
        &mut |_, s| {
            losses.push(s.loss);
            Ok(())
        },
    )?;
    assert_eq!(outcome, RunOutcome::Finished);
    assert!(losses[5] < 0.5 * losses[0], "the loss falls: {losses:?}");
    assert_eq!(std::fs::read_to_string(&history)?.lines().count(), 6);

    // Stopped after 3 iterations by the flag, then resumed from the checkpoint.
    let stop = AtomicBool::new(false);
    let mut first =
        Distiller::with_matcher(settings(6), method(), &split, &Device::Cpu, DType::F64)?;
    let outcome = drive(&mut first, files, &stop, &mut |_, s| {
        if s.iteration == 3 {
            stop.store(true, Ordering::SeqCst);
        }
        Ok(())
    })?;
    assert_eq!(outcome, RunOutcome::Interrupted);
    assert_eq!(first.iteration(), 3);
    let mut resumed =
        Distiller::with_matcher(settings(6), method(), &split, &Device::Cpu, DType::F64)?;
    resumed.load_checkpoint(&ckpt)?;
    assert_eq!(resumed.iteration(), 3);
    let mut resumed_losses = Vec::new();
    drive(&mut resumed, files, &AtomicBool::new(false), &mut |_, s| {
        resumed_losses.push(s.loss);
        Ok(())
    })?;
    assert_eq!(resumed_losses, losses[3..]);
    assert_eq!(values(resumed.images()), values(straight.images()));
    assert_eq!(std::fs::read_to_string(&history)?.lines().count(), 6);

    // The synthetic set records the method; DC refuses the checkpoint by the method's name.
    let set = resumed.synthetic_set()?;
    assert!(set.config.unwrap().contains("\"method\":\"mean-match\""));
    let mut dc = Distiller::new(
        DistillConfig {
            settings: settings(6),
            ..DistillConfig::preset(MethodKind::Dc, Preset::Quick, MatchMode::Group, 10)
        },
        &split,
        &Device::Cpu,
        DType::F64,
    )?;
    let err = dc.load_checkpoint(&ckpt).unwrap_err().to_string();
    assert!(err.contains("method.name"), "{err}");
    Ok(())
}
