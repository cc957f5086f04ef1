//! 3-D parallel training equals single-process training: for each layout and schedule,
//! the losses of several steps and the final parameters match a single process that
//! accumulates the same micro-batches (the plain reference trainer).

mod common;

use tch::Tensor;
use weaver_models::JobConfig;
use weaver_worker::train::Trainer;

const STEPS: u64 = 5;

/// Losses of every step and the final global parameters of the reference trainer.
fn single(job: &JobConfig) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let mut t = Trainer::new(job.clone()).unwrap();
    let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
    let params = t
        .store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach().copy()))
        .collect();
    (losses, params)
}

/// The same with every rank a thread.
fn parallel(job: &JobConfig) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    let results = common::on_ranks(job, dir.path(), |_, mut t| {
        let losses: Vec<f64> = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        (losses, common::local_params(&t))
    });
    let losses0 = results[0].0.clone();
    for (r, (l, _)) in results.iter().enumerate().skip(1) {
        assert_eq!(l, &losses0, "rank {r} reports other losses than rank 0");
    }
    let pieces = results.into_iter().map(|(_, p)| p).collect();
    (losses0, common::assemble(pieces))
}

fn check(tp: usize, pp: usize, dp: usize, schedule: &str, v: usize) {
    let j = common::job(tp, pp, dp, schedule, v, &[]);
    let (ref_losses, ref_params) = single(&j);
    let (losses, params) = parallel(&j);
    let what = format!("(tp {tp}, pp {pp}, dp {dp}, {schedule}, v {v})");
    // Tolerance (f32): a layout changes only the order of floating-point sums — TP splits
    // the inner sums of row-parallel products and the vocabulary softmax, DP sums
    // micro-batch gradients in another order — so each result moves by a few ulps (~1e-7
    // relative) per operation, amplified mildly over 5 AdamW steps. Measured: losses within
    // 1e-7 relative, parameters within 1e-5 absolute. 1e-4 (relative on losses, absolute on
    // parameters of magnitude ≲ 1) leaves margin, while any real error (a missing
    // all-reduce, a wrong slice, a dropped micro-batch) moves them by 1e-2 or more.
    let mut worst_loss = 0f64;
    for (step, (a, b)) in ref_losses.iter().zip(&losses).enumerate() {
        let rel = (a - b).abs() / a.abs();
        worst_loss = worst_loss.max(rel);
        assert!(
            rel < 1e-4,
            "{what} step {}: single {a} vs parallel {b}",
            step + 1
        );
    }
    assert_eq!(params.len(), ref_params.len(), "{what}: parameter count");
    let worst_param = common::worst_param_diff(&what, &ref_params, &params, 1e-4);
    eprintln!("{what}: worst loss rel diff {worst_loss:e}, worst param abs diff {worst_param:e}");
    // The runs really trained: the loss fell.
    assert!(
        ref_losses[STEPS as usize - 1] < ref_losses[0],
        "{what}: {ref_losses:?}"
    );
}

#[test]
fn tp2() {
    check(2, 1, 1, "1f1b", 1);
}

#[test]
fn dp2() {
    check(1, 1, 2, "1f1b", 1);
}

#[test]
fn pp2_every_schedule() {
    check(1, 2, 1, "gpipe", 1);
    check(1, 2, 1, "1f1b", 1);
    check(1, 2, 1, "interleaved", 2);
}

#[test]
fn tp2_pp2_every_schedule() {
    check(2, 2, 1, "gpipe", 1);
    check(2, 2, 1, "1f1b", 1);
    check(2, 2, 1, "interleaved", 2);
}

#[test]
fn pp2_dp2_every_schedule() {
    check(1, 2, 2, "gpipe", 1);
    check(1, 2, 2, "1f1b", 1);
    check(1, 2, 2, "interleaved", 2);
}

#[test]
fn tp2_pp2_dp2_every_schedule() {
    check(2, 2, 2, "gpipe", 1);
    check(2, 2, 2, "1f1b", 1);
    check(2, 2, 2, "interleaved", 2);
}

/// open_clip-shaped models at debug size: every open_clip option of the flavor on
/// (attentional pooler, class tokens, ln_pre, the open_clip decoder layer with its second
/// MLP and memory norm, legacy pad mask), micro-batches of 4.
fn open_clip_overrides(flavor: &str) -> Vec<String> {
    let mut o: Vec<String> = [
        format!("model.flavor=\"{flavor}\""),
        "model.image_size=32".into(),
        "model.patch_size=8".into(),
        "model.vision_width=64".into(),
        "model.vision_layers=2".into(),
        "model.vision_heads=4".into(),
        "model.text_width=32".into(),
        "model.text_heads=4".into(),
        "model.unimodal_layers=2".into(),
        "model.vocab_size=64".into(),
        "model.max_text_len=16".into(),
        "model.embed_dim=32".into(),
        "model.attn_pool_queries=9".into(),
        "model.attn_pool_heads=4".into(),
        "train.itm_weight=0".into(),
    ]
    .into();
    if flavor == "openclip-clip-b32" {
        // CLIP, with the options the CoCa flavor leaves off.
        o.extend([
            "train.caption_weight=0".to_string(),
            "model.text_pad_mask=\"keys\"".into(),
            "model.activation=\"quick_gelu\"".into(),
            "model.text_proj_bias=true".into(),
        ]);
    } else {
        o.extend([
            "model.multimodal_layers=2".to_string(),
            "train.caption_weight=2".into(),
        ]);
    }
    o
}

fn check_job(j: &JobConfig, what: &str) {
    let (ref_losses, ref_params) = single(j);
    let (losses, params) = parallel(j);
    // Tolerance as in `check`.
    for (step, (a, b)) in ref_losses.iter().zip(&losses).enumerate() {
        let rel = (a - b).abs() / a.abs();
        assert!(
            rel < 1e-4,
            "{what} step {}: single {a} vs parallel {b}",
            step + 1
        );
    }
    assert_eq!(params.len(), ref_params.len(), "{what}: parameter count");
    for (name, r) in &ref_params {
        let (_, p) = params.iter().find(|(n, _)| n == name).unwrap();
        let diff = (r - p).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{what}: {name} differs by {diff:e}");
    }
    assert!(
        ref_losses[STEPS as usize - 1] < ref_losses[0],
        "{what}: {ref_losses:?}"
    );
}

#[test]
fn open_clip_coca_tp2_pp2() {
    let j = common::job(
        2,
        2,
        1,
        "1f1b",
        1,
        &open_clip_overrides("openclip-coca-b32"),
    );
    check_job(&j, "openclip-coca (tp 2, pp 2)");
}

#[test]
fn open_clip_clip_tp2_pp2_dp2() {
    let j = common::job(
        2,
        2,
        2,
        "1f1b",
        1,
        &open_clip_overrides("openclip-clip-b32"),
    );
    check_job(&j, "openclip-clip (tp 2, pp 2, dp 2)");
}

/// Attention narrower than the residual stream (`model.*_head_dim`): q, k, v `[heads ·
/// head_dim, width]`, o `[width, heads · head_dim]`, heads split over tp. The open_clip CoCa
/// at debug size with narrow self-, cross- and pooler attention on tp 2 × pp 2; the debug
/// model's with sequence parallelism and full recomputation on dp 2 × tp 2.
#[test]
fn narrow_attention_tp2_pp2_and_sequence_parallel_recompute_dp2_tp2() {
    let mut o = open_clip_overrides("openclip-coca-b32");
    o.extend([
        "model.vision_head_dim=8".to_string(),
        "model.text_heads=2".into(),
        "model.text_head_dim=12".into(),
        "model.attn_pool_head_dim=6".into(),
    ]);
    let j = common::job(2, 2, 1, "1f1b", 1, &o);
    assert_eq!(j.model.text_attn_width(), 24);
    check_job(&j, "narrow openclip-coca (tp 2, pp 2)");
    let j = common::job(
        2,
        1,
        2,
        "1f1b",
        1,
        &[
            "model.vision_head_dim=8".to_string(),
            "model.text_heads=2".into(),
            "model.text_head_dim=24".into(),
            "parallel.sequence_parallel=true".into(),
            "parallel.recompute=\"full\"".into(),
        ],
    );
    check_job(
        &j,
        "narrow debug (dp 2, tp 2, sequence parallel, full recompute)",
    );
}

/// `[model] init_from` on a layout: a (tp 2, pp 2) run and a single process both start
/// from a checkpoint's parameters (not from their own seed) and train the same function.
#[test]
fn init_from_loads_a_checkpoint_on_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::job(
        1,
        1,
        1,
        "1f1b",
        1,
        &open_clip_overrides("openclip-coca-b32"),
    );
    let mut seeded = src.clone();
    seeded.train.seed = 5;
    let donor = Trainer::new(seeded).unwrap();
    let url = dir.path().join("ckpt");
    let store = weaver_checkpoint::CkptStore::open(url.to_str().unwrap()).unwrap();
    let saved: Vec<weaver_checkpoint::SavedTensor> = donor
        .store
        .params()
        .iter()
        .map(|p| weaver_checkpoint::SavedTensor::whole(p.name.clone(), p.tensor.detach().copy()))
        .collect();
    let report = weaver_checkpoint::ShardWriter::new(&store)
        .start(0, 0, saved)
        .unwrap()
        .wait()
        .unwrap();
    weaver_checkpoint::block_on(weaver_checkpoint::commit(
        &store,
        0,
        weaver_checkpoint::Layout::new(1, 1, 1),
        vec![report],
    ))
    .unwrap();
    let mut extra = open_clip_overrides("openclip-coca-b32");
    extra.push(format!("model.init_from=\"{}\"", url.display()));
    let j = common::job(2, 2, 1, "1f1b", 1, &extra);
    let started = Trainer::new(j.clone()).unwrap();
    for (a, b) in started.store.params().iter().zip(donor.store.params()) {
        assert!(a.tensor.equal(&b.tensor), "{} not loaded", a.name);
    }
    check_job(&j, "init_from (tp 2, pp 2)");
}
