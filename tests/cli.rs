//! The `weaver` binary end to end: `train` writes the run directory of the CLI contract,
//! `eval` reads its weights back, and bad configs are refused by name without a panic.

mod common;

use common::job_config;
use std::path::Path;

#[test]
fn train_writes_metrics_and_eval_reads_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_config(
        dir.path(),
        "[model]\nflavor = \"debug\"\npatch_size = 8\n[train]\nsteps = 4\nglobal_batch = 8\nwarmup_steps = 1\neval_every = 2\n[eval]\npool = 10\n",
    );
    let run = dir.path().join("run");
    let out = common::run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            run.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<_> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train.len(), 4);
    for (i, l) in train.iter().enumerate() {
        assert_eq!(l["step"], i as u64 + 1);
        for key in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(l[key].as_f64().unwrap().is_finite(), "{key} in {l}");
        }
        // One rank (the whole process's counted tensors): its peak, and the peak over ranks.
        let peak = l["peak_mem_bytes"].as_u64().unwrap();
        assert!(peak > 0, "{l}");
        assert_eq!(l["peak_mem_bytes_ranks"], serde_json::json!([peak]), "{l}");
    }
    let evals: Vec<_> = lines.iter().filter(|l| l["eval"] == true).collect();
    assert_eq!(evals.len(), 2, "eval at step 2 and at the end");
    for e in &evals {
        for key in ["i2t_r1", "t2i_r1", "caption_exact"] {
            let v = e[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} in {e}");
        }
    }
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert_eq!(last["step"], 4);
    assert!(run.join("config.toml").exists());

    // `weaver eval` on the saved weights reproduces the final evaluation exactly.
    let out = common::run(
        &[
            "eval",
            "--config",
            &cfg,
            "--checkpoint",
            run.join("model.safetensors").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let final_eval = evals.last().unwrap();
    for key in ["i2t_r1", "t2i_r1", "caption_exact"] {
        assert_eq!(e[key], final_eval[key], "{key}");
    }
}

#[test]
fn bad_configs_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (body, needle) in [
        ("[train]\nstepz = 3\n", "stepz"),
        ("[model]\ntext_heads = 5\n", "model.text_heads"),
        ("[model]\npatch_size = 5\n", "model.patch_size"),
        ("[model]\nflavor = \"huge\"\n", "model.flavor"),
        ("[train]\ndevice = \"tpu\"\n", "train.device"),
        ("[train\n", "config"),
    ] {
        let cfg = job_config(dir.path(), body);
        let out = common::run(&["train", "--config", &cfg], dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {err}");
        assert!(err.contains(needle), "{body}: {err}");
        assert!(!err.contains("panicked"), "{body}: {err}");
    }
    let out = common::run(&["train", "--config", "/nonexistent.toml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}

#[test]
fn data_pack_inspect_and_train_on_the_shards() {
    use weaver_data::image::{encode_jpeg, encode_png, test_pattern};
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let mut tsv = String::from("file\tcaption\n");
    for i in 0..16u64 {
        let img = test_pattern(80, 60, i);
        let (name, bytes) = if i.is_multiple_of(2) {
            (format!("{i}.jpg"), encode_jpeg(&img, 90).unwrap())
        } else {
            (format!("{i}.png"), encode_png(&img).unwrap())
        };
        std::fs::write(imgs.join(&name), bytes).unwrap();
        let color = ["red", "green", "blue"][(i % 3) as usize];
        tsv.push_str(&format!("{name}\ta small {color} circle\n"));
    }
    std::fs::write(dir.path().join("caps.tsv"), tsv).unwrap();
    let shards = dir.path().join("shards");
    let out = common::run(
        &[
            "data",
            "pack",
            "--images",
            imgs.to_str().unwrap(),
            "--captions",
            dir.path().join("caps.tsv").to_str().unwrap(),
            "--out",
            shards.to_str().unwrap(),
            "--shard-size",
            "4",
            "--image-size",
            "40",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("16 samples in 4 shards"));
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shards.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["samples"], 16);
    let out = common::run(
        &["data", "inspect", shards.to_str().unwrap(), "--full"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("4 shards") && text.contains("read 16 samples: 0 bad"),
        "{text}"
    );
    assert!(text.contains("a small red circle"), "{text}");

    // Training on them; a bad pattern is refused by key.
    let cfg = job_config(
        dir.path(),
        &format!(
            "[model]\nflavor = \"debug\"\n[data]\nsource = \"shards\"\nshards = \"{}/shard-{{00000..00003}}.tar\"\nstreams = 4\nshuffle_buffer = 2\n[train]\nsteps = 2\nglobal_batch = 8\nwarmup_steps = 1\n",
            shards.display()
        ),
    );
    let run = dir.path().join("run");
    let out = common::run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            run.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let step2: serde_json::Value = serde_json::from_str(metrics.lines().nth(1).unwrap()).unwrap();
    assert_eq!(step2["data_samples"], 16, "{metrics}");
    // A new run directory: the first run's checkpoints (in `run/checkpoints`) make `run` a
    // taken checkpoint URL for a new run, which is refused before the data is looked at.
    let out = common::run(
        &[
            "train",
            "--config",
            &cfg,
            "--set",
            "data.shards=/nowhere/x-{1..",
            "--run-dir",
            dir.path().join("run2").to_str().unwrap(),
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("data.shards"),
        "{err}"
    );
}

#[test]
fn a_trained_checkpoint_is_quantized_and_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let cfg = job_config(
        dir.path(),
        &format!(
            "[model]\nflavor = \"debug\"\n[train]\nsteps = 4\nglobal_batch = 8\nwarmup_steps = 1\neval_every = 0\n[eval]\npool = 10\n[checkpoint]\nurl = \"{}\"\nevery = 4\n",
            ckpt.display()
        ),
    );
    let run = dir.path().join("run");
    let out = common::run(
        &[
            "train",
            "--config",
            &cfg,
            "--run-dir",
            run.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = dir.path().join("q");
    // No --config: the checkpoint's own job config drives the calibration pass.
    let out = common::run(
        &[
            "ckpt",
            "quantize",
            ckpt.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--scheme",
            "int8-dynamic",
            "--calibrate",
            "16",
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["scheme"], "int8-dynamic");
    assert_eq!(r["calibration_samples"], 16);
    assert!(r["layers"].as_u64().unwrap() > 0);
    assert!(r["bytes"].as_u64().unwrap() < r["source_param_bytes"].as_u64().unwrap());

    let eval = |url: &Path| {
        let out = common::run(
            &[
                "eval",
                "--config",
                &cfg,
                "--checkpoint",
                url.to_str().unwrap(),
            ],
            dir.path(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (f, i) = (eval(&ckpt), eval(&q));
    for key in ["i2t_r1", "t2i_r1", "caption_exact"] {
        let v = i[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} in {i}");
    }
    assert_eq!(i["pool"], f["pool"]);
    assert_eq!(i["step"], 4);

    // A bad scheme is refused by flag, without a panic.
    let out = common::run(
        &[
            "ckpt",
            "quantize",
            ckpt.to_str().unwrap(),
            "--out",
            q.to_str().unwrap(),
            "--scheme",
            "int4",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--scheme") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn plan_prints_the_layouts_that_fit_and_says_when_nothing_does() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = job_config(
        dir.path(),
        "[model]\nflavor = \"small\"\n[train]\nglobal_batch = 64\ndtype = \"bf16\"\n",
    );
    let out = common::run(
        &["plan", "--config", &cfg, "--gpus", "16", "--top", "2"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("layouts fit; the best 2:"), "{text}");
    // Each printed plan has its memory and time broken down, and the best is explained.
    for part in [
        "parameters",
        "gradients",
        "optimizer",
        "in flight",
        "bubble",
        "dp comm",
    ] {
        assert!(text.contains(part), "no {part} in {text}");
    }
    assert!(text.contains("is fastest of the"), "{text}");
    // --runnable: no layout that needs a memory feature the trainer lacks.
    let out = common::run(
        &[
            "plan",
            "--config",
            &cfg,
            "--gpus",
            "16",
            "--runnable",
            "--top",
            "50",
        ],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!text.contains("needs issue 12 features"), "{text}");
    // Nothing fits in 1 MiB: a clear error with the smallest memory found.
    let out = common::run(
        &[
            "plan",
            "--config",
            &cfg,
            "--gpus",
            "16",
            "--gpu-memory",
            "1MiB",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nothing fits") && err.contains("the smallest is"),
        "{err}"
    );
    // A bad flag value names the flag.
    let out = common::run(
        &[
            "plan",
            "--config",
            &cfg,
            "--gpus",
            "12",
            "--gpus-per-node",
            "8",
        ],
        dir.path(),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpus"));
}
