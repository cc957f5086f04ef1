//! bench/infer: inference throughput of weaver against PyTorch eager on the same model,
//! weights, batch and dtype (f32, CPU), in one run.
//!
//!   cargo run --release -p weaver-worker --example infer_bench -- [FLAVOR] [BATCH] [NEW] [REPS] [THREADS]
//!
//! Measured (median of REPS after one warm-up, each call a whole batch, allocation inside
//! the timer on both sides): embeddings (image encoder + unimodal text layers:
//! `Model::embeddings`) in images/s; greedy captions of exactly NEW tokens (no stop token,
//! so both sides decode the same number of steps) in captions/s — weaver with its key/value
//! cache, and weaver with `cache: false` (each step reruns the text layers over the prefix),
//! the like-for-like column of PyTorch eager (python/weaver_ref.py's model, each step
//! rerunning the text layers over the fixed-length sequence); then the same with int8
//! weights (weight-only and dynamic, quantized as `weaver ckpt quantize` does). PyTorch's
//! outputs are checked against weaver's (embedding max |diff|, identical caption tokens).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};
use weaver_models::data::Split;
use weaver_models::model::decode::GenerateOptions;
use weaver_models::quant::{quantize_per_channel, Int8Mode, Int8Weight};
use weaver_models::{JobConfig, Model};
use weaver_parallel::tp::NoTp;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn timed<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut out = f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        out = f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((median(times), out))
}

struct Figures {
    images_per_s: f64,
    captions_per_s: f64,
    captions_no_cache_per_s: Option<f64>,
    tokens: Vec<Vec<i64>>,
    image_emb: Tensor,
}

fn measure(
    model: &Model,
    batch: &weaver_models::data::Batch,
    opts: &GenerateOptions,
    reps: usize,
    no_cache: bool,
) -> Result<Figures> {
    let n = batch.len() as f64;
    let (t_emb, (ie, _)) = timed(reps, || Ok(tch::no_grad(|| model.embeddings(batch))?))?;
    let (t_cap, g) = timed(reps.div_ceil(2), || {
        Ok(model.generate(&mut NoTp, &batch.images, opts)?)
    })?;
    let nc = if no_cache {
        let slow = GenerateOptions {
            cache: false,
            ..opts.clone()
        };
        let (t, g2) = timed(reps.div_ceil(2), || {
            Ok(model.generate(&mut NoTp, &batch.images, &slow)?)
        })?;
        if g2.tokens != g.tokens {
            bail!("decoding without the cache gave other tokens than with it");
        }
        Some(n / t)
    } else {
        None
    };
    Ok(Figures {
        images_per_s: n / t_emb,
        captions_per_s: n / t_cap,
        captions_no_cache_per_s: nc,
        tokens: g.tokens,
        image_emb: ie,
    })
}

fn quantize(model: &mut Model, mode: Int8Mode) -> Result<()> {
    model.for_each_linear(&mut |l| {
        match &mut l.quant {
            Some(q) => q.mode = mode,
            None => {
                let (q, scale) = quantize_per_channel(&l.weight)?;
                l.quant = Some(Int8Weight {
                    q,
                    scale,
                    smooth: None,
                    mode,
                });
                l.weight = Tensor::f_empty([0], (Kind::Float, Device::Cpu))?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let flavor = arg(0, "small");
    let batch_n: usize = arg(1, "32").parse()?;
    let new: usize = arg(2, "32").parse()?;
    let reps: usize = arg(3, "5").parse()?;
    let threads: usize = arg(4, "2").parse()?;
    let job = JobConfig::parse(
        &format!(
            "[model]\nflavor = \"{flavor}\"\nmax_text_len = {}\n[train]\nthreads = {threads}\ndtype = \"f32\"\ndevice = \"cpu\"\n",
            new + 1
        ),
        &[],
    )?;
    weaver_worker::train::configure_threads(threads, 1);
    let mut built = weaver_worker::train::build(&job)?;
    let data = built.data.clone();
    let tok = data.tokenizer.as_ref();
    let idx: Vec<u64> = (0..batch_n as u64).collect();
    let batch = data.batch(Split::Heldout, &idx, Device::Cpu)?;
    let opts = GenerateOptions {
        stop_token: None,
        ..GenerateOptions::greedy(new, tok.bos_id(), tok.eos_id())
    };

    let dir = tempfile::tempdir()?;
    let weights = dir.path().join("w.safetensors");
    let named: Vec<(String, Tensor)> = built
        .store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor.detach()))
        .collect();
    Tensor::write_safetensors(&named, &weights)?;
    let bpath = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(
        &[
            ("images", batch.images.shallow_clone()),
            ("tokens", batch.tokens.shallow_clone()),
            ("eos", batch.eos.shallow_clone()),
        ],
        &bpath,
    )?;
    let cfg = dir.path().join("cfg.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"model": job.model, "bos": tok.bos_id(), "pad": tok.pad_id()})
            .to_string(),
    )?;

    let f32w = measure(&built.model, &batch, &opts, reps, true)?;

    let py = std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/infer/torch_infer.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(&cfg)
        .arg(&weights)
        .arg(&bpath)
        .arg(new.to_string())
        .arg(reps.to_string())
        .arg(threads.to_string())
        .output()
        .context("running bench/infer/torch_infer.py")?;
    if !out.status.success() {
        bail!(
            "torch_infer.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let torch: serde_json::Value = serde_json::from_slice(
        out.stdout
            .split(|&b| b == b'\n')
            .rfind(|l| !l.is_empty())
            .context("torch_infer.py printed nothing")?,
    )?;
    let tout = Tensor::read_safetensors(dir.path().join("torch_out.safetensors"))?;
    let get = |n: &str| {
        tout.iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.shallow_clone())
            .context("torch output missing")
    };
    let emb_diff = (get("image_emb")? - &f32w.image_emb)
        .abs()
        .max()
        .double_value(&[]);
    let torch_tokens: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&get("captions")?)?;
    let same_captions = torch_tokens == f32w.tokens;

    quantize(&mut built.model, Int8Mode::WeightOnly)?;
    let w8 = measure(&built.model, &batch, &opts, reps, false)?;
    quantize(&mut built.model, Int8Mode::Dynamic)?;
    let d8 = measure(&built.model, &batch, &opts, reps, false)?;

    let t_img = torch["images_per_s"].as_f64().unwrap_or(f64::NAN);
    let t_cap = torch["captions_per_s"].as_f64().unwrap_or(f64::NAN);
    let nc = f32w.captions_no_cache_per_s.unwrap_or(f64::NAN);
    println!(
        "flavor {flavor}, batch {batch_n}, {new} new tokens (greedy, no stop token), f32, CPU, {threads} threads, torch {}",
        torch["torch"].as_str().unwrap_or("?")
    );
    println!(
        "{:<28}{:>12}{:>22}{:>20}",
        "", "images/s", "captions/s no cache", "captions/s cache"
    );
    println!(
        "{:<28}{:>12.1}{:>22.2}{:>20}",
        "pytorch eager", t_img, t_cap, "-"
    );
    println!(
        "{:<28}{:>12.1}{:>22.2}{:>20.2}",
        "weaver f32", f32w.images_per_s, nc, f32w.captions_per_s
    );
    println!(
        "{:<28}{:>12.1}{:>22}{:>20.2}",
        "weaver int8-weight", w8.images_per_s, "-", w8.captions_per_s
    );
    println!(
        "{:<28}{:>12.1}{:>22}{:>20.2}",
        "weaver int8-dynamic", d8.images_per_s, "-", d8.captions_per_s
    );
    println!(
        "weaver/eager embeddings {:.2}x (goal >= 1); cache speed-up at {new} tokens {:.2}x over weaver without (goal >= 3), {:.2}x over eager (a different mechanism: the cache); int8-weight/f32 {:.2}x, int8-dynamic/f32 {:.2}x embeddings",
        f32w.images_per_s / t_img,
        f32w.captions_per_s / nc,
        f32w.captions_per_s / t_cap,
        w8.images_per_s / f32w.images_per_s,
        d8.images_per_s / f32w.images_per_s
    );
    println!("pytorch vs weaver: image embeddings max |diff| {emb_diff:.2e}, captions identical: {same_captions}");
    let common = serde_json::json!({"flavor": flavor, "batch": batch_n, "new_tokens": new, "dtype": "f32", "device": "cpu", "threads": threads});
    let line = |v: serde_json::Value| {
        let mut m = common.as_object().cloned().unwrap_or_default();
        if let serde_json::Value::Object(o) = v {
            m.extend(o);
        }
        println!("RESULT {}", serde_json::Value::Object(m));
    };
    line(
        serde_json::json!({"bench": "infer", "impl": "pytorch_eager", "images_per_s": t_img, "captions_per_s": t_cap, "cache": false}),
    );
    line(
        serde_json::json!({"bench": "infer", "impl": "weaver", "weights": "f32", "images_per_s": f32w.images_per_s, "captions_per_s": f32w.captions_per_s, "captions_no_cache_per_s": nc, "cache_speedup": f32w.captions_per_s / nc, "embed_vs_eager": f32w.images_per_s / t_img, "emb_max_diff_vs_eager": emb_diff, "captions_equal_eager": same_captions}),
    );
    line(
        serde_json::json!({"bench": "infer", "impl": "weaver", "weights": "int8-weight", "images_per_s": w8.images_per_s, "captions_per_s": w8.captions_per_s}),
    );
    line(
        serde_json::json!({"bench": "infer", "impl": "weaver", "weights": "int8-dynamic", "images_per_s": d8.images_per_s, "captions_per_s": d8.captions_per_s}),
    );
    Ok(())
}
