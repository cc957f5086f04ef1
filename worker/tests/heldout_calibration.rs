//! `weaver ckpt quantize`'s calibration pass on held-out shards (issue 15 item 2): a job
//! that trains on shards calibrates on `data.eval_shards`' samples after the evaluation
//! pool (the binary passes [`heldout_shards`] to `weaver_compress::quantize_with`, as
//! here); without held-out shards it is refused with the key to set.

use tch::{Device, Kind};
use weaver_checkpoint::{block_on, commit, CkptStore, Layout, SavedTensor, ShardWriter};
use weaver_compress::{CompressError, QuantizeOptions, Scheme};
use weaver_models::data::Batch;
use weaver_models::nn::ParamStore;
use weaver_models::{JobConfig, Model};
use weaver_parallel::tp::TpPos;
use weaver_worker::eval::EvalPool;
use weaver_worker::heldout::heldout_shards;

mod common;
use common::write_shards;

/// A debug-flavor job on the shards of `dir` (20 held-out samples), evaluating on 8.
fn job(dir: &std::path::Path, held_out: bool) -> JobConfig {
    let (train, held) = (dir.join("train"), dir.join("held"));
    write_shards(&train, "train", 2, 0);
    write_shards(&held, "held", 2, 1000);
    let mut o = vec![
        "eval.pool=8".to_string(),
        "data.source=\"shards\"".into(),
        format!("data.shards=\"{}\"", train.display()),
        "data.workers=1".into(),
        "data.streams=1".into(),
    ];
    if held_out {
        o.push(format!("data.eval_shards=\"{}\"", held.display()));
    }
    JobConfig::parse("[model]\nflavor = \"debug\"\n[train]\nseed = 3\n", &o).unwrap()
}

/// A float checkpoint of `job`'s freshly built model, with the job's config.
fn float_checkpoint(job: &JobConfig, root: &str) -> String {
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
    Model::new(
        &mut store,
        &job.model,
        0..Model::num_layers(&job.model),
        TpPos::SINGLE,
        0,
    )
    .unwrap();
    let mut saved: Vec<SavedTensor> = store
        .params()
        .iter()
        .map(|p| SavedTensor::whole(p.name.clone(), p.tensor.detach().contiguous()))
        .collect();
    saved.push(SavedTensor::from_bytes(
        weaver_compress::load::CONFIG,
        job.to_toml().as_bytes(),
    ));
    let s = CkptStore::open(root).unwrap();
    let report = ShardWriter::new(&s)
        .start(1, 0, saved)
        .unwrap()
        .wait()
        .unwrap();
    block_on(commit(&s, 1, Layout::new(1, 1, 1), vec![report])).unwrap();
    format!("{root}/{}", weaver_checkpoint::manifest::step_dir(1))
}

/// What the binary passes to `quantize_with`.
fn shards(
    job: &JobConfig,
    samples: usize,
    batch: usize,
) -> weaver_compress::Result<Box<dyn Iterator<Item = weaver_compress::Result<Batch>>>> {
    let heldout = |e: weaver_worker::error::WorkerError| CompressError::Heldout(e.to_string());
    let batches = heldout_shards(job, samples, batch).map_err(heldout)?;
    Ok(Box::new(batches.map(move |b| b.map_err(heldout))))
}

#[test]
fn calibration_reads_the_held_out_shards_after_the_evaluation_pool() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), true);

    // The held-out order, as evaluation reads it: the pool is its first 8 samples.
    let data = weaver_worker::train::dataset(&job).unwrap();
    let pool = EvalPool::for_job(&job, &data, 1).unwrap().unwrap();
    let all = pool
        .chunks(20, 20, Device::Cpu, |_| 0..1)
        .unwrap()
        .batches
        .remove(0);
    // Calibration reads the samples after it: in whole batches, or in batches cut where
    // the pool ends and where the samples asked for end (the last 12 end with the shards,
    // in a batch of 8 whose other half would be read again).
    for (samples, batch, batches) in [(8, 4, 2), (6, 3, 3), (12, 8, 2)] {
        let got: Vec<Batch> = heldout_shards(&job, samples, batch)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            got.len(),
            batches,
            "{samples} samples in batches of {batch}"
        );
        let cat = |f: fn(&Batch) -> &tch::Tensor| {
            tch::Tensor::cat(&got.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let (images, tokens) = (cat(|b| &b.images), cat(|b| &b.tokens));
        assert!(
            images.equal(&all.images.narrow(0, 8, samples as i64)),
            "{samples} in batches of {batch}: other images than the held-out samples 8..{}",
            8 + samples
        );
        assert!(
            tokens.equal(&all.tokens.narrow(0, 8, samples as i64)),
            "{samples} in batches of {batch}: other captions than the held-out samples 8..{}",
            8 + samples
        );
    }
    // 20 held-out samples cannot give 8 + 16: an error that names the flag.
    let err = heldout_shards(&job, 16, 4)
        .unwrap()
        .find_map(|b| b.err())
        .expect("the held-out shards ran out");
    assert!(err.to_string().contains("--calibrate"), "{err}");

    // Quantizing a checkpoint of the job calibrates on them.
    let root = dir.path().display().to_string();
    let src = float_checkpoint(&job, &format!("{root}/float"));
    let opts = QuantizeOptions {
        calibration_samples: 8,
        batch: 4,
        ..QuantizeOptions::new(Scheme::Int8Dynamic)
    };
    let r = weaver_compress::quantize_with(&src, &format!("{root}/q"), &job, &opts, Some(&shards))
        .unwrap();
    assert_eq!(r.info.calibration_samples, 8);
    assert_eq!(r.info.smooth_alpha, Some(0.5));
    // The synthetic held-out split is not this job's data: without the shards' reader the
    // library refuses rather than calibrating on it.
    match weaver_compress::quantize(&src, &format!("{root}/q2"), &job, &opts) {
        Err(CompressError::BadOption { key, .. }) => assert_eq!(key, "--calibrate"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_shard_job_without_held_out_shards_is_told_to_set_them() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path(), false);
    let root = dir.path().display().to_string();
    let src = float_checkpoint(&job, &format!("{root}/float"));
    let opts = QuantizeOptions {
        calibration_samples: 8,
        batch: 4,
        ..QuantizeOptions::new(Scheme::Int8Dynamic)
    };
    match weaver_compress::quantize_with(&src, &format!("{root}/q"), &job, &opts, Some(&shards)) {
        Err(CompressError::BadOption { key, message }) => {
            assert_eq!(key, "--calibrate");
            assert!(message.contains("data.eval_shards"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
