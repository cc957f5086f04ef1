//! Sharded batch inference (`weaver_worker::infer`): its outputs are the model's own
//! forward (embeddings) and `Model::generate` (captions) on the same images, on synthetic and
//! on packed shards, on the whole model and on tensor/pipeline layouts; a committed shard is
//! never recomputed; a corrupt input shard and an unwritable output fail by name.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Tensor};
use weaver_data::image::{encode_jpeg, encode_png, test_pattern};
use weaver_data::tar::TarWriter;
use weaver_models::data::Split;
use weaver_models::model::decode::GenerateOptions;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_parallel::tp::NoTp;
use weaver_worker::infer::{decode_embeddings, run_solo, InferError, InferRank, ShardDone};
use weaver_worker::parallel::ParallelTrainer;

/// A `debug` model trained 2 steps, checkpointed under `dir/ck`: its job and URL.
fn trained(dir: &Path) -> (JobConfig, String) {
    trained_with(dir, &[])
}

/// [`trained`] with more settings.
fn trained_with(dir: &Path, extra: &[&str]) -> (JobConfig, String) {
    let url = dir.join("ck");
    let mut sets = vec!["train.steps=2".to_string()];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let job = common::with_ckpt(common::job(1, 1, 1, "1f1b", 1, &sets), &url);
    let mut t = ParallelTrainer::solo(job.clone(), dir.join("run"), false).unwrap();
    t.enable_checkpoints(common::committer(&job)).unwrap();
    t.run().unwrap();
    (job, url.display().to_string())
}

fn infer_job(base: &JobConfig, ckpt: &str, out: &Path, extra: &[String]) -> JobConfig {
    let mut sets = vec![
        format!("infer.checkpoint=\"{ckpt}\""),
        format!("infer.out=\"{}\"", out.display()),
        "checkpoint.url=\"\"".into(),
        "infer.batch=5".into(),
    ];
    sets.extend(extra.iter().cloned());
    JobConfig::parse(&base.to_toml(), &sets).unwrap()
}

fn run(job: &JobConfig) -> Result<Vec<ShardDone>, InferError> {
    let mut done = Vec::new();
    run_solo(job, &|| false, &mut |d| done.push(d.clone()))?;
    Ok(done)
}

/// The checkpoint's model, whole, as `weaver_compress` loads it.
fn model(job: &JobConfig, ckpt: &str) -> weaver_compress::Loaded {
    weaver_compress::load(ckpt, job, &weaver_compress::LoadOptions::cpu()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn synthetic_embeddings_and_captions_are_the_models_own() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ckpt) = trained(dir.path());
    let out = dir.path().join("emb");
    let job = infer_job(
        &base,
        &ckpt,
        &out,
        &[
            "infer.synthetic_shards=3".into(),
            "infer.shard_size=7".into(),
        ],
    );
    let done = run(&job).unwrap();
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|d| !d.skipped && d.samples == 7));
    let loaded = model(&job, &ckpt);
    let data = weaver_worker::train::dataset(&loaded.job).unwrap();
    for k in 0..3u64 {
        let bytes = std::fs::read(out.join(format!("synthetic-{k:05}.safetensors"))).unwrap();
        let (keys, ie, te) = decode_embeddings(&bytes).unwrap();
        let idx: Vec<u64> = (k * 7..k * 7 + 7).collect();
        assert_eq!(
            keys,
            idx.iter().map(|i| format!("{i:08}")).collect::<Vec<_>>()
        );
        let batch = data.batch(Split::Heldout, &idx, Device::Cpu).unwrap();
        let (want_i, want_t) = tch::no_grad(|| loaded.model.embeddings(&batch)).unwrap();
        assert_eq!(ie.size(), want_i.size());
        assert!(
            max_diff(&ie, &want_i) < 1e-5,
            "image embeddings of shard {k}"
        );
        assert!(
            max_diff(&te, &want_t) < 1e-5,
            "text embeddings of shard {k}"
        );
        assert!(out
            .join(format!("_progress/synthetic-{k:05}.json"))
            .is_file());
    }
    // A second run finds every shard committed and computes nothing.
    let again = run(&job).unwrap();
    assert!(again.iter().all(|d| d.skipped), "{again:?}");

    // Captions: greedy and beam search equal Model::generate on the same images.
    for beam in [1usize, 2] {
        let out = dir.path().join(format!("cap{beam}"));
        let job = infer_job(
            &base,
            &ckpt,
            &out,
            &[
                "infer.task=\"caption\"".into(),
                "infer.synthetic_shards=2".into(),
                "infer.shard_size=4".into(),
                format!("infer.beam={beam}"),
                "infer.max_new_tokens=6".into(),
            ],
        );
        run(&job).unwrap();
        let tok = data.tokenizer.as_ref();
        let opts = GenerateOptions {
            beam,
            ..GenerateOptions::greedy(6, tok.bos_id(), tok.eos_id())
        };
        for k in 0..2u64 {
            let idx: Vec<u64> = (k * 4..k * 4 + 4).collect();
            let batch = data.batch(Split::Heldout, &idx, Device::Cpu).unwrap();
            let g = loaded
                .model
                .generate(&mut NoTp, &batch.images, &opts)
                .unwrap();
            let text =
                std::fs::read_to_string(out.join(format!("synthetic-{k:05}.jsonl"))).unwrap();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 4);
            for ((l, ids), i) in lines.iter().zip(&g.tokens).zip(&idx) {
                assert_eq!(l["key"], format!("{i:08}"));
                assert_eq!(l["caption"], tok.decode(ids), "beam {beam}, sample {i}");
            }
        }
    }
}

const COLORS: [&str; 3] = ["red", "green", "blue"];

/// `shards` shards of ten samples (JPEG and PNG images of several sizes).
fn write_shards(dir: &Path, shards: u64) {
    std::fs::create_dir_all(dir).unwrap();
    for s in 0..shards {
        let f = std::fs::File::create(dir.join(format!("part-{s}.tar"))).unwrap();
        let mut tw = TarWriter::new(f);
        for i in 0..10u64 {
            let n = s * 10 + i;
            let img = test_pattern(40 + 3 * i as u32, 36, n);
            let key = format!("{n:05}");
            if n.is_multiple_of(2) {
                tw.append(&format!("{key}.jpg"), &encode_jpeg(&img, 90).unwrap())
                    .unwrap();
            } else {
                tw.append(&format!("{key}.png"), &encode_png(&img).unwrap())
                    .unwrap();
            }
            let caption = format!("a small {} circle", COLORS[(n % 3) as usize]);
            tw.append(&format!("{key}.txt"), caption.as_bytes())
                .unwrap();
        }
        tw.finish().unwrap();
    }
}

#[test]
fn packed_shard_embeddings_match_the_eval_loaders_images() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ckpt) = trained(dir.path());
    let shards = dir.path().join("shards");
    write_shards(&shards, 3);
    let out = dir.path().join("out");
    let job = infer_job(
        &base,
        &ckpt,
        &out,
        &[
            "data.source=\"shards\"".into(),
            format!("data.shards=\"{}\"", shards.display()),
            "data.workers=1".into(),
        ],
    );
    let done = run(&job).unwrap();
    assert_eq!(done.len(), 3);
    let mut got = std::collections::BTreeMap::new();
    for s in 0..3 {
        let bytes = std::fs::read(out.join(format!("part-{s}.safetensors"))).unwrap();
        let (keys, ie, te) = decode_embeddings(&bytes).unwrap();
        assert_eq!(keys.len(), 10);
        for (r, k) in keys.iter().enumerate() {
            got.insert(k.clone(), (ie.get(r as i64), te.get(r as i64)));
        }
    }
    // The same samples through the data crate's loader (evaluation mode: centre crops, no
    // shuffle), embedded by the loaded model.
    let loaded = model(&job, &ckpt);
    let data = weaver_worker::train::dataset(&loaded.job).unwrap();
    let mut cfg = weaver_worker::data::loader_config(&loaded.job, &data, 1).unwrap();
    cfg.train = false;
    cfg.streams = 1;
    cfg.shuffle_buffer = 1;
    cfg.global_batch = 30;
    cfg.prefetch = 1;
    let place = weaver_data::source::RankPlace {
        dp: weaver_data::loader::DpRank { dp: 1, rank: 0 },
        microbatches: 1,
        writes_position: false,
    };
    let mut source =
        weaver_data::source::ShardSource::start(cfg, place, Device::Cpu, None).unwrap();
    use weaver_data::source::BatchSource;
    let step = source.next_step().unwrap();
    let batch = &step.micro[0];
    let (want_i, want_t) = tch::no_grad(|| loaded.model.embeddings(batch)).unwrap();
    assert_eq!(step.keys.len(), 30);
    for (r, k) in step.keys.iter().enumerate() {
        let (ie, te) = &got[k];
        assert!(
            max_diff(ie, &want_i.get(r as i64)) < 1e-5,
            "image embedding of {k}"
        );
        assert!(
            max_diff(te, &want_t.get(r as i64)) < 1e-5,
            "text embedding of {k}"
        );
    }
}

#[test]
fn bad_input_and_unwritable_output_fail_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ckpt) = trained(dir.path());
    let shards = dir.path().join("shards");
    write_shards(&shards, 2);
    // A shard whose third sample's image is not an image.
    let bad = shards.join("part-1.tar");
    let mut tw = TarWriter::new(std::fs::File::create(&bad).unwrap());
    for i in 0..4 {
        let key = format!("b{i}");
        let img = if i == 2 {
            b"not an image".to_vec()
        } else {
            encode_png(&test_pattern(32, 32, i)).unwrap()
        };
        tw.append(&format!("{key}.png"), &img).unwrap();
        tw.append(&format!("{key}.txt"), b"a red circle").unwrap();
    }
    tw.finish().unwrap();
    let data = [
        "data.source=\"shards\"".to_string(),
        format!("data.shards=\"{}\"", shards.display()),
    ];
    let out = dir.path().join("out");
    let err = run(&infer_job(&base, &ckpt, &out, &data)).unwrap_err();
    match &err {
        InferError::BadInput { shard, message } => {
            assert!(shard.ends_with("part-1.tar"), "{err}");
            assert!(message.contains("b2"), "{err}");
        }
        other => panic!("expected BadInput, got {other}"),
    }
    // The good shard before it stays committed.
    assert!(out.join("_progress/part-0.json").is_file());
    assert!(!out.join("_progress/part-1.json").exists());

    // An output location under a regular file cannot be written: refused before any work.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = run(&infer_job(&base, &ckpt, &file.join("out"), &[])).unwrap_err();
    match &err {
        InferError::Output { object, .. } => assert!(object.contains("a-file"), "{err}"),
        other => panic!("expected Output, got {other}"),
    }
}

/// A shard of ten samples (keys `00000`..`00009`, as `write_shards`' first shard) in which
/// the samples `corrupt` hold a JPEG cut off in its headers and the samples `uncaptioned`
/// have no caption; the samples `drop` are left out altogether.
fn write_damaged_shard(path: &Path, corrupt: &[u64], uncaptioned: &[u64], drop: &[u64]) {
    let mut tw = TarWriter::new(std::fs::File::create(path).unwrap());
    for n in 0..10u64 {
        if drop.contains(&n) {
            continue;
        }
        let key = format!("{n:05}");
        let jpeg = encode_jpeg(&test_pattern(40 + 3 * n as u32, 36, n), 90).unwrap();
        let jpeg = if corrupt.contains(&n) {
            jpeg[..40].to_vec()
        } else {
            jpeg
        };
        tw.append(&format!("{key}.jpg"), &jpeg).unwrap();
        if !uncaptioned.contains(&n) {
            let caption = format!("a small {} circle", COLORS[(n % 3) as usize]);
            tw.append(&format!("{key}.txt"), caption.as_bytes())
                .unwrap();
        }
    }
    tw.finish().unwrap();
}

/// Bad samples (a corrupt JPEG; embeddings of a sample without a caption) are left out
/// under `data.max_bad_fraction`, recorded in the shard's marker and counted; the other
/// samples' outputs are those of a shard without them; past the bound the shard fails,
/// naming the samples.
#[test]
fn bad_samples_are_skipped_recorded_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ckpt) = trained(dir.path());
    let damaged = dir.path().join("damaged");
    let clean = dir.path().join("clean");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::create_dir_all(&clean).unwrap();
    write_damaged_shard(&damaged.join("part-0.tar"), &[3], &[7], &[]);
    write_damaged_shard(&clean.join("part-0.tar"), &[], &[], &[3, 7]);
    let data = |d: &Path, bound: &str| {
        vec![
            "data.source=\"shards\"".to_string(),
            format!("data.shards=\"{}\"", d.display()),
            format!("data.max_bad_fraction={bound}"),
        ]
    };
    // 2 of 10 bad: within 0.2.
    let out = dir.path().join("out");
    let done = run(&infer_job(&base, &ckpt, &out, &data(&damaged, "0.2"))).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].samples, done[0].bad_samples), (8, 2), "{done:?}");
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("_progress/part-0.json")).unwrap()).unwrap();
    let skipped = marker["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 2, "{marker}");
    assert_eq!(skipped[0]["key"], "00003");
    assert!(
        skipped[0]["reason"].as_str().unwrap().contains("JPEG"),
        "{marker}"
    );
    assert_eq!(skipped[1]["key"], "00007");
    assert!(
        skipped[1]["reason"].as_str().unwrap().contains("caption"),
        "{marker}"
    );
    let want_out = dir.path().join("want");
    run(&infer_job(&base, &ckpt, &want_out, &data(&clean, "0.2"))).unwrap();
    let (gk, gi, gt) =
        decode_embeddings(&std::fs::read(out.join("part-0.safetensors")).unwrap()).unwrap();
    let (wk, wi, wt) =
        decode_embeddings(&std::fs::read(want_out.join("part-0.safetensors")).unwrap()).unwrap();
    assert_eq!(gk, wk);
    assert!(max_diff(&gi, &wi) < 1e-5 && max_diff(&gt, &wt) < 1e-5);

    // Captions need no caption: only the corrupt JPEG is bad, 1 of 10, within 0.1.
    let cap = dir.path().join("cap");
    let mut sets = data(&damaged, "0.1");
    sets.extend([
        "infer.task=\"caption\"".into(),
        "infer.max_new_tokens=4".into(),
    ]);
    let done = run(&infer_job(&base, &ckpt, &cap, &sets)).unwrap();
    assert_eq!((done[0].samples, done[0].bad_samples), (9, 1), "{done:?}");
    let lines = std::fs::read_to_string(cap.join("part-0.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 9);
    assert!(!lines.contains("\"00003\""), "{lines}");

    // 2 of 10 bad is past 0.1: the shard fails naming both samples, and is not committed.
    let out = dir.path().join("strict");
    let err = run(&infer_job(&base, &ckpt, &out, &data(&damaged, "0.1"))).unwrap_err();
    match &err {
        InferError::BadInput { shard, message } => {
            assert!(shard.ends_with("part-0.tar"), "{err}");
            assert!(
                message.contains("00003") && message.contains("00007"),
                "{err}"
            );
            assert!(message.contains("data.max_bad_fraction"), "{err}");
        }
        other => panic!("expected BadInput, got {other}"),
    }
    assert!(!out.join("_progress/part-0.json").exists());
}

/// Embeddings on tensor- and pipeline-parallel layouts (each rank its slices of the
/// checkpoint, forward-only through the pipeline) equal the whole model's.
#[test]
fn layout_embeddings_equal_the_whole_models() {
    let dir = tempfile::tempdir().unwrap();
    let (base, ckpt) = trained(dir.path());
    let synth = [
        "infer.synthetic_shards=3".to_string(),
        "infer.shard_size=6".into(),
    ];
    let whole = dir.path().join("whole");
    run(&infer_job(&base, &ckpt, &whole, &synth)).unwrap();
    for (tp, pp, dp) in [(2usize, 1usize, 1usize), (1, 2, 2)] {
        let out = dir.path().join(format!("tp{tp}pp{pp}dp{dp}"));
        let mut sets = synth.to_vec();
        sets.extend([
            format!("parallel.tp={tp}"),
            format!("parallel.pp={pp}"),
            format!("parallel.dp={dp}"),
            "parallel.microbatches=1".into(),
        ]);
        let job = infer_job(&base, &ckpt, &out, &sets);
        run_layout(&job, tp * pp * dp);
        for k in 0..3 {
            let name = format!("synthetic-{k:05}.safetensors");
            let (wk, wi, wt) =
                decode_embeddings(&std::fs::read(whole.join(&name)).unwrap()).unwrap();
            let (gk, gi, gt) = decode_embeddings(&std::fs::read(out.join(&name)).unwrap()).unwrap();
            assert_eq!(wk, gk);
            assert!(
                max_diff(&wi, &gi) < 1e-5,
                "tp {tp} pp {pp}: image embeddings of {name}"
            );
            assert!(
                max_diff(&wt, &gt) < 1e-5,
                "tp {tp} pp {pp}: text embeddings of {name}"
            );
        }
    }
}

/// Runs `job` on `world` ranks (threads over TCP), every rank to the end.
fn run_layout(job: &JobConfig, world: usize) {
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.addr();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let job = job.clone();
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(
                        store,
                        "inf",
                        rank,
                        world,
                        "127.0.0.1",
                        Duration::from_secs(60),
                    )
                    .unwrap(),
                );
                let mut r = InferRank::new(&job, comm).unwrap();
                r.run(&|| false, &mut |_| {}).unwrap()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(server);
}

/// Captions on tensor- and pipeline-parallel layouts (each tensor rank its heads' share
/// of the key/value caches, each stage its layers' caches, the text states passed stage to
/// stage and the chosen candidates broadcast back) are the whole model's, token for token,
/// greedy and beam search.
#[test]
fn layout_captions_equal_the_whole_models() {
    let dir = tempfile::tempdir().unwrap();
    // Trained long enough that the captions depend on the image (after two steps every
    // image gets the same caption, which would not show a lost image memory).
    let (base, ckpt) = trained_with(dir.path(), &["train.steps=60", "train.lr=5e-3"]);
    for beam in [1usize, 3] {
        let sets = [
            "infer.task=\"caption\"".to_string(),
            "infer.synthetic_shards=2".into(),
            "infer.shard_size=5".into(),
            "infer.max_new_tokens=10".into(),
            format!("infer.beam={beam}"),
        ];
        let whole = dir.path().join(format!("whole-b{beam}"));
        run(&infer_job(&base, &ckpt, &whole, &sets)).unwrap();
        let first = std::fs::read_to_string(whole.join("synthetic-00000.jsonl")).unwrap();
        // The decoded captions differ from sample to sample: the test sees real decoding.
        let distinct: std::collections::BTreeSet<String> = first
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["caption"].to_string())
            .collect();
        assert!(distinct.len() > 1, "beam {beam}: {first}");
        for (tp, pp) in [(2usize, 1usize), (1, 2), (2, 2)] {
            let out = dir.path().join(format!("tp{tp}pp{pp}b{beam}"));
            let mut s = sets.to_vec();
            s.extend([
                format!("parallel.tp={tp}"),
                format!("parallel.pp={pp}"),
                "parallel.dp=1".into(),
                "parallel.microbatches=1".into(),
            ]);
            run_layout(&infer_job(&base, &ckpt, &out, &s), tp * pp);
            for k in 0..2 {
                let name = format!("synthetic-{k:05}.jsonl");
                let want = std::fs::read_to_string(whole.join(&name)).unwrap();
                let got = std::fs::read_to_string(out.join(&name)).unwrap();
                assert_eq!(got, want, "tp {tp} pp {pp} beam {beam}: {name}");
            }
        }
    }
}
