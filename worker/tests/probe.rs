//! The linear probe measures a representation: on a trained debug model it predicts the
//! scenes' first colour far above chance; on features that carry no information it stays
//! at chance.

use tch::{Device, Kind, Tensor};
use weaver_models::data::Split;
use weaver_models::JobConfig;
use weaver_worker::probe::{
    fit_probe, probe, LabelledImages, ProbeConfig, SceneLabel, SyntheticLabels,
};
use weaver_worker::Trainer;

const CFG: ProbeConfig = ProbeConfig {
    train: 800,
    test: 400,
    steps: 1000,
    l2: 1e-4,
    chunk: 100,
};

/// One standard deviation of a held-out accuracy of `n` samples at rate `p`.
fn sigma(p: f64, n: usize) -> f64 {
    (p * (1.0 - p) / n as f64).sqrt()
}

#[test]
fn trained_features_beat_chance_and_noise_does_not() {
    let job = JobConfig::parse(
        "[model]\nflavor = \"debug\"\n[train]\nsteps = 100\nglobal_batch = 32\nwarmup_steps = 10\nthreads = 1\n",
        &[],
    )
    .unwrap();
    let mut t = Trainer::new(job).unwrap();
    for _ in 0..100 {
        t.train_step().unwrap();
    }
    let source = SyntheticLabels {
        data: t.data.clone(),
        label: SceneLabel::Color,
    };
    let trained = probe(&t.model, &source, &CFG, Device::Cpu).unwrap();

    // The same labels, features of pure noise.
    let (_, ytr) = source
        .load(Split::Train, &(0..800).collect::<Vec<_>>(), Device::Cpu)
        .unwrap();
    let (_, yte) = source
        .load(Split::Heldout, &(0..400).collect::<Vec<_>>(), Device::Cpu)
        .unwrap();
    tch::manual_seed(1);
    let noise = |n: i64| Tensor::randn([n, 64], (Kind::Float, Device::Cpu));
    let random = fit_probe(&noise(800), &ytr, &noise(400), &yte, 6, &CFG).unwrap();
    eprintln!("trained: {trained:?}\nnoise: {random:?}");

    // Six colours: chance 1/6; the held-out accuracy of a chance-level probe has a standard
    // deviation of sqrt(1/6 · 5/6 / 400) ≈ 0.019. Noise must stay within 4σ of the
    // majority class's rate (a probe that learned nothing answers about that often), the
    // trained model must clear chance by 10σ (measured: see the eprintln above).
    let chance = 1.0 / 6.0;
    let s = sigma(chance, 400);
    assert!(
        random.accuracy <= random.majority.max(chance) + 4.0 * s,
        "noise features probe at {}",
        random.accuracy
    );
    assert!(
        trained.accuracy >= chance + 10.0 * s,
        "trained features probe at only {}",
        trained.accuracy
    );
}
