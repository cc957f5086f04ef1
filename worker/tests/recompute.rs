//! Activation recomputation (`parallel.recompute`) changes no bit: on CPU f32, the losses,
//! every rank's gradients and its parameters after a few steps with `selective` and with
//! `full` recomputation equal those of the same layout without it, exactly. The model draws
//! no random numbers, so a rerun of a layer or of attention's core computes the same
//! values, and the recomputed backward runs the same kernels on the same tensors in the
//! same order.

mod common;

use tch::Tensor;
use weaver_models::JobConfig;

const STEPS: usize = 3;

/// One rank's results: the losses of every step, then (name, last step's gradient,
/// parameters after the last step).
type RankRun = (Vec<f64>, Vec<(String, Tensor, Tensor)>);

fn run(job: &JobConfig) -> Vec<RankRun> {
    let dir = tempfile::tempdir().unwrap();
    common::on_ranks(job, dir.path(), |_, mut t| {
        let losses = (0..STEPS).map(|_| t.train_step().unwrap().loss).collect();
        let state = t
            .store()
            .params()
            .iter()
            .map(|p| {
                let g = p.tensor.grad();
                assert!(g.defined(), "{} has no gradient", p.name);
                (p.name.clone(), g.copy(), p.tensor.detach().copy())
            })
            .collect();
        (losses, state)
    })
}

/// Runs the debug-flavor job of this layout (and `extra` settings) without recomputation,
/// then with each mode, and compares every rank's results bit for bit.
fn check(tp: usize, pp: usize, dp: usize, schedule: &str, v: usize, extra: &[String]) {
    let what = format!("(tp {tp}, pp {pp}, dp {dp}, {schedule}, v {v})");
    let job = |mode: &str| {
        let mut o = extra.to_vec();
        o.push(format!("parallel.recompute=\"{mode}\""));
        common::job(tp, pp, dp, schedule, v, &o)
    };
    let plain = run(&job("none"));
    for mode in ["selective", "full"] {
        let other = run(&job(mode));
        assert_eq!(plain.len(), other.len());
        for (rank, ((la, sa), (lb, sb))) in plain.iter().zip(&other).enumerate() {
            assert_eq!(la, lb, "{what}, recompute {mode}, rank {rank}: losses");
            assert_eq!(sa.len(), sb.len());
            for ((name, ga, pa), (_, gb, pb)) in sa.iter().zip(sb) {
                assert!(
                    ga.equal(gb),
                    "{what}, recompute {mode}, rank {rank}: gradient of {name} differs by {:e}",
                    (ga - gb).abs().max().double_value(&[])
                );
                assert!(
                    pa.equal(pb),
                    "{what}, recompute {mode}, rank {rank}: {name} differs"
                );
            }
        }
    }
    // The runs trained (a broken seed would leave the loss flat).
    let l = &plain[0].0;
    assert!(l[STEPS - 1] < l[0], "{what}: {l:?}");
}

// The layouts, chosen so that each way recomputation meets the rest of the trainer is
// covered once, with as few ranks as that takes (every rank is a thread on a 2-core CI):
// - one process: the baseline's whole chunk is one autograd graph (no layer cuts);
// - tp 2: the attention core's cut sits between tensor-parallel cuts, and full
//   recomputation runs the layer's all-reduces a second time;
// - pp 2 under every schedule: gpipe keeps every micro-batch's saved inputs in flight at
//   once, 1f1b interleaves forwards and recomputing backwards, interleaved runs two chunks
//   per rank (a chunk's input gradient is what the recomputed first layer returns);
// - dp 2: layer cuts with overlap, each recomputed layer reported done to the gradient
//   buckets as its backward ends;
// - an open_clip CoCa at tp 2 × pp 2: the attentional pooler's and the cross-attention's
//   cores, an explicit (legacy padding) mask in the recomputed core, the memory norm.

#[test]
fn one_process() {
    check(1, 1, 1, "1f1b", 1, &[]);
}

#[test]
fn tp2() {
    check(2, 1, 1, "1f1b", 1, &[]);
}

#[test]
fn pp2_every_schedule() {
    check(1, 2, 1, "gpipe", 1, &[]);
    check(1, 2, 1, "1f1b", 1, &[]);
    check(1, 2, 1, "interleaved", 2, &[]);
}

#[test]
fn dp2_with_overlap() {
    check(1, 1, 2, "1f1b", 1, &[]);
}

#[test]
fn open_clip_coca_tp2_pp2() {
    let o: Vec<String> = [
        "model.flavor=\"openclip-coca-b32\"",
        "model.image_size=32",
        "model.patch_size=8",
        "model.vision_width=64",
        "model.vision_layers=2",
        "model.vision_heads=4",
        "model.text_width=32",
        "model.text_heads=4",
        "model.unimodal_layers=2",
        "model.multimodal_layers=2",
        "model.vocab_size=64",
        "model.max_text_len=16",
        "model.embed_dim=32",
        "model.attn_pool_queries=9",
        "model.attn_pool_heads=4",
        "train.itm_weight=0",
        "train.caption_weight=2",
    ]
    .map(String::from)
    .into();
    check(2, 2, 1, "1f1b", 1, &o);
}

#[test]
fn a_checkpoint_resumes_across_recomputation_on_and_off() {
    // tp 2: the layout where both modes cut the most (attention cores between the
    // tensor-parallel cuts). Saved after step 2 of 4, resumed with the other setting: the
    // last two losses equal the uninterrupted run's, bit for bit (recomputation changes no
    // bit, and a checkpoint does not depend on it).
    let job = |mode: &str| {
        common::job(
            2,
            1,
            1,
            "1f1b",
            1,
            &[format!("parallel.recompute=\"{mode}\"")],
        )
    };
    for (saved_with, resumed_with) in [("full", "none"), ("none", "selective")] {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let whole = common::train_saving(&job(saved_with), 4, 2, &ckpt);
        let url = format!("{}/step-{:08}", ckpt.display(), 2);
        let rest = common::resume_training(&job(resumed_with), url, 2);
        assert_eq!(
            &whole[2..],
            &rest[..],
            "saved with recompute {saved_with}, resumed with {resumed_with}"
        );
    }
}
