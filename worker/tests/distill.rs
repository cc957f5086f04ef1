//! Distillation from a frozen teacher (`[distill]`): parallel layouts (pp 2 × dp 2, tp 2,
//! tp 2 × pp 2) compute the same losses as one process, the teacher's weights stay bitwise
//! what was loaded, a resumed run continues exactly, and the distillation terms really enter
//! the loss. The teacher is a wider debug model trained for a few steps here.

mod common;

use std::path::Path;

use common::{committer, with_ckpt};
use weaver_models::JobConfig;
use weaver_worker::ckpt::open_resume;
use weaver_worker::parallel::collapse;

const STEPS: u64 = 4;

/// Trains a teacher (a wider debug model) for 3 steps and checkpoints it; returns its step
/// directory.
fn teacher(dir: &Path) -> String {
    teacher_with(dir, "teacher", &[])
}

/// [`teacher`] with `extra` model keys, checkpointed under `dir/name`.
fn teacher_with(dir: &Path, name: &str, extra: &[&str]) -> String {
    let root = dir.join(name);
    let mut keys: Vec<String> = vec![
        "model.vision_width=96".into(),
        "model.text_width=96".into(),
        "model.embed_dim=48".into(),
        "train.seed=7".into(),
    ];
    keys.extend(extra.iter().map(|k| k.to_string()));
    let job = with_ckpt(common::job(1, 1, 1, "1f1b", 1, &keys), &root);
    let sink = committer(&job);
    common::on_ranks(&job, dir, move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        for _ in 0..3 {
            t.train_step().unwrap();
        }
        t.save_checkpoint().unwrap();
        t.finish_checkpoints().unwrap();
    });
    format!("{}/step-{:08}", root.display(), 3)
}

/// A step's (loss, itc KL, caption KL, feature distance, ICL).
type Terms = (f64, f64, f64, f64, f64);

/// Every term of every step of `other` within 1e-4 relative of one process's `one`.
/// Tolerance as in parallel_parity (f32: a layout reorders sums only; measured ~1e-7
/// relative; a dropped micro-batch, a missing term or a wrong gradient moves the loss by
/// 1e-2 or more).
fn assert_same(one: &[Terms], other: &[Terms], layout: &str) {
    assert_eq!(one.len(), other.len());
    for (s, (a, b)) in one.iter().zip(other).enumerate() {
        for (x, y, what) in [
            (a.0, b.0, "loss"),
            (a.1, b.1, "itc KL"),
            (a.2, b.2, "caption KL"),
            (a.3, b.3, "feature distance"),
            (a.4, b.4, "ICL"),
        ] {
            let rel = (x - y).abs() / x.abs().max(1e-12);
            assert!(
                rel < 1e-4,
                "step {}: {what} one process {x} vs {layout} {y}",
                s + 1
            );
        }
    }
}

fn student(tp: usize, pp: usize, dp: usize, teacher: &str, extra: &[&str]) -> JobConfig {
    let mut o = vec![
        format!("distill.teacher=\"{teacher}\""),
        "distill.temperature=2.0".into(),
        "distill.itc_kl_weight=1.0".into(),
        "distill.caption_kl_weight=0.5".into(),
        "distill.feature_weight=0.3".into(),
        "distill.icl_weight=0.7".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    common::job(tp, pp, dp, "1f1b", 1, &o)
}

/// Per step: (loss, itc KL, caption KL, feature distance, ICL) of rank 0 (every rank
/// holding a teacher checks that it kept its weights bitwise).
fn run(job: &JobConfig, dir: &Path) -> Vec<Terms> {
    run_counting(job, dir).0
}

/// [`run`], and how many of the teacher's parameter elements each rank holding it holds
/// (all the same).
fn run_counting(job: &JobConfig, dir: &Path) -> (Vec<Terms>, i64) {
    let out = common::on_ranks(job, dir, |_, mut t| {
        let before: Option<Vec<(String, tch::Tensor)>> = t.teacher().map(|te| {
            te.params()
                .into_iter()
                .map(|(n, p)| (n, p.detach().copy()))
                .collect()
        });
        let mut rows = Vec::new();
        for _ in 0..STEPS {
            let m = t.train_step().unwrap();
            let d = m.distill.expect("a distillation job reports its terms");
            rows.push((
                m.loss,
                d.distill_itc_kl,
                d.distill_caption_kl,
                d.distill_feature,
                d.distill_icl,
            ));
        }
        if let (Some(before), Some(te)) = (before, t.teacher()) {
            for ((name, a), (_, b)) in before.iter().zip(te.params()) {
                assert!(a.equal(&b), "the teacher's {name} changed while distilling");
                assert!(!b.requires_grad(), "the teacher's {name} requires grad");
            }
        }
        let held: Option<i64> = t
            .teacher()
            .map(|te| te.params().iter().map(|(_, p)| p.numel() as i64).sum());
        (rows, held)
    });
    let held: Vec<i64> = out.iter().filter_map(|(_, n)| *n).collect();
    let holders = held.len();
    let p = &job.parallel;
    assert_eq!(
        holders,
        p.dp * p.tp,
        "the teacher lives on every rank of the last stage only"
    );
    assert!(
        held.iter().all(|&n| n == held[0]),
        "every holder holds as much of the teacher: {held:?}"
    );
    for (r, (rows, _)) in out.iter().enumerate() {
        assert_eq!(rows, &out[0].0, "rank {r} reports other losses than rank 0");
    }
    (out[0].0.clone(), held[0])
}

#[test]
fn parallel_distillation_equals_one_process_and_keeps_the_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher(dir.path());
    let job = student(1, 2, 2, &url, &[]);
    let one = run(&collapse(job.clone()), dir.path());
    let par = run(&job, dir.path());
    assert_same(&one, &par, "pp 2 × dp 2");
    // The terms are real: positive KLs (the student is not the teacher), which the student
    // reduces as it trains.
    assert!(
        one.iter()
            .all(|r| r.1 > 0.0 && r.2 > 0.0 && r.3 > 0.0 && r.4 > 0.0),
        "{one:?}"
    );
    eprintln!("one process vs pp 2 × dp 2, per step (loss, itc KL, caption KL, feature, ICL): {one:?} / {par:?}");
    // The distillation terms enter the loss: the same student without a teacher has a
    // lower total by exactly the weighted terms' size at step 1 (same initial weights and
    // batch), to f32 precision.
    let plain = common::job(1, 1, 1, "1f1b", 1, &[]);
    let plain = common::on_ranks(&collapse(plain), dir.path(), |_, mut t| {
        t.train_step().unwrap().loss
    })[0];
    let want = plain + 1.0 * one[0].1 + 0.5 * one[0].2 + 0.3 * one[0].3 + 0.7 * one[0].4;
    assert!(
        (one[0].0 - want).abs() < 1e-4 * want,
        "step 1: distilled loss {} vs plain {plain} + weighted terms = {want}",
        one[0].0
    );
}

/// Full recomputation reruns only the student's layers in the backward (the teacher's
/// outputs of the forward are kept): pp 2 with `recompute = "full"` trains as one process
/// without recomputation, terms and all.
#[test]
fn full_recomputation_distills_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher(dir.path());
    let one = run(&collapse(student(1, 1, 1, &url, &[])), dir.path());
    let full = run(
        &student(1, 2, 1, &url, &["parallel.recompute=\"full\""]),
        dir.path(),
    );
    assert_same(&one, &full, "pp 2 with full recomputation");
}

/// Tensor parallelism: the student's caption logits are split over the vocabulary, and the
/// caption KL is computed vocab-parallel over the group; the teacher is split over the
/// group too (`distill.teacher_tp` 0, the default: each rank holds about half of it and
/// runs its forward tensor-parallel) or whole on every rank (`teacher_tp = 1`).
/// tp 2 (both ways), tp 2 × pp 2 and tp 2 with sequence parallelism train as one process,
/// every term.
#[test]
fn tensor_parallel_distillation_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher(dir.path());
    let (one, whole) = run_counting(&collapse(student(1, 1, 1, &url, &[])), dir.path());
    let (tp2, half) = run_counting(&student(2, 1, 1, &url, &[]), dir.path());
    assert_same(&one, &tp2, "tp 2, the teacher split over the group");
    // Split: the linear layers and the vocabulary are halved; what stays replicated (layer
    // norms, biases of row-parallel layers, positions, the projections to the embedding,
    // the temperature) is a few per cent of this teacher.
    eprintln!("teacher elements per rank: whole {whole}, split over tp 2: {half}");
    assert!(
        2 * half < whole * 11 / 10 && half < whole,
        "a teacher split over tp 2 holds {half} of its {whole} elements per rank"
    );
    let (rep, replicated) = run_counting(
        &student(2, 1, 1, &url, &["distill.teacher_tp=1"]),
        dir.path(),
    );
    assert_same(&one, &rep, "tp 2, the teacher replicated");
    assert_eq!(
        replicated, whole,
        "a replicated teacher is whole on every rank"
    );
    let tp2pp2 = run(&student(2, 2, 1, &url, &[]), dir.path());
    assert_same(&one, &tp2pp2, "tp 2 × pp 2");
    // Sequence parallelism: the decoder's states are sequence shards, the caption logits
    // (gathered by the student's loss) are not.
    let sp = run(
        &student(2, 1, 1, &url, &["parallel.sequence_parallel=true"]),
        dir.path(),
    );
    assert_same(&one, &sp, "tp 2 with sequence parallelism");
}

#[test]
fn distillation_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher(dir.path());
    let ckpt = dir.path().join("ckpt");
    let job = with_ckpt(student(1, 2, 1, &url, &[]), &ckpt);
    let sink = committer(&job);
    let full = common::on_ranks(&job, dir.path(), move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        let mut losses = Vec::new();
        for _ in 0..STEPS {
            losses.push(t.train_step().unwrap().loss);
            if t.step() == 2 {
                t.save_checkpoint().unwrap();
            }
        }
        t.finish_checkpoints().unwrap();
        losses
    })[0]
        .clone();
    let at = format!("{}/step-{:08}", ckpt.display(), 2);
    let rest = common::on_ranks(&job, dir.path(), move |_, mut t| {
        let c = open_resume(&at, &t.job().checkpoint.url).unwrap();
        assert_eq!(t.resume(c).unwrap(), 2);
        (0..STEPS - 2)
            .map(|_| t.train_step().unwrap().loss)
            .collect::<Vec<f64>>()
    })[0]
        .clone();
    assert_eq!(
        &full[2..],
        &rest[..],
        "losses after resuming must equal the uninterrupted run's"
    );
}

#[test]
fn bad_keys_are_refused_and_every_layout_accepted() {
    let t = "distill.teacher=\"/nowhere\"";
    let parse = |extra: &[&str], tp: usize| {
        let mut o: Vec<String> = vec![t.into(), format!("parallel.tp={tp}")];
        o.extend(extra.iter().map(|s| s.to_string()));
        let text = common::job(1, 1, 1, "1f1b", 1, &[]).to_toml();
        JobConfig::parse(&text, &o).map_err(|e| e.to_string())
    };
    let err = |extra: &[&str], tp: usize| parse(extra, tp).unwrap_err();
    // Tensor parallelism is supported (the caption KL is vocab-parallel).
    assert!(parse(&[], 2).is_ok(), "{:?}", parse(&[], 2).err());
    assert!(err(
        &[
            "distill.itc_kl_weight=0",
            "distill.caption_kl_weight=0",
            "distill.feature_weight=0",
            "distill.icl_weight=0"
        ],
        1
    )
    .contains("every distillation weight is 0"));
    assert!(err(&["distill.icl_weight=-1"], 1).contains("icl_weight"));
    assert!(err(&["distill.temperature=0"], 1).contains("temperature"));
    // A teacher group must be whole student groups of replicas that divide dp, and holds no
    // caption KL across replicas.
    let with_dp2 = |extra: &[&str], tp: usize| {
        let mut e = vec!["parallel.dp=2"];
        e.extend_from_slice(extra);
        parse(&e, tp)
    };
    assert!(with_dp2(&["distill.teacher_tp=3"], 1)
        .unwrap_err()
        .contains("teacher_tp"));
    assert!(with_dp2(&["distill.teacher_tp=4"], 1)
        .unwrap_err()
        .contains("parallel.dp"));
    assert!(with_dp2(
        &["distill.teacher_tp=2", "distill.caption_kl_weight=0.5"],
        1
    )
    .unwrap_err()
    .contains("caption"));
    assert!(with_dp2(&["distill.teacher_tp=4"], 2).is_ok());
    assert!(err(&["distill.teacher_tp=\"all\""], 1).contains("distill.teacher_tp"));
    // A teacher that does not exist is a clear error naming the key.
    let job = student(1, 1, 1, "/nowhere/at/all", &[]);
    let e = weaver_worker::parallel::ParallelTrainer::solo(
        job,
        tempfile::tempdir().unwrap().path().into(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("distill.teacher"), "{e}");
}

/// A teacher whose heads the student's tp does not divide (3 heads, tp 2) cannot be split
/// over the group: a clear error naming `distill.teacher_tp`; whole on every rank
/// (`teacher_tp = 1`), it distills as one process.
#[test]
fn a_teacher_tp_cannot_split_is_refused_or_replicated() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher_with(
        dir.path(),
        "odd",
        &["model.vision_heads=3", "model.text_heads=3"],
    );
    let job = student(2, 1, 1, &url, &[]);
    let errs = common::try_on_ranks(&job, dir.path(), |_, t| {
        t.map(|_| ()).err().map(|e| e.to_string())
    });
    let msg = errs
        .into_iter()
        .flatten()
        .next()
        .expect("splitting a 3-head teacher over tp 2 fails");
    assert!(
        msg.contains("teacher_tp") && msg.contains("does not divide"),
        "{msg}"
    );
    let one = run(&collapse(student(1, 1, 1, &url, &[])), dir.path());
    let rep = run(
        &student(2, 1, 1, &url, &["distill.teacher_tp=1"]),
        dir.path(),
    );
    assert_same(&one, &rep, "tp 2, a 3-head teacher replicated");
}

/// The teacher split over more ranks than the student's tensor parallelism
/// (`distill.teacher_tp` larger than `parallel.tp`): over the last-stage groups of several
/// data-parallel replicas, which gather their micro-batches and run them through it
/// together. dp 2 (teacher over 2 ranks), tp 2 × dp 2 (over 4) and pp 2 × dp 2 (over the
/// 2 last-stage ranks) train as one process, every term; each rank holds about `1/k` of the
/// teacher. (No caption KL across replicas: refused, see the bad-keys test.)
#[test]
fn a_teacher_split_across_replicas_distills_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let url = teacher(dir.path());
    let no_caption = "distill.caption_kl_weight=0";
    let (one, whole) = run_counting(&collapse(student(1, 1, 1, &url, &[no_caption])), dir.path());
    for (tp, pp, dp, k) in [(1, 1, 2, 2), (2, 1, 2, 4), (1, 2, 2, 2)] {
        let tk = format!("distill.teacher_tp={k}");
        let job = student(tp, pp, dp, &url, &[no_caption, &tk]);
        let (got, held) = run_counting(&job, dir.path());
        let what = format!("tp {tp} × pp {pp} × dp {dp}, the teacher over {k} ranks");
        assert_same(&one, &got, &what);
        eprintln!("{what}: {held} of the teacher's {whole} elements per rank");
        assert!(
            (k as i64) * held < whole * 12 / 10 && held < whole,
            "{what}: {held} of {whole} elements per rank"
        );
    }
}
