//! Training on WebDataset shards through the trainer: a checkpoint saved at dp = 4 resumes at
//! dp = 2 with exactly the samples the uninterrupted run used (the keys of every step are
//! logged and compared), and the data counters reach the step metrics.

mod common;

use common::committer;
use std::collections::BTreeMap;
use std::path::Path;

use weaver_data::image::{encode_jpeg, encode_png, test_pattern};
use weaver_data::tar::TarWriter;
use weaver_models::JobConfig;
use weaver_worker::ckpt::open_resume;

const COLORS: [&str; 3] = ["red", "green", "blue"];
const SHAPES: [&str; 2] = ["circle", "square"];

/// Eight shards of ten samples: JPEG or PNG images, captions in the grammar's words.
fn write_shards(dir: &Path) {
    for s in 0..8u64 {
        let f = std::fs::File::create(dir.join(format!("train-{s}.tar"))).unwrap();
        let mut tw = TarWriter::new(f);
        for i in 0..10u64 {
            let n = s * 10 + i;
            let img = test_pattern(48, 40, n);
            let key = format!("{n:05}");
            if n.is_multiple_of(2) {
                tw.append(&format!("{key}.jpg"), &encode_jpeg(&img, 90).unwrap())
                    .unwrap();
            } else {
                tw.append(&format!("{key}.png"), &encode_png(&img).unwrap())
                    .unwrap();
            }
            let caption = format!(
                "a small {} {}",
                COLORS[(n % 3) as usize],
                SHAPES[(n % 2) as usize]
            );
            tw.append(&format!("{key}.txt"), caption.as_bytes())
                .unwrap();
        }
        tw.finish().unwrap();
    }
}

fn shard_job(dp: usize, shards: &Path, ckpt: &Path) -> JobConfig {
    common::job(
        1,
        1,
        dp,
        "1f1b",
        1,
        &[
            "data.source=\"shards\"".into(),
            format!("data.shards=\"{}\"", shards.display()),
            "data.streams=4".into(),
            "data.shuffle_buffer=3".into(),
            "data.workers=1".into(),
            "data.log_keys=true".into(),
            format!("checkpoint.url=\"{}\"", ckpt.display()),
        ],
    )
}

/// The keys of each step in a run directory, the data-parallel ranks' shares in rank order.
fn logged_keys(run_dir: &Path) -> BTreeMap<u64, Vec<String>> {
    let mut by_step: BTreeMap<u64, BTreeMap<u64, Vec<String>>> = BTreeMap::new();
    for e in std::fs::read_dir(run_dir).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("data-keys-rank")
        {
            continue;
        }
        for line in std::fs::read_to_string(&p).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let keys = v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string());
            by_step
                .entry(v["step"].as_u64().unwrap())
                .or_default()
                .insert(v["dp_rank"].as_u64().unwrap(), keys.collect());
        }
    }
    by_step
        .into_iter()
        .map(|(s, ranks)| (s, ranks.into_values().flatten().collect()))
        .collect()
}

#[test]
fn a_dp4_checkpoint_resumes_at_dp2_with_the_same_samples() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    write_shards(&shards);
    let ckpt = dir.path().join("ckpt");

    // dp = 4: four steps, a checkpoint after step 2.
    let job4 = shard_job(4, &shards, &ckpt);
    let run4 = dir.path().join("run4");
    let sink = committer(&job4);
    let losses4 = common::on_ranks(&job4, &run4, move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        let mut out = Vec::new();
        for _ in 0..4 {
            let m = t.train_step().unwrap();
            let d = m.data.expect("shard runs report data counters");
            assert_eq!(
                d.data_samples,
                16 * m.step,
                "every replica's samples counted once"
            );
            assert_eq!(d.data_bad_image + d.data_bad_caption, 0);
            out.push(m.loss);
            if t.step() == 2 {
                t.save_checkpoint().unwrap();
            }
        }
        t.finish_checkpoints().unwrap();
        out
    })
    .remove(0);
    let keys4 = logged_keys(&run4);
    assert_eq!(keys4.len(), 4);
    // 48 samples of an 80-sample epoch: none twice.
    let first3: Vec<&String> = (1..=3).flat_map(|s| keys4[&s].iter()).collect();
    let distinct: std::collections::HashSet<&&String> = first3.iter().collect();
    assert_eq!(distinct.len(), 48, "no sample twice within the epoch");

    // dp = 2 from step 2: steps 3 and 4 see the same samples.
    let job2 = shard_job(2, &shards, &ckpt);
    let run2 = dir.path().join("run2");
    let url = format!("{}/step-{:08}", ckpt.display(), 2);
    let losses2 = common::on_ranks(&job2, &run2, move |_, mut t| {
        let c = open_resume(&url, &t.job().checkpoint.url).unwrap();
        assert_eq!(t.resume(c).unwrap(), 2);
        (0..2)
            .map(|_| t.train_step().unwrap().loss)
            .collect::<Vec<_>>()
    })
    .remove(0);
    let keys2 = logged_keys(&run2);
    assert_eq!(keys2.keys().copied().collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(keys2[&3], keys4[&3]);
    assert_eq!(keys2[&4], keys4[&4]);
    // Same samples, same weights: the losses agree up to the layouts' reduction order.
    for (a, b) in losses4[2..].iter().zip(&losses2) {
        assert!((a - b).abs() / a.abs() < 1e-4, "{a} vs {b}");
    }
}
