//! bench/model: training-step time, tokens/s and MFU of weaver against PyTorch eager
//! (python/weaver_ref.py, the same model) on the same weights and the same fixed batch, in
//! one run. Run it through bench/model/run.sh.
//!
//!     model_bench --config FILE [--set k=v]... [--steps N] [--warmup N] [--no-torch]
//!
//! A step is the whole update: forward and backward of every micro-batch, gradient
//! clipping, AdamW; weaver's is the step of the trainer `weaver train` runs (fed a fixed
//! batch), timed on unlogged steps (nothing read back to the host), whose device→host reads
//! are counted (`host_syncs_per_step`; a logged step's separately). FLOPs per step come from the model's formula (the same formula on
//! both sides), MFU against `train.peak_tflops` when it is set.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tch::{Device, Tensor};
use weaver_models::data::{tokens_per_sample, Split};
use weaver_models::model::LossWeights;
use weaver_models::JobConfig;
use weaver_worker::batches::FixedBatches;
use weaver_worker::parallel::ParallelTrainer;
use weaver_worker::sync::host_syncs;
use weaver_worker::train::{configure_threads, dataset, save_params};

struct Args {
    config: PathBuf,
    sets: Vec<String>,
    steps: usize,
    warmup: usize,
    torch: bool,
}

fn args() -> Args {
    let mut a = Args {
        config: PathBuf::from("configs/debug.toml"),
        sets: Vec::new(),
        steps: 10,
        warmup: 3,
        torch: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--config" => a.config = it.next().expect("--config FILE").into(),
            "--set" => a.sets.push(it.next().expect("--set k=v")),
            "--steps" => a.steps = it.next().and_then(|s| s.parse().ok()).expect("--steps N"),
            "--warmup" => a.warmup = it.next().and_then(|s| s.parse().ok()).expect("--warmup N"),
            "--no-torch" => a.torch = false,
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let a = args();
    let job = JobConfig::load(&a.config, &a.sets)?;
    let threads = configure_threads(job.train.threads, 1);
    let dir = tempfile::tempdir()?;
    // weaver's side is the trainer `weaver train` runs (the layout collapsed into one
    // process), fed the same fixed batch every step.
    let mut trainer = ParallelTrainer::solo(job.clone(), dir.path().join("run"), false)?;
    let device = trainer.store().device;
    let data = dataset(&job)?;
    let k = job.parallel.dp * job.parallel.microbatches;
    let gb = job.train.global_batch;
    let mbs = gb / k;
    let indices: Vec<u64> = (0..gb as u64).collect();
    let batch = data.batch(Split::Train, &indices, device)?;
    let micro = (0..k)
        .map(|m| batch.slice(m * mbs, mbs))
        .collect::<Result<Vec<_>, _>>()?;
    trainer.set_source(Box::new(FixedBatches::new(micro)));
    let t = &job.train;
    let w = LossWeights {
        itc: t.itc_weight,
        caption: t.caption_weight,
        itm: t.itm_weight,
    };
    let weights = dir.path().join("w.safetensors");
    save_params(trainer.store(), &weights)?;
    let batch_path = dir.path().join("batch.safetensors");
    let cpu = |x: &Tensor| x.to_device(Device::Cpu);
    Tensor::write_safetensors(
        &[
            ("images", cpu(&batch.images)),
            ("tokens", cpu(&batch.tokens)),
            ("eos", cpu(&batch.eos)),
        ],
        &batch_path,
    )?;

    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    let mut t_fb = Vec::new();
    let mut syncs = Vec::new();
    // Unlogged steps (what almost every step of a run is: nothing read back), timed.
    for step in 0..a.warmup + a.steps {
        sync();
        let t0 = Instant::now();
        let s0 = host_syncs();
        trainer.step_once(false)?;
        let s1 = host_syncs();
        sync();
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            t_fb.push(trainer.last_schedule_times().0);
            syncs.push((s1 - s0) as f64);
        }
    }
    // One logged step (losses, norm and control requests read back), untimed.
    let s0 = host_syncs();
    let logged = trainer.train_step()?;
    let logged_syncs = host_syncs() - s0;
    let loss = logged.loss;
    let host_syncs_per_step = syncs.iter().sum::<f64>() / syncs.len().max(1) as f64;
    let ours = median(times);
    let flops = job.model.train_flops_per_sample(w.itm > 0.0) * gb as f64;
    let tokens = (gb * tokens_per_sample(job.model.num_patches(), job.model.max_text_len)) as f64;
    let dtype = match trainer.store().kind {
        tch::Kind::BFloat16 => "bf16",
        _ => "f32",
    };

    let theirs = if a.torch {
        let meta = serde_json::json!({
            "model": job.model,
            "weights": {"itc": w.itc, "caption": w.caption, "itm": w.itm},
            "pad_id": data.tokenizer.pad_id(),
            "train": job.train,
        });
        let cfg = dir.path().join("cfg.json");
        std::fs::write(&cfg, meta.to_string())?;
        let py = std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../python/weaver_ref.py");
        let dev = match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        };
        let out = Command::new(py)
            .arg(script)
            .arg("bench")
            .arg("--config")
            .arg(&cfg)
            .arg("--weights")
            .arg(&weights)
            .arg("--batch")
            .arg(&batch_path)
            .args(["--device", &dev, "--dtype", dtype])
            .args([
                "--steps",
                &a.steps.to_string(),
                "--warmup",
                &a.warmup.to_string(),
            ])
            .args([
                "--microbatches",
                &k.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "weaver_ref.py bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v["step_s"].as_f64()
    } else {
        None
    };

    let peak = (t.peak_tflops > 0.0).then_some(t.peak_tflops * 1e12);
    let mfu = |s: f64| {
        peak.map(|p| format!("{:.1}%", 100.0 * flops / s / p))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "model bench: flavor {} ({:.3e} params), fusion {}, device {:?}, {dtype}, global batch {gb} in {k} micro-batch(es), {threads} thread(s)",
        job.model.flavor,
        job.model.num_params() as f64,
        job.model.fusion.name(),
        device
    );
    println!(
        "{:<16} {:>12} {:>14} {:>12} {:>8}",
        "", "step (ms)", "tokens/s", "TFLOP/s", "MFU"
    );
    let row = |name: &str, s: f64| {
        println!(
            "{name:<16} {:>12.2} {:>14.0} {:>12.3} {:>8}",
            s * 1e3,
            tokens / s,
            flops / s / 1e12,
            mfu(s)
        )
    };
    row("weaver", ours);
    if let Some(s) = theirs {
        row("pytorch eager", s);
        println!("weaver / pytorch step time: {:.3}", ours / s);
    }
    println!(
        "weaver step parts (ms): schedule (forward+backward) {:.2}, the rest (gradient sync, norm, clip, AdamW) {:.2}",
        median(t_fb.clone()) * 1e3,
        (ours - median(t_fb)) * 1e3
    );
    println!(
        "weaver host syncs (device→host reads, counted): {host_syncs_per_step:.1} per unlogged step, {logged_syncs} per logged step"
    );
    println!("final loss (weaver): {loss:.4}");
    let mut result = serde_json::json!({
        "bench": "model", "flavor": job.model.flavor, "device": format!("{device:?}"),
        "dtype": dtype, "global_batch": gb, "weaver_step_s": ours,
        "weaver_tokens_per_s": tokens / ours, "weaver_tflops": flops / ours / 1e12,
        "host_syncs_per_step": host_syncs_per_step, "host_syncs_per_logged_step": logged_syncs,
    });
    if let Some(s) = theirs {
        result["torch_step_s"] = s.into();
        result["torch_tokens_per_s"] = (tokens / s).into();
        result["torch_tflops"] = (flops / s / 1e12).into();
    }
    if let Some(p) = peak {
        result["weaver_mfu"] = (flops / ours / p).into();
        if let Some(s) = theirs {
            result["torch_mfu"] = (flops / s / p).into();
        }
    }
    println!("RESULT {result}");
    Ok(())
}
