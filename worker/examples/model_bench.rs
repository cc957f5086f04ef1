//! bench/model: training-step time, tokens/s and MFU of weaver against PyTorch eager
//! (python/weaver_ref.py, the same model) on the same weights and the same fixed batch, in
//! one run. Run it through bench/model/run.sh.
//!
//!     model_bench --config FILE [--set k=v]... [--steps N] [--warmup N] [--no-torch]
//!
//! A step is the whole update: forward and backward of every micro-batch, gradient
//! clipping, AdamW. FLOPs per step come from the model's formula (the same formula on
//! both sides), MFU against `train.peak_tflops` when it is set.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tch::{Device, Tensor};
use weaver_models::data::{tokens_per_sample, Split};
use weaver_models::model::{Acts, LossWeights};
use weaver_models::JobConfig;
use weaver_parallel::tp::NoTp;
use weaver_worker::optim::{clip_grads, grad_sq_sum, AdamW, AdamWConfig};
use weaver_worker::train::{build, configure_threads, save_params};

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
    let built = build(&job)?;
    let device = built.device;
    let k = job.parallel.dp * job.parallel.microbatches;
    let gb = job.train.global_batch;
    let mbs = gb / k;
    let indices: Vec<u64> = (0..gb as u64).collect();
    let batch = built.data.batch(Split::Train, &indices, device)?;
    let t = &job.train;
    let w = LossWeights {
        itc: t.itc_weight,
        caption: t.caption_weight,
        itm: t.itm_weight,
    };
    let dir = tempfile::tempdir()?;
    let weights = dir.path().join("w.safetensors");
    save_params(&built.store, &weights)?;
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

    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        },
        built.store.params(),
    )?;
    let mut store = built.store;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut times = Vec::new();
    let (mut t_fb, mut t_clip, mut t_opt) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss = 0.0;
    for step in 0..a.warmup + a.steps {
        sync();
        let t0 = Instant::now();
        store.zero_grad();
        for m in 0..k {
            let mb = batch.slice(m * mbs, mbs)?;
            let mut acts = Acts::default();
            built
                .model
                .forward(&mut NoTp, &mut acts, &mb, w.itm > 0.0)?;
            let l = built.model.losses(&mut NoTp, &mut acts, &mb, w)?;
            l.total.f_div_scalar(k as f64)?.f_backward()?;
            if m + 1 == k {
                loss = l.total.f_double_value(&[])?;
            }
        }
        sync();
        let t1 = Instant::now();
        let norm = grad_sq_sum(store.params().iter())?.sqrt();
        clip_grads(store.params(), norm, t.grad_clip)?;
        sync();
        let t2 = Instant::now();
        opt.step(store.params(), t.lr)?;
        sync();
        if step >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            t_fb.push((t1 - t0).as_secs_f64());
            t_clip.push((t2 - t1).as_secs_f64());
            t_opt.push(t2.elapsed().as_secs_f64());
        }
    }
    let ours = median(times);
    let flops = job.model.train_flops_per_sample(w.itm > 0.0) * gb as f64;
    let tokens = (gb * tokens_per_sample(job.model.num_patches(), job.model.max_text_len)) as f64;
    let dtype = match store.kind {
        tch::Kind::BFloat16 => "bf16",
        _ => "f32",
    };

    let theirs = if a.torch {
        let meta = serde_json::json!({
            "model": job.model,
            "weights": {"itc": w.itc, "caption": w.caption, "itm": w.itm},
            "pad_id": built.data.tokenizer.pad_id(),
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
        "weaver step parts (ms): forward+backward {:.2}, grad norm+clip {:.2}, AdamW {:.2}",
        median(t_fb) * 1e3,
        median(t_clip) * 1e3,
        median(t_opt) * 1e3
    );
    println!("final loss (weaver): {loss:.4}");
    let mut result = serde_json::json!({
        "bench": "model", "flavor": job.model.flavor, "device": format!("{device:?}"),
        "dtype": dtype, "global_batch": gb, "weaver_step_s": ours,
        "weaver_tokens_per_s": tokens / ours, "weaver_tflops": flops / ours / 1e12,
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
