//! Pruning (`weaver ckpt prune`) and fine-tuning with the mask kept (`train.prune_mask`):
//! magnitude pruning zeroes the asked fraction of every block linear weight; fine-tuning on
//! a parallel layout keeps those entries exactly zero at every step (and without the mask
//! they do not stay zero: the check can fail); MLP pruning writes a smaller model that the
//! loader builds from the checkpoint's own config and that evaluates; head pruning writes a
//! model with fewer heads of the same width that computes what the source computes with
//! the removed heads silenced, and that evaluates, fine-tunes and resumes on tp 2 × pp 2.
//! A LoRA checkpoint loads with its adapters merged, so it quantizes, prunes and evaluates
//! as its merged export does.

mod common;

use std::path::Path;

use common::{committer, with_ckpt};
use tch::{Kind, Tensor};
use weaver_compress::prune::{is_block_linear, prune, Method};
use weaver_models::JobConfig;

/// Trains a debug model 3 steps and checkpoints it; returns (job, its step directory).
fn trained(dir: &Path) -> (JobConfig, String) {
    trained_with(dir, "dense", &[])
}

/// [`trained`] with config overrides, checkpointed under `dir/name`.
fn trained_with(dir: &Path, name: &str, extra: &[String]) -> (JobConfig, String) {
    let root = dir.join(name);
    let job = with_ckpt(common::job(1, 1, 1, "1f1b", 1, extra), &root);
    let sink = committer(&job);
    common::on_ranks(&job, dir, move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        t.save_checkpoint().unwrap();
        t.finish_checkpoints().unwrap();
    });
    (job, format!("{}/step-{:08}", root.display(), 3))
}

/// Fine-tunes from `init` on pp 2 × dp 2 for 3 steps; returns, per rank, the largest
/// magnitude any entry that was zero at the start reached after each step, and how far the
/// other entries moved in all.
fn finetune(dir: &Path, init: &str, mask: bool) -> Vec<(Vec<f64>, f64)> {
    let job = common::job(
        1,
        2,
        2,
        "1f1b",
        1,
        &[
            format!("model.init_from=\"{init}\""),
            format!("train.prune_mask={mask}"),
        ],
    );
    common::on_ranks(&job, dir, |_, mut t| {
        let start: Vec<(String, Tensor)> = t
            .store()
            .params()
            .iter()
            .filter(|p| is_block_linear(&p.name))
            .map(|p| (p.name.clone(), p.tensor.detach().copy()))
            .collect();
        let mut worst = Vec::new();
        for _ in 0..3 {
            t.train_step().unwrap();
            let mut w = 0f64;
            for (name, s) in &start {
                let p = t.store().params().iter().find(|p| &p.name == name).unwrap();
                let pruned = s.eq(0.0).to_kind(Kind::Float);
                let v = (&p.tensor * &pruned).abs().max().double_value(&[]);
                w = w.max(v);
            }
            worst.push(w);
        }
        let moved: f64 = start
            .iter()
            .map(|(name, s)| {
                let p = t.store().params().iter().find(|p| &p.name == name).unwrap();
                (&p.tensor - s).abs().sum(Kind::Float).double_value(&[])
            })
            .sum();
        (worst, moved)
    })
}

#[test]
fn magnitude_pruned_weights_stay_exactly_zero_while_fine_tuning() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("pruned");
    let r = prune(&url, out.to_str().unwrap(), &job, Method::Magnitude, 0.5).unwrap();
    // Every block linear weight lost exactly half of its entries (⌊0.5 · numel⌋).
    let loaded = weaver_compress::load(&r.url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    let mut pruned_layers = 0;
    for p in loaded.store.params() {
        if is_block_linear(&p.name) {
            let z = p.tensor.eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(z, p.tensor.numel() as i64 / 2, "{}", p.name);
            pruned_layers += 1;
        }
    }
    assert_eq!(pruned_layers, r.info.layers);
    assert!(pruned_layers > 0);
    let with_mask = finetune(dir.path(), &r.url, true);
    for (rank, (worst, moved)) in with_mask.iter().enumerate() {
        assert!(
            worst.iter().all(|&w| w == 0.0),
            "rank {rank}: a pruned entry left zero: {worst:?}"
        );
        assert!(*moved > 0.0, "rank {rank}: the kept weights did not train");
    }
    // The control: without the mask, the optimizer moves the pruned entries off zero.
    let without = finetune(dir.path(), &r.url, false);
    assert!(
        without.iter().any(|(w, _)| w.iter().any(|&v| v > 0.0)),
        "without train.prune_mask the zeros should move: {without:?}"
    );
}

#[test]
fn mlp_pruning_writes_a_smaller_model_that_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("mlp");
    let r = prune(&url, out.to_str().unwrap(), &job, Method::Mlp, 0.5).unwrap();
    assert!(r.params_after < r.params_before, "{r:?}");
    // The loader builds the smaller model from the checkpoint's own config (the caller's
    // job still says mlp_ratio 4).
    let loaded = weaver_compress::load(&r.url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    assert_eq!(loaded.job.model.mlp_ratio, job.model.mlp_ratio / 2);
    let fc1 = loaded
        .store
        .params()
        .iter()
        .find(|p| p.name.ends_with("mlp.fc1.weight"))
        .unwrap()
        .global_shape
        .clone();
    assert_eq!(
        fc1[0],
        2 * job.model.text_width.min(job.model.vision_width) as i64
    );
    let data = weaver_worker::train::dataset(&loaded.job).unwrap();
    let e =
        weaver_worker::eval::evaluate(&loaded.model, &data, 64, 16, tch::Device::Cpu, 3).unwrap();
    assert!(e.i2t_r1.is_finite());
    // Whole channels went: the kept ones are the source's (fc2's columns are a subset).
    let src = weaver_compress::load(&url, &job, &weaver_compress::LoadOptions::cpu()).unwrap();
    let name = "text.unimodal.0.mlp.fc2.weight";
    let a = src.store.get(name).unwrap();
    let b = loaded.store.get(name).unwrap();
    for j in 0..b.size()[1] {
        let col = b.select(1, j);
        let found = (0..a.size()[1]).any(|k| a.select(1, k).equal(&col));
        assert!(found, "{name} column {j} is not a column of the source");
    }
}

/// The largest absolute difference between two tensors.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn head_pruning_removes_the_lowest_scoring_heads_and_the_smaller_model_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("heads");
    let r = prune(&url, out.to_str().unwrap(), &job, Method::Heads, 0.5).unwrap();
    // Every attention: 2 vision blocks, 2 unimodal, 2 multimodal with self- and
    // cross-attention; each keeps 2 of its 4 heads of 16.
    assert_eq!((r.info.layers, r.kept_heads.len()), (8, 8), "{r:?}");
    assert!(r.params_after < r.params_before, "{r:?}");
    let cpu = weaver_compress::LoadOptions::cpu();
    let pruned = weaver_compress::load(&r.url, &job, &cpu).unwrap();
    let m = &pruned.job.model;
    assert_eq!((m.vision_heads, m.vision_head_dim), (2, Some(16)));
    assert_eq!((m.text_heads, m.text_head_dim), (2, Some(16)));
    assert_eq!(
        pruned
            .store
            .get("text.multimodal.0.xattn.o.weight")
            .unwrap()
            .size(),
        [64, 32]
    );

    // The kept heads are those of the highest ‖q, k, v rows‖ · ‖o columns‖ (recomputed
    // here from the source's weights).
    let src = weaver_compress::load(&url, &job, &cpu).unwrap();
    let w = |n: &str| src.store.get(n).unwrap().detach();
    let prefix = "vision.blocks.0.attn.";
    let score: Vec<f64> = (0..4)
        .map(|h| {
            let rows = |x: &str| w(&format!("{prefix}{x}.weight")).narrow(0, 16 * h, 16);
            let input = (rows("q").square().sum(Kind::Float)
                + rows("k").square().sum(Kind::Float)
                + rows("v").square().sum(Kind::Float))
            .sqrt();
            let output = w(&format!("{prefix}o.weight"))
                .narrow(1, 16 * h, 16)
                .square()
                .sum(Kind::Float)
                .sqrt();
            (input * output).double_value(&[])
        })
        .collect();
    let mut best: Vec<i64> = (0..4).collect();
    best.sort_by(|a, b| score[*b as usize].total_cmp(&score[*a as usize]));
    best.truncate(2);
    best.sort();
    let (_, kept) = r.kept_heads.iter().find(|(p, _)| p == prefix).unwrap();
    assert_eq!(kept, &best, "scores {score:?}");

    // The pruned model computes what the source does with the removed heads' output
    // columns zeroed (their contribution to the stream silenced), up to f32 rounding.
    let data = weaver_worker::train::dataset(&job).unwrap();
    let idx: Vec<u64> = (0..8).collect();
    let batch = data
        .batch(weaver_models::data::Split::Heldout, &idx, tch::Device::Cpu)
        .unwrap();
    let outputs = |l: &weaver_compress::Loaded| {
        let (i, t) = l.model.embeddings(&batch).unwrap();
        let logits = l
            .model
            .caption_logits(&batch.images, &batch.tokens, &batch.eos)
            .unwrap();
        [i, t, logits]
    };
    let want = outputs(&pruned);
    let before = outputs(&src);
    tch::no_grad(|| {
        for (prefix, kept) in &r.kept_heads {
            let o = src.store.get(&format!("{prefix}o.weight")).unwrap();
            for h in (0..4).filter(|h| !kept.contains(h)) {
                let _ = o.narrow(1, 16 * h, 16).fill_(0.0);
            }
        }
    });
    let got = outputs(&src);
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        // f32 sums over 64 of 32 products in another order: ~1e-6 of values ≲ 10.
        let d = max_diff(a, b);
        assert!(d < 1e-4, "output {k}: the silenced source differs by {d:e}");
        // The control: removing heads changed the outputs, so the comparison can fail.
        let moved = max_diff(&before[k], b);
        assert!(
            moved > 1e-3,
            "output {k}: pruning changed nothing ({moved:e})"
        );
    }
    let e =
        weaver_worker::eval::evaluate(&pruned.model, &data, 64, 16, tch::Device::Cpu, 3).unwrap();
    assert!(e.i2t_r1.is_finite() && e.t2i_r1.is_finite());
    // The narrow-attention model quantizes (int8 weights: q, k, v `[32, 64]`, o `[64, 32]`)
    // and its image embeddings stay the float model's direction.
    let opts = weaver_compress::QuantizeOptions::new(weaver_compress::Scheme::Int8Weight);
    let q_out = dir.path().join("heads-int8");
    let q = weaver_compress::quantize(&r.url, q_out.to_str().unwrap(), &job, &opts).unwrap();
    let int8 = weaver_compress::load(&q.url, &job, &cpu).unwrap();
    let (qi, _) = int8.model.embeddings(&batch).unwrap();
    let cos = (&qi * &want[0])
        .sum_dim_intlist(1, false, Kind::Float)
        .min();
    assert!(cos.double_value(&[]) > 0.99, "int8 vs float cosine {cos}");

    // Fine-tuning from it (no mask: the heads are gone) on tp 2 × pp 2, the config naming
    // the pruned shape, trains and resumes exactly.
    let ft = common::job(
        2,
        2,
        1,
        "1f1b",
        1,
        &[
            format!("model.init_from=\"{}\"", r.url),
            "model.vision_heads=2".into(),
            "model.vision_head_dim=16".into(),
            "model.text_heads=2".into(),
            "model.text_head_dim=16".into(),
        ],
    );
    let ckpt = dir.path().join("ft");
    let whole = common::train_saving(&ft, 4, 2, &ckpt);
    assert!(whole.iter().all(|l| l.is_finite()), "{whole:?}");
    let rest = common::resume_training(&ft, format!("{}/step-{:08}", ckpt.display(), 2), 2);
    for (a, b) in whole[2..].iter().zip(&rest) {
        // As the resume tests: a few ulps of reordering at most; a wrong state moves the
        // loss by 1e-2.
        assert!((a - b).abs() / a.abs() < 1e-4, "{whole:?} vs {rest:?}");
    }
}

#[test]
fn a_lora_checkpoint_quantizes_prunes_and_evaluates_as_its_merged_export() {
    use weaver_checkpoint::{block_on, commit, Checkpoint, CkptStore, Layout, SavedTensor};
    let dir = tempfile::tempdir().unwrap();
    let lora: Vec<String> = [
        "train.lora_rank=4",
        "train.lora_alpha=8.0",
        "train.lora_targets=[\"attn.q\", \"attn.v\", \"attn.o\", \"mlp.fc1\", \"xattn.k\"]",
    ]
    .map(String::from)
    .into();
    let (_, url) = trained_with(dir.path(), "lora", &lora);
    let ckpt = block_on(Checkpoint::open_url(&url)).unwrap();
    assert!(ckpt
        .manifest()
        .tensors
        .contains_key("text.multimodal.0.xattn.k.lora_b"));
    // The merged export (`weaver ckpt export`), committed as a plain checkpoint of the base
    // config.
    let file = dir.path().join("merged.safetensors");
    weaver_worker::ckpt::export_params(&ckpt, &file).unwrap();
    let base = common::job(1, 1, 1, "1f1b", 1, &[]);
    let mut saved: Vec<SavedTensor> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(n, t)| SavedTensor::whole(n, t))
        .collect();
    saved.push(SavedTensor::from_bytes(
        weaver_compress::load::CONFIG,
        base.to_toml().as_bytes(),
    ));
    let store = CkptStore::open(dir.path().join("merged").to_str().unwrap()).unwrap();
    let report = weaver_checkpoint::ShardWriter::new(&store)
        .start(3, 0, saved)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(&store, 3, Layout::new(1, 1, 1), vec![report])).unwrap();
    let merged_url = format!("{}/step-{:08}", dir.path().join("merged").display(), 3);

    let cpu = weaver_compress::LoadOptions::cpu();
    let a = weaver_compress::load(&url, &base, &cpu).unwrap();
    let b = weaver_compress::load(&merged_url, &base, &cpu).unwrap();
    assert_eq!(a.store.params().len(), b.store.params().len());
    // W + s·B·A in f32 both ways (the loader on each rank's slice of B·A).
    for p in b.store.params() {
        let d = max_diff(a.store.get(&p.name).unwrap(), &p.tensor);
        assert!(d < 1e-6, "{}: {d:e}", p.name);
    }
    // The control: the adapters moved the weights, so an unmerged load would differ.
    let name = "text.multimodal.0.xattn.k.weight";
    let raw = block_on(ckpt.read_tensor(name)).unwrap();
    assert!(max_diff(&raw, b.store.get(name).unwrap()) > 1e-6);

    // Evaluated, quantized and pruned from either, the results are the same.
    let data = weaver_worker::train::dataset(&base).unwrap();
    let recall = |l: &weaver_compress::Loaded| {
        let e =
            weaver_worker::eval::evaluate(&l.model, &data, 64, 16, tch::Device::Cpu, 3).unwrap();
        (e.i2t_r1, e.t2i_r1)
    };
    assert_eq!(recall(&a), recall(&b));
    let batch = data
        .batch(
            weaver_models::data::Split::Heldout,
            &(0..8).collect::<Vec<u64>>(),
            tch::Device::Cpu,
        )
        .unwrap();
    let embeddings = |u: &str| {
        let l = weaver_compress::load(u, &base, &cpu).unwrap();
        let (i, t) = tch::no_grad(|| l.model.embeddings(&batch).unwrap());
        Tensor::cat(&[i, t], 1)
    };
    let root = dir.path().to_str().unwrap().to_string();
    let opts = weaver_compress::QuantizeOptions::new(weaver_compress::Scheme::Int8Weight);
    let qa = weaver_compress::quantize(&url, &format!("{root}/qa"), &base, &opts).unwrap();
    let qb = weaver_compress::quantize(&merged_url, &format!("{root}/qb"), &base, &opts).unwrap();
    let d = max_diff(&embeddings(&qa.url), &embeddings(&qb.url));
    // Weights within 1e-6 round to the same int8 values (or, at a rounding boundary, one
    // step apart in a rare entry: ≲ 1e-3 of an embedding).
    assert!(d < 1e-3, "quantized: {d:e}");
    let pa = prune(&url, &format!("{root}/pa"), &base, Method::Heads, 0.5).unwrap();
    let pb = prune(
        &merged_url,
        &format!("{root}/pb"),
        &base,
        Method::Heads,
        0.5,
    )
    .unwrap();
    assert_eq!(pa.kept_heads, pb.kept_heads);
    let d = max_diff(&embeddings(&pa.url), &embeddings(&pb.url));
    assert!(d < 1e-5, "pruned: {d:e}");
}

#[test]
fn bad_pruning_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (job, url) = trained(dir.path());
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    // 4 heads · (1 − 0.3) is no whole number of heads.
    let e = prune(&url, out, &job, Method::Heads, 0.3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--sparsity") && e.contains("model.vision_heads"),
        "{e}"
    );
    let e = prune(&url, out, &job, Method::Mlp, 0.3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--sparsity"), "{e}");
    let e = prune(&url, out, &job, Method::Magnitude, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--sparsity"), "{e}");
    let e = JobConfig::parse(&job.to_toml(), &["train.prune_mask=true".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.init_from"), "{e}");
}
