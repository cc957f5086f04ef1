//! The Rust model against the committed PyTorch implementation (python/weaver_ref.py):
//! same weights, same batch, same losses and gradients, for every fusion kind.

use std::path::PathBuf;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use weaver_models::data::Split;
use weaver_models::model::{Acts, LossWeights};
use weaver_models::{Fusion, JobConfig};
use weaver_parallel::tp::NoTp;
use weaver_worker::train::{build, save_params};

fn python() -> String {
    std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| {
        panic!("WEAVER_PYTHON is not set: run the tests through scripts/test.sh, which creates the venv with torch")
    })
}

fn reference_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python/weaver_ref.py")
}

fn check_fusion(fusion: Fusion) {
    let job = JobConfig::parse(
        "[model]\nflavor = \"debug\"\nvision_layers = 2\nunimodal_layers = 1\nmultimodal_layers = 2\n[train]\nglobal_batch = 6\n",
        &[format!("model.fusion={}", fusion.name()), "train.seed=11".into()],
    )
    .unwrap();
    let built = build(&job).unwrap();
    // Move away from the near-zero start: at init (std 0.02) activations are so small that
    // e.g. tanh-approximated GELU would pass for the exact one. Give every matrix
    // unit-variance outputs, biases and norms some spread, and the gates a value.
    tch::manual_seed(5);
    tch::no_grad(|| {
        for p in built.store.params() {
            let mut t = p.tensor.shallow_clone();
            let shape = p.tensor.size();
            let fresh = if p.name.ends_with("gate") {
                Tensor::from_slice(&[0.7f32])
            } else if p.name.ends_with("logit_scale") {
                Tensor::from(2.0f32)
            } else if shape.len() == 2 {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) / (shape[1] as f64).sqrt()
            } else if p.name.contains(".ln") {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 0.2 + 1.0
            } else {
                Tensor::randn(&shape, (Kind::Float, Device::Cpu)) * 0.2
            };
            t.copy_(&fresh);
        }
    });
    let batch = built
        .data
        .batch(Split::Train, &[3, 1, 4, 1, 5, 9], Device::Cpu)
        .unwrap();
    let w = LossWeights {
        itc: 1.0,
        caption: 0.7,
        itm: 0.5,
        mlm: 0.0,
        vqa: 0.0,
    };
    let mut acts = Acts::default();
    built
        .model
        .forward(&mut NoTp, &mut acts, &batch, true)
        .unwrap();
    let l = built.model.losses(&mut NoTp, &mut acts, &batch, w).unwrap();
    l.total.backward();

    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.safetensors");
    save_params(&built.store, &weights).unwrap();
    let batch_path = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(
        &[
            ("images", &batch.images),
            ("tokens", &batch.tokens),
            ("eos", &batch.eos),
        ],
        &batch_path,
    )
    .unwrap();
    let cfg_path = dir.path().join("cfg.json");
    let meta = serde_json::json!({
        "model": job.model,
        "weights": {"itc": w.itc, "caption": w.caption, "itm": w.itm},
        "pad_id": built.data.tokenizer.pad_id(),
    });
    std::fs::write(&cfg_path, meta.to_string()).unwrap();
    let grads_path = dir.path().join("grads.safetensors");
    let out = Command::new(python())
        .arg(reference_script())
        .args(["losses", "--config"])
        .arg(&cfg_path)
        .arg("--weights")
        .arg(&weights)
        .arg("--batch")
        .arg(&batch_path)
        .arg("--grads-out")
        .arg(&grads_path)
        .output()
        .expect("cannot run the venv's python");
    assert!(
        out.status.success(),
        "weaver_ref.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // Tolerance: both sides run the same f32 operations in the same order; they differ only
    // in kernel choices (fused addmm against mm + add, attention backends), which move a
    // loss by a few ulps of its inputs — 1e-6 relative at these sizes. 1e-5 is the bar.
    for (name, ours) in [
        ("total", &l.total),
        ("itc", &l.itc),
        ("caption", &l.caption),
        ("itm", &l.itm),
    ] {
        let a = ours.double_value(&[]);
        let b = theirs[name].as_f64().unwrap();
        let rel = (a - b).abs() / b.abs().max(1e-12);
        assert!(
            rel < 1e-5,
            "{} {name}: weaver {a} vs torch {b} (rel {rel:e})",
            fusion.name()
        );
    }

    // Gradients: each parameter's gradient within 1e-4 of the reference in relative L2
    // norm (backward accumulates the same few-ulp differences through every layer).
    //
    // Some gradients are zero in exact arithmetic: a self-attention key bias adds the same
    // `q·b` to every score of a query row, which the softmax cancels. Both sides then hold
    // only f32 rounding noise (about 2e-9 here), so their difference is noise too and a
    // relative bound means nothing. The absolute floor is rounding noise measured against
    // the whole model's gradient: 1e-7 of its norm (f32 epsilon is 1.2e-7). A wrong
    // gradient anywhere else is many orders of magnitude above it.
    let grads: Vec<(String, Tensor)> = Tensor::read_safetensors(&grads_path).unwrap();
    assert_eq!(grads.len(), built.store.params().len());
    let total = grads
        .iter()
        .map(|(_, g)| g.norm().double_value(&[]).powi(2))
        .sum::<f64>()
        .sqrt();
    let floor = 1e-7 * total;
    for p in built.store.params() {
        let (_, g) = grads.iter().find(|(n, _)| n == &p.name).unwrap();
        let ours = p.tensor.grad();
        assert!(ours.defined(), "{} has no gradient", p.name);
        let diff = (&ours - g).norm().double_value(&[]);
        let scale = g.norm().double_value(&[]);
        assert!(
            diff <= 1e-4 * scale + floor,
            "{} grad of {}: |diff| {diff:e} vs |grad| {scale:e} (floor {floor:e})",
            fusion.name(),
            p.name
        );
    }
    assert_eq!(ours_kind(&built.store), Kind::Float);
}

fn ours_kind(store: &weaver_models::nn::ParamStore) -> Kind {
    store.kind
}

#[test]
fn cross_attention_matches_pytorch() {
    check_fusion(Fusion::CrossAttention);
}

#[test]
fn gated_cross_attention_matches_pytorch() {
    check_fusion(Fusion::GatedCrossAttention);
}

#[test]
fn prefix_fusion_matches_pytorch() {
    check_fusion(Fusion::Prefix);
}
