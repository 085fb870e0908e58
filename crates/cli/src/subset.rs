//! `debiasdd subset`: a random real subset of a train split saved as a synthetic set, the floor a
//! distilled set of the same size has to beat (class-stratified: n per class, inherits the bias;
//! group-stratified: n per non-empty (class, colour) group).

use std::path::PathBuf;

use clap::Args;
use debiasdd_data::{Normalization, Stratify, SyntheticSet, random_real_subset};
use rand::SeedableRng;

#[derive(Debug, Args)]
pub struct SubsetArgs {
    /// Dataset file from `debiasdd generate` or `debiasdd import` (its train split is sampled).
    #[arg(long)]
    data: PathBuf,
    /// class (n images per class) or group (n images per non-empty group).
    #[arg(long, value_parser = parse_stratify)]
    stratify: Stratify,
    /// Images per class or per group.
    #[arg(long, default_value_t = 1)]
    per: usize,
    /// Where to write the subset (synthetic-set format).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_stratify(s: &str) -> Result<Stratify, String> {
    match s.to_ascii_lowercase().as_str() {
        "class" => Ok(Stratify::Class),
        "group" => Ok(Stratify::Group),
        _ => Err(format!(
            "unknown stratification `{s}`; expected class or group"
        )),
    }
}

pub fn run(args: SubsetArgs) -> anyhow::Result<()> {
    let data = debiasdd_data::file::load(&args.data)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let set = random_real_subset(&data.train, args.stratify, args.per, &mut rng)?;
    let config = serde_json::json!({
        "method": "random-real-subset",
        "stratify": args.stratify,
        "per_stratum": args.per,
        "seed": args.seed,
        "data": args.data,
    });
    let n = set.len();
    SyntheticSet {
        set,
        norm: Normalization::of_split(&data.train),
        config: Some(config.to_string()),
    }
    .save(&args.out)?;
    println!("subset: {} ({n} real images)", args.out.display());
    Ok(())
}
