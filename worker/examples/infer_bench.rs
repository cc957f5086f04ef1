//! bench/infer: inference throughput of weaver against PyTorch eager on the same model,
//! weights, batch, dtype (f32) and threads, on a CPU, interleaved so that it survives a
//! machine other processes load.
//!
//!   cargo run --release -p weaver-worker --example infer_bench -- [FLAVOR] [BATCH] [NEW] [REPS] [THREADS] [ROUNDS]
//!
//! (defaults `small 32 32 5 2 3`). Three tasks, the same work on both sides (allocation
//! inside the timer on both: each call allocates its outputs and caches):
//!
//! - `embed`: image and text embeddings of the batch (`Model::embeddings`: the image encoder
//!   and the unimodal text layers), in images/s;
//! - `caption`: greedy captions of exactly NEW tokens (no stop token, so every caption has
//!   NEW tokens on both sides; checked) with the key/value cache, in captions/s;
//! - `caption_nocache`: the same captions without a cache (`cache: false`: every step
//!   reruns the text layers over the whole prefix, the memory's cross-attention keys and
//!   values included; the image encoder once).
//!
//! The PyTorch side (bench/infer/torch_infer.py: python/weaver_ref.py's model, its own
//! cached and uncached greedy decoders, under `no_grad` like weaver) starts once, warms up,
//! and then waits on its stdin. Each of ROUNDS rounds runs, per task, REPS calls of weaver's
//! (ceil(REPS/2) for the caption tasks), then as many of PyTorch's, then (embed and
//! caption) weaver's int8 models' (weight-only and dynamic, quantized as `weaver ckpt
//! quantize` does, without calibration). Every call is timed in wall time and in CPU time
//! of its process (all threads: `CLOCK_PROCESS_CPUTIME_ID`, Python's `time.process_time()`).
//! Throughputs are per second of wall time and per second of CPU time, from the median
//! call over all rounds; ratios are given per round (each side's median call in that round)
//! with their median. When other processes share the cores, wall time measures the
//! scheduler; CPU time with one thread per side is the figure to read.
//!
//! Checked: PyTorch's embeddings against weaver's (max |diff|), and its captions (cached
//! and not) against weaver's (identical tokens); weaver's captions with and without the
//! cache must be identical, or the bench fails.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use weaver_models::data::{Batch, Split};
use weaver_models::model::decode::GenerateOptions;
use weaver_models::quant::{quantize_per_channel, Int8Mode, Int8Weight};
use weaver_models::{JobConfig, Model};
use weaver_parallel::tp::NoTp;

#[path = "common/cpu_time.rs"]
mod cpu_time;
#[path = "common/piped.rs"]
mod piped;
use cpu_time::process_cpu_s;

/// How long the PyTorch side may take to warm up, or to answer one round.
const TORCH_TIMEOUT: Duration = Duration::from_secs(3600);

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Wall and CPU seconds of timed calls.
#[derive(Debug, Default, Clone)]
struct Times {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Times {
    fn from_json(v: &Value) -> Result<Times> {
        let nums = |k: &str| -> Result<Vec<f64>> {
            v[k].as_array()
                .map(|x| x.iter().filter_map(Value::as_f64).collect())
                .with_context(|| format!("the PyTorch side's round has no {k}: {v}"))
        };
        Ok(Times {
            wall: nums("wall_s")?,
            cpu: nums("cpu_s")?,
        })
    }

    fn extend(&mut self, o: &Times) {
        self.wall.extend(&o.wall);
        self.cpu.extend(&o.cpu);
    }

    /// Median seconds per call: (wall, CPU).
    fn median(&self) -> Med {
        (median(self.wall.clone()), median(self.cpu.clone()))
    }
}

/// Median seconds per call: (wall, CPU).
type Med = (f64, f64);

/// One round of a task: weaver f32's median call and eager's.
#[derive(Debug, Clone, Copy)]
struct Round {
    ours: Med,
    eager: Med,
}

/// `n` timed calls of `f`.
fn time_calls(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Times> {
    let mut t = Times::default();
    for _ in 0..n {
        let (t0, c0) = (Instant::now(), process_cpu_s());
        f()?;
        t.wall.push(t0.elapsed().as_secs_f64());
        t.cpu.push(process_cpu_s() - c0);
    }
    Ok(t)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Embed,
    Caption,
    CaptionNoCache,
}

impl Task {
    const ALL: [Task; 3] = [Task::Embed, Task::Caption, Task::CaptionNoCache];

    /// The name the PyTorch side knows the task by.
    fn name(self) -> &'static str {
        match self {
            Task::Embed => "embed",
            Task::Caption => "caption",
            Task::CaptionNoCache => "caption_nocache",
        }
    }
}

/// One weaver model under test and what it measured.
struct Weaver {
    label: &'static str,
    model: Model,
    times: [Times; 3],
}

/// One call of `task` on `model`.
fn call(model: &Model, task: Task, batch: &Batch, opts: &GenerateOptions) -> Result<()> {
    match task {
        Task::Embed => drop(tch::no_grad(|| model.embeddings(batch))?),
        Task::Caption => drop(model.generate(&mut NoTp, &batch.images, opts)?),
        Task::CaptionNoCache => {
            let o = GenerateOptions {
                cache: false,
                ..opts.clone()
            };
            drop(model.generate(&mut NoTp, &batch.images, &o)?)
        }
    }
    Ok(())
}

/// The PyTorch side: its JSON lines, read on a thread as they come, and its stdin.
struct Eager {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    errors: Option<std::thread::JoinHandle<String>>,
}

impl Eager {
    fn spawn(cmd: &mut Command) -> Result<Eager> {
        let piped::Piped {
            child,
            stdin,
            lines,
            errors,
        } = piped::spawn(cmd, "bench/infer/torch_infer.py")?;
        Ok(Eager {
            stdin,
            child,
            lines,
            errors: Some(errors),
        })
    }

    /// The end of what the process wrote on stderr (once it ended).
    fn stderr_tail(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let err = self
            .errors
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let lines: Vec<&str> = err.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The next JSON line that has `key`.
    fn wait_for(&mut self, key: &str) -> Result<Value> {
        let deadline = Instant::now() + TORCH_TIMEOUT;
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if v.get(key).is_some() {
                            return Ok(v);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!(
                        "torch_infer.py ended before answering ({key}):\n{}",
                        self.stderr_tail()
                    )
                }
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "torch_infer.py did not answer ({key}) within {} s; stopped it:\n{}",
                    TORCH_TIMEOUT.as_secs(),
                    self.stderr_tail()
                ),
            }
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("torch_infer.py's stdin is closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .context("torch_infer.py stopped listening")
    }

    /// `n` timed calls of `task` on the PyTorch side.
    fn run(&mut self, task: Task, n: usize) -> Result<Times> {
        self.send(&format!("run {} {n}", task.name()))?;
        Times::from_json(&self.wait_for("round")?)
    }

    /// Ends the process (it exits at "done").
    fn finish(mut self) -> Result<()> {
        self.send("done")?;
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("torch_infer.py failed ({status}):\n{}", self.stderr_tail());
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "torch_infer.py did not exit within 60 s of 'done'; stopped it:\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn quantize(model: &mut Model, mode: Int8Mode) -> Result<()> {
    model.for_each_linear(&mut |l| {
        let (q, scale) = quantize_per_channel(&l.weight)?;
        l.quant = Some(Int8Weight {
            q,
            scale,
            smooth: None,
            mode,
        });
        l.weight = Tensor::f_empty([0], (Kind::Float, Device::Cpu))?;
        Ok(())
    })?;
    Ok(())
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let flavor = arg(0, "small");
    let batch_n: usize = arg(1, "32").parse().context("BATCH")?;
    let new: usize = arg(2, "32").parse().context("NEW")?;
    let reps: usize = arg(3, "5").parse().context("REPS")?;
    let threads: usize = arg(4, "2").parse().context("THREADS")?;
    let rounds: usize = arg(5, "3").parse().context("ROUNDS")?;
    if batch_n == 0 || new == 0 || reps == 0 || threads == 0 || rounds == 0 {
        bail!("BATCH, NEW, REPS, THREADS and ROUNDS must be at least 1");
    }
    let job = JobConfig::parse(
        &format!(
            "[model]\nflavor = \"{flavor}\"\nmax_text_len = {}\n[train]\nthreads = {threads}\ndtype = \"f32\"\ndevice = \"cpu\"\n",
            new + 1
        ),
        &[],
    )?;
    weaver_worker::train::configure_threads(threads, 1);
    let built = weaver_worker::train::build(&job)?;
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
        json!({"model": job.model, "bos": tok.bos_id(), "pad": tok.pad_id()}).to_string(),
    )?;

    // The PyTorch side warms up while weaver does.
    let py = std::env::var("WEAVER_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/infer/torch_infer.py");
    let mut eager = Eager::spawn(
        Command::new(&py)
            .arg(&script)
            .arg(&cfg)
            .arg(&weights)
            .arg(&bpath)
            .arg(new.to_string())
            .arg(threads.to_string()),
    )?;

    // The int8 models: the same seeded weights (checked), quantized.
    let mut models = vec![Weaver {
        label: "f32",
        model: built.model,
        times: Default::default(),
    }];
    for (label, mode) in [
        ("int8-weight", Int8Mode::WeightOnly),
        ("int8-dynamic", Int8Mode::Dynamic),
    ] {
        let mut b = weaver_worker::train::build(&job)?;
        for (p, q) in built.store.params().iter().zip(b.store.params()) {
            if p.name != q.name || !p.tensor.equal(&q.tensor) {
                bail!("a second build of the model has other weights ({})", q.name);
            }
        }
        quantize(&mut b.model, mode)?;
        models.push(Weaver {
            label,
            model: b.model,
            times: Default::default(),
        });
    }

    // Warm-up: one call of each task on each model; weaver f32's outputs, to check.
    let f32m = &models[0].model;
    let (w_img, w_txt) = tch::no_grad(|| f32m.embeddings(&batch))?;
    let g_cache = f32m.generate(&mut NoTp, &batch.images, &opts)?;
    let g_nocache = f32m.generate(
        &mut NoTp,
        &batch.images,
        &GenerateOptions {
            cache: false,
            ..opts.clone()
        },
    )?;
    if g_nocache.tokens != g_cache.tokens {
        bail!("decoding without the cache gave other tokens than with it");
    }
    if let Some(c) = g_cache.tokens.iter().find(|c| c.len() != new) {
        bail!(
            "a caption has {} tokens, not {new}: the two sides would not do the same work",
            c.len()
        );
    }
    for w in &models[1..] {
        for task in [Task::Embed, Task::Caption] {
            call(&w.model, task, &batch, &opts)?;
        }
    }
    let ready = eager.wait_for("ready")?;

    // The rounds: per task, weaver f32's calls, then PyTorch's, then the int8 models'.
    let calls = |t: Task| match t {
        Task::Embed => reps,
        _ => reps.div_ceil(2),
    };
    let mut torch_times: [Times; 3] = Default::default();
    // Per task and round: weaver f32's and eager's median call.
    let mut per_round: [Vec<Round>; 3] = Default::default();
    // Per int8 model (1, 2) and task (embed, caption) and round: its median call.
    let mut int8_round: Vec<[Vec<Med>; 2]> = vec![Default::default(); models.len()];
    for _ in 0..rounds {
        for (ti, task) in Task::ALL.into_iter().enumerate() {
            let n = calls(task);
            let ours = time_calls(n, || call(&models[0].model, task, &batch, &opts))?;
            let theirs = eager.run(task, n)?;
            per_round[ti].push(Round {
                ours: ours.median(),
                eager: theirs.median(),
            });
            models[0].times[ti].extend(&ours);
            torch_times[ti].extend(&theirs);
            if task == Task::CaptionNoCache {
                continue;
            }
            for (mi, w) in models.iter_mut().enumerate().skip(1) {
                let t = time_calls(n, || call(&w.model, task, &batch, &opts))?;
                int8_round[mi][ti].push(t.median());
                w.times[ti].extend(&t);
            }
        }
    }
    eager.finish()?;

    // PyTorch's outputs against weaver's.
    let out = ready["out"]
        .as_str()
        .context("torch_infer.py named no output")?;
    let tout = Tensor::read_safetensors(out)?;
    let get = |n: &str| {
        tout.iter()
            .find(|(k, _)| k == n)
            .map(|(_, t)| t.shallow_clone())
            .with_context(|| format!("torch_infer.py's output has no {n}"))
    };
    let maxdiff = |a: Tensor, b: &Tensor| -> f64 { (a - b).abs().max().double_value(&[]) };
    let img_diff = maxdiff(get("image_emb")?, &w_img);
    let txt_diff = maxdiff(get("text_emb")?, &w_txt);
    let t_cache: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&get("captions")?)?;
    let t_nocache: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(&get("captions_nocache")?)?;
    let lp_diff = maxdiff(
        get("log_prob")?,
        &Tensor::from_slice(&g_cache.log_prob).to_kind(Kind::Double),
    );
    let eq_cache = t_cache == g_cache.tokens;
    let eq_nocache = t_nocache == g_cache.tokens;
    let eager_len = t_cache.iter().all(|c| c.len() == new);

    // Throughputs from the median call over all rounds: (per wall second, per CPU second).
    let n = batch_n as f64;
    let tput = |t: &Times| {
        let (w, c) = t.median();
        (n / w, n / c)
    };
    let e = [
        tput(&torch_times[0]),
        tput(&torch_times[1]),
        tput(&torch_times[2]),
    ];
    let w32 = [
        tput(&models[0].times[0]),
        tput(&models[0].times[1]),
        tput(&models[0].times[2]),
    ];
    // Per-round ratios of throughput (the other's seconds per call over ours).
    let vs_eager = |ti: usize| {
        let r = &per_round[ti];
        let wall: Vec<f64> = r.iter().map(|r| r.eager.0 / r.ours.0).collect();
        let cpu: Vec<f64> = r.iter().map(|r| r.eager.1 / r.ours.1).collect();
        (wall, cpu)
    };
    let speedup = |pick: fn(&Round) -> Med| {
        let (c, nc) = (&per_round[1], &per_round[2]);
        let wall: Vec<f64> = c
            .iter()
            .zip(nc)
            .map(|(c, nc)| pick(nc).0 / pick(c).0)
            .collect();
        let cpu: Vec<f64> = c
            .iter()
            .zip(nc)
            .map(|(c, nc)| pick(nc).1 / pick(c).1)
            .collect();
        (wall, cpu)
    };
    let (w_speed_wall, w_speed_cpu) = speedup(|r| r.ours);
    let (e_speed_wall, e_speed_cpu) = speedup(|r| r.eager);
    let (emb_wall, emb_cpu) = vs_eager(0);
    let (cap_wall, cap_cpu) = vs_eager(1);
    let (nc_wall, nc_cpu) = vs_eager(2);

    let torch_v = ready["torch"].as_str().unwrap_or("?");
    println!(
        "flavor {flavor}, batch {batch_n}, {new} new tokens per caption on both sides (greedy, no stop token), f32, CPU, {threads} thread(s) per side, torch {torch_v}"
    );
    println!(
        "{rounds} interleaved rounds (per task: weaver's calls, then eager's): {} embedding calls, {} caption calls per side and round; medians over all calls; per CPU-s = per second of the process's CPU time (all threads), the figure to read on a loaded machine",
        calls(Task::Embed),
        calls(Task::Caption)
    );
    println!(
        "{:<22}{:>22}{:>24}{:>24}",
        "", "embeddings", "captions, KV cache", "captions, no cache"
    );
    println!(
        "{:<22}{:>12}{:>10}{:>14}{:>10}{:>14}{:>10}",
        "", "img/CPU-s", "img/s", "cap/CPU-s", "cap/s", "cap/CPU-s", "cap/s"
    );
    let row = |label: &str, x: [(f64, f64); 3], nocache: bool| {
        let nc = |v: f64| {
            if nocache {
                format!("{v:.2}")
            } else {
                "-".into()
            }
        };
        println!(
            "{:<22}{:>12.1}{:>10.1}{:>14.2}{:>10.2}{:>14}{:>10}",
            label,
            x[0].1,
            x[0].0,
            x[1].1,
            x[1].0,
            nc(x[2].1),
            nc(x[2].0)
        );
    };
    row("pytorch eager", e, true);
    row("weaver f32", w32, true);
    let nan = (f64::NAN, f64::NAN);
    let mut int8_tput = Vec::new();
    for w in &models[1..] {
        let x = [tput(&w.times[0]), tput(&w.times[1]), nan];
        row(&format!("weaver {}", w.label), x, false);
        int8_tput.push(x);
    }
    println!("weaver f32 / eager (like for like: the same operations on both sides), median of the per-round ratios [each round]:");
    println!(
        "  embeddings   per CPU-s {:.2}x [{}] (goal >= 1), per wall-s {:.2}x [{}]",
        median(emb_cpu.clone()),
        fmt_list(&emb_cpu),
        median(emb_wall.clone()),
        fmt_list(&emb_wall)
    );
    println!(
        "  captions, KV cache   per CPU-s {:.2}x [{}], per wall-s {:.2}x [{}]",
        median(cap_cpu.clone()),
        fmt_list(&cap_cpu),
        median(cap_wall.clone()),
        fmt_list(&cap_wall)
    );
    println!(
        "  captions, no cache   per CPU-s {:.2}x [{}], per wall-s {:.2}x [{}]",
        median(nc_cpu.clone()),
        fmt_list(&nc_cpu),
        median(nc_wall.clone()),
        fmt_list(&nc_wall)
    );
    println!(
        "KV-cache speed-up at {new} new tokens (cached / uncached captions per second), median of rounds [each round]: weaver per CPU-s {:.2}x [{}] (goal >= 3), per wall-s {:.2}x [{}]; eager per CPU-s {:.2}x [{}], per wall-s {:.2}x [{}]",
        median(w_speed_cpu.clone()),
        fmt_list(&w_speed_cpu),
        median(w_speed_wall.clone()),
        fmt_list(&w_speed_wall),
        median(e_speed_cpu.clone()),
        fmt_list(&e_speed_cpu),
        median(e_speed_wall.clone()),
        fmt_list(&e_speed_wall)
    );
    // int8 against f32, per round (a different mechanism: int8 weights).
    let mut int8_ratio = Vec::new();
    for (mi, w) in models.iter().enumerate().skip(1) {
        let f = |ti: usize| -> Vec<f64> {
            int8_round[mi][ti]
                .iter()
                .zip(&per_round[ti])
                .map(|(q, r)| r.ours.1 / q.1)
                .collect()
        };
        let (emb, cap) = (f(0), f(1));
        println!(
            "{} / weaver f32 (a different mechanism: int8 weights), per CPU-s: embeddings {:.2}x [{}], captions (KV cache) {:.2}x [{}]",
            w.label,
            median(emb.clone()),
            fmt_list(&emb),
            median(cap.clone()),
            fmt_list(&cap)
        );
        int8_ratio.push((emb, cap));
    }
    println!(
        "checks: eager vs weaver max |diff| image embeddings {img_diff:.2e}, text embeddings {txt_diff:.2e}, caption log-probabilities {lp_diff:.2e}; captions identical (eager cached / uncached vs weaver): {eq_cache} / {eq_nocache}; every caption {new} tokens: weaver true, eager {eager_len}"
    );

    let common = json!({"bench": "infer", "flavor": flavor, "batch": batch_n, "new_tokens": new, "dtype": "f32", "device": "cpu", "threads": threads, "rounds": rounds, "embed_calls_per_round": calls(Task::Embed), "caption_calls_per_round": calls(Task::Caption)});
    let line = |v: Value| {
        let mut m = common.as_object().cloned().unwrap_or_default();
        if let Value::Object(o) = v {
            m.extend(o);
        }
        println!("RESULT {}", Value::Object(m));
    };
    let figures = |x: &[(f64, f64); 3]| {
        json!({
            "images_per_s": x[0].0, "images_per_cpu_s": x[0].1,
            "captions_per_s": x[1].0, "captions_per_cpu_s": x[1].1,
            "captions_no_cache_per_s": x[2].0, "captions_no_cache_per_cpu_s": x[2].1,
        })
    };
    let merge = |mut a: Value, b: Value| {
        if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
            a.extend(b);
        }
        a
    };
    line(merge(
        merge(json!({"impl": "pytorch_eager"}), figures(&e)),
        json!({
            "cache_speedup_cpu": median(e_speed_cpu.clone()), "cache_speedup_wall": median(e_speed_wall.clone()),
            "cache_speedup_round_cpu": e_speed_cpu, "cache_speedup_round_wall": e_speed_wall,
        }),
    ));
    line(merge(
        merge(json!({"impl": "weaver", "weights": "f32"}), figures(&w32)),
        json!({
            "embed_vs_eager_cpu": median(emb_cpu.clone()), "embed_vs_eager_wall": median(emb_wall.clone()),
            "embed_vs_eager_round_cpu": emb_cpu, "embed_vs_eager_round_wall": emb_wall,
            "caption_vs_eager_cpu": median(cap_cpu.clone()), "caption_vs_eager_wall": median(cap_wall.clone()),
            "caption_vs_eager_round_cpu": cap_cpu, "caption_vs_eager_round_wall": cap_wall,
            "caption_no_cache_vs_eager_cpu": median(nc_cpu.clone()), "caption_no_cache_vs_eager_wall": median(nc_wall.clone()),
            "caption_no_cache_vs_eager_round_cpu": nc_cpu, "caption_no_cache_vs_eager_round_wall": nc_wall,
            "cache_speedup_cpu": median(w_speed_cpu.clone()), "cache_speedup_wall": median(w_speed_wall.clone()),
            "cache_speedup_round_cpu": w_speed_cpu, "cache_speedup_round_wall": w_speed_wall,
            "image_emb_max_diff_vs_eager": img_diff, "text_emb_max_diff_vs_eager": txt_diff,
            "log_prob_max_diff_vs_eager": lp_diff,
            "captions_equal_eager_cache": eq_cache, "captions_equal_eager_no_cache": eq_nocache,
        }),
    ));
    for ((w, x), (emb, cap)) in models[1..].iter().zip(&int8_tput).zip(int8_ratio) {
        line(json!({
            "impl": "weaver", "weights": w.label,
            "images_per_s": x[0].0, "images_per_cpu_s": x[0].1,
            "captions_per_s": x[1].0, "captions_per_cpu_s": x[1].1,
            "embed_vs_f32_cpu": median(emb.clone()), "embed_vs_f32_round_cpu": emb,
            "caption_vs_f32_cpu": median(cap.clone()), "caption_vs_f32_round_cpu": cap,
        }));
    }
    Ok(())
}
