//! The data layer end to end on the real files: verified load -> Colored MNIST (both presets)
//! -> safetensors -> reload -> group index -> stratified draws.

use debiasdd_cmnist::colored::{LFF_PALETTE, REBIAS_PALETTE};
use debiasdd_cmnist::{ColoredMnistConfig, GreySource, Preset, SourceKind, Verification};
use debiasdd_e2e::{shared_mnist, system_fashion_mnist};
use rand::SeedableRng;

#[test]
fn seed_preset_round_trips_and_feeds_the_group_layer() -> anyhow::Result<()> {
    let Some(dir) = shared_mnist("seed_preset_round_trips_and_feeds_the_group_layer") else {
        return Ok(());
    };
    let source = GreySource::load(&dir, SourceKind::Mnist, Verification::Checksums)?;
    let config = ColoredMnistConfig::new(Preset::Seed, 0.005, 1);
    let data = debiasdd_cmnist::build(&source, &config)?;
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("cmnist.safetensors");
    debiasdd_data::file::save(&data, &path)?;
    let back = debiasdd_data::file::load(&path)?;
    assert_eq!(back, data);
    assert_eq!(
        ColoredMnistConfig::of_dataset(&back).map(|c| c.palette),
        Some(LFF_PALETTE)
    );

    // At ratio 0.005 a class has ~22 conflicting samples over 9 colours: some groups are empty,
    // and the sampler refuses them while drawing whole small groups.
    let index = back.train.group_index();
    let empty = index.empty_groups();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for group in 0..100 {
        let draw = index.sample(group, 256, &mut rng);
        if empty.contains(&group) {
            assert!(draw.is_err(), "group {group} is empty but a draw succeeded");
        } else {
            let draw = draw?;
            assert_eq!(draw.len(), index.members(group).len().min(256));
            assert!(
                draw.iter()
                    .all(|&i| back.train.group_of(i).map(usize::from) == Some(group))
            );
        }
    }
    // Aligned groups hold all but the conflicting samples.
    let counts = index.counts();
    let diagonal: usize = (0..10).map(|k| counts.get(k * 11)).sum();
    assert_eq!(
        diagonal,
        45_000
            - (0..back.train.len())
                .filter(|&i| !debiasdd_cmnist::is_aligned(&back.train, i))
                .count()
    );
    Ok(())
}

#[test]
fn fairdd_preset_is_binarised_with_the_rebias_palette() -> anyhow::Result<()> {
    let Some(dir) = shared_mnist("fairdd_preset_is_binarised_with_the_rebias_palette") else {
        return Ok(());
    };
    let source = GreySource::load(&dir, SourceKind::Mnist, Verification::Checksums)?;
    let config = ColoredMnistConfig {
        jitter_std: 0.0,
        ..ColoredMnistConfig::new(Preset::Fairdd, 0.1, 0)
    };
    let data = debiasdd_cmnist::build(&source, &config)?;
    assert_eq!(
        (data.train.len(), data.valid.len(), data.test.len()),
        (60_000, 0, 10_000)
    );
    for i in (0..data.train.len()).step_by(997) {
        let colour = REBIAS_PALETTE[usize::from(data.train.attributes[i].unwrap())];
        let img = data.train.image(i);
        for p in 0..784 {
            let px = [img[p], img[784 + p], img[1568 + p]];
            assert!(
                px == [0, 0, 0] || px == colour,
                "sample {i} pixel {p}: {px:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn fashion_mnist_is_an_alternative_grey_source() -> anyhow::Result<()> {
    let Some(dir) = system_fashion_mnist("fashion_mnist_is_an_alternative_grey_source") else {
        return Ok(());
    };
    let source = GreySource::load(&dir, SourceKind::FashionMnist, Verification::Checksums)?;
    let config = ColoredMnistConfig {
        source: SourceKind::FashionMnist,
        ..ColoredMnistConfig::new(Preset::Seed, 0.02, 0)
    };
    let data = debiasdd_cmnist::build(&source, &config)?;
    assert_eq!(data.train.len(), 45_000);
    // MNIST files are not Fashion-MNIST: the checksums tell them apart.
    if let Some(mnist) = shared_mnist("fashion_mnist_is_an_alternative_grey_source") {
        let err = GreySource::load(&mnist, SourceKind::FashionMnist, Verification::Checksums)
            .expect_err("MNIST must not verify as Fashion-MNIST");
        assert!(err.to_string().contains("fashion-mnist"), "{err}");
    }
    Ok(())
}
