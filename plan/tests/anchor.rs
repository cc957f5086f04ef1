//! The anchor-model checks, shown by the model: the anchor (bench/gpu/anchor.toml,
//! ViT-L/14 + a 1536-wide, 24-layer text side, bf16) at dp = 8 on one node of H200s.
//! - The sharded optimizer cuts optimizer memory by at least 7/8.
//! - Full recomputation keeps one layer input per layer per in-flight micro-batch (plus the
//!   decoder's memory and the two embeddings, once).

use std::path::Path;

use weaver_config::config::{Features, Recompute};
use weaver_config::layers::ActField;
use weaver_config::layout::ParallelLayout;
use weaver_config::JobConfig;
use weaver_plan::memory::{chunk_activations, MemoryModel};
use weaver_plan::DeviceKind;

fn anchor(sets: &[&str]) -> JobConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/gpu/anchor.toml");
    let mut all = vec!["parallel.dp=8".to_string(), "train.global_batch=512".into()];
    all.extend(sets.iter().map(|s| s.to_string()));
    JobConfig::load_with(&path, &all, Features::ALL).unwrap()
}

fn rank(job: &JobConfig) -> weaver_plan::MemoryBreakdown {
    let l = ParallelLayout::new(job, 8).unwrap();
    MemoryModel::new(job, &l, DeviceKind::Gpu, 0)
        .unwrap()
        .rank(0)
}

#[test]
fn the_sharded_optimizer_cuts_optimizer_memory_by_seven_eighths() {
    let plain = rank(&anchor(&[]));
    let sharded = rank(&anchor(&["parallel.shard_optimizer=true"]));
    eprintln!(
        "optimizer per GPU: {} → {}",
        plain.optimizer, sharded.optimizer
    );
    assert!(
        8 * sharded.optimizer <= plain.optimizer + 8 * 12,
        "{sharded:?} vs {plain:?}"
    );
    // Everything else is unchanged.
    assert_eq!(
        (plain.params, plain.grads, plain.activations),
        (sharded.params, sharded.grads, sharded.activations)
    );
}

#[test]
fn full_recomputation_keeps_one_layer_input_per_layer() {
    let job = anchor(&["parallel.recompute=\"full\""]);
    let cfg = &job.model;
    let m = rank(&job);
    let none = rank(&anchor(&[]));
    let spec = MemoryModel::new(
        &job,
        &ParallelLayout::new(&job, 8).unwrap(),
        DeviceKind::Gpu,
        0,
    )
    .unwrap()
    .spec();
    let n = cfg.num_layers();
    let kept = chunk_activations(cfg, 0..n, &spec).kept;
    assert_eq!(m.activations, kept);
    // The streams entering layers 1..n (layer 0's input is the data batch), in bf16.
    let streams: u64 = (1..n)
        .flat_map(|i| cfg.boundary(i, spec.mbs, spec.itm))
        .filter(|(f, _, _)| *f == ActField::Text || (*f == ActField::Image))
        .map(|(_, s, _)| s.iter().product::<i64>() as u64 * 2)
        .sum();
    let layer_inputs: u64 = (1..n)
        .map(|i| {
            cfg.boundary(i, spec.mbs, spec.itm)
                .iter()
                .filter(|(f, _, _)| {
                    *f == ActField::Text || (*f == ActField::Image && i < cfg.vision_layers)
                })
                .map(|(_, s, _)| s.iter().product::<i64>() as u64 * 2)
                .sum::<u64>()
        })
        .sum();
    assert!(
        kept >= layer_inputs && kept <= streams,
        "{kept} {layer_inputs} {streams}"
    );
    eprintln!(
        "activations per micro-batch: {} without recomputation, {} with full ({:.1}×)",
        none.activations,
        m.activations,
        none.activations as f64 / m.activations as f64
    );
    assert!(m.activations * 10 < none.activations);
    assert_eq!(job.parallel.recompute, Recompute::Full);
}

#[test]
fn the_10b_and_70b_variants_are_what_they_say() {
    for (file, billions) in [("plan-10b.toml", 10.0), ("plan-70b.toml", 70.0)] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(file);
        let job = JobConfig::load_with(&path, &[], Features::ALL).unwrap();
        let b = job.model.num_params() as f64 / 1e9;
        assert!(
            (b / billions - 1.0).abs() < 0.1,
            "{file}: {b:.2}B parameters"
        );
    }
}
