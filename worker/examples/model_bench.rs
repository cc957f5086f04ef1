//! bench/model: training-step time, throughput, MFU, peak memory and counted work of
//! weaver against PyTorch (python/weaver_ref.py, the same model) on the same weights and the
//! same fixed batch, in one run: PyTorch eager always, torch.compile on request. Run it
//! through bench/model/run.sh, or bench/gpu/run.sh on the GPU machine.
//!
//!     model_bench --config FILE [--set k=v]... [--steps N] [--warmup N]
//!                 [--no-torch] [--torch-compile] [--compile-backend B]
//!                 [--python PATH] [--ref-script PATH] [--no-count] [--deadline-s S]
//!                 [--rounds N] [--save-inputs DIR]
//!
//! A step is the whole update: forward and backward of every micro-batch, gradient
//! clipping, AdamW; weaver's is the step of the trainer `weaver train` runs, unlogged (see
//! `Step`). FLOPs per step come from the model's formula (the same formula on both sides),
//! MFU against `train.peak_tflops` when it is set. `host_syncs_per_step` is counted by the
//! trainer's own counter (device→host reads of an unlogged step; a logged step's apart).
//!
//! * The PyTorch side is chosen at run time: the interpreter from `--python`, else
//!   `$WEAVER_PYTHON`, else `python3`; the script from `--ref-script`, else
//!   `$WEAVER_REF_SCRIPT`, else `python/weaver_ref.py` under the working directory, else
//!   the one in the source tree this was built from.
//! * Counted, not estimated (weaver-prof, libtorch's Kineto profiler; PyTorch's side uses
//!   torch.profiler with the same definitions): one extra, untimed step is profiled. On
//!   CUDA: `kernel_launches_per_step` (kernels that ran on the GPU), copies, memsets and
//!   `cuda_sync_calls_per_step` (host calls that blocked on the device). On both devices:
//!   `aten_ops_per_step` (ATen operator calls, nested included) — on a CPU that is the
//!   figure to read, since a CPU launches no kernels.
//! * Peak memory (CUDA): the caching allocator's peak of allocated bytes over the timed
//!   steps, persistent state (weights, optimizer moments) included, on both sides
//!   (`torch.cuda.max_memory_allocated`). weaver's cached blocks are returned to the driver
//!   before PyTorch runs on the same GPU.
//!
//! * Robust to a busy machine: on a CPU the eager steps are interleaved with ours,
//!   `--rounds N` (default 3; 0 = ours, then PyTorch's, as on CUDA, where both sides would
//!   share the GPU's memory) rounds of `--steps` steps per side, ours then PyTorch's (kept
//!   waiting on its stdin, `weaver_ref.py bench --serve`). Each step is timed in wall time
//!   and in CPU time of its process (every thread; `CLOCK_PROCESS_CPUTIME_ID`, Python's
//!   `time.process_time()`); the figures are medians over all timed steps, and the ratio
//!   is also given per round. When other processes share the cores, CPU time is the
//!   figure to read.
//! * `--ops N`: where the host time of the profiled step goes, operator by operator: the N
//!   operators with the largest self time (span less the operators it called; what
//!   `torch.profiler`'s `key_averages()` sorts by "self CPU") on either side, weaver's next
//!   to eager's. The profiler's own overhead is inside these figures; compare them with each
//!   other, not with the timed steps.
//! * `--save-inputs DIR`: writes the PyTorch side's config, the weights and the batch to
//!   DIR (to profile that side by hand).
//! * `--deadline-s S`: the PyTorch side is stopped S seconds after the start (less a few to
//!   print), keeping the modes it measured (each prints its figures as soon as it has
//!   them); a mode that failed or did not finish shows why, and the exit status is 1.
//!
//! The binary links libtorch_cuda (worker/build.rs), so `--set train.device=cuda` works.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tch::{Device, Kind, Tensor};
use weaver_models::data::{tokens_per_sample, Split};
use weaver_models::model::LossWeights;
use weaver_models::JobConfig;
use weaver_prof::{cuda_memory, Counts, OpTime, ProfError};
use weaver_worker::data::FixedBatches;
use weaver_worker::parallel::ParallelTrainer;
use weaver_worker::sync::host_syncs;
use weaver_worker::train::{configure_threads, dataset, save_params};

#[path = "common/cpu_time.rs"]
mod cpu_time;
#[path = "common/piped.rs"]
mod piped;
use cpu_time::process_cpu_s;

struct Args {
    config: PathBuf,
    sets: Vec<String>,
    steps: usize,
    warmup: usize,
    torch: bool,
    compile: bool,
    compile_backend: String,
    python: Option<String>,
    ref_script: Option<PathBuf>,
    count: bool,
    ops: usize,
    deadline_s: Option<f64>,
    rounds: Option<usize>,
    save_inputs: Option<PathBuf>,
}

const USAGE: &str = "model_bench --config FILE [--set k=v]... [--steps N] [--warmup N] \
    [--no-torch] [--torch-compile] [--compile-backend B] [--python PATH] [--ref-script PATH] \
    [--no-count] [--ops N] [--deadline-s S] [--rounds N] [--save-inputs DIR]";

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        config: PathBuf::from("configs/debug.toml"),
        sets: Vec::new(),
        steps: 10,
        warmup: 3,
        torch: true,
        compile: false,
        compile_backend: "inductor".into(),
        python: None,
        ref_script: None,
        count: true,
        ops: 0,
        deadline_s: None,
        rounds: None,
        save_inputs: None,
    };
    let mut it = std::env::args().skip(1);
    let value = |it: &mut std::iter::Skip<std::env::Args>, flag: &str| {
        it.next()
            .with_context(|| format!("{flag} needs a value; usage: {USAGE}"))
    };
    while let Some(x) = it.next() {
        match x.as_str() {
            "--config" => a.config = value(&mut it, "--config")?.into(),
            "--set" => a.sets.push(value(&mut it, "--set")?),
            "--steps" => a.steps = value(&mut it, "--steps")?.parse().context("--steps N")?,
            "--warmup" => a.warmup = value(&mut it, "--warmup")?.parse().context("--warmup N")?,
            "--no-torch" => a.torch = false,
            "--torch-compile" => a.compile = true,
            "--compile-backend" => a.compile_backend = value(&mut it, "--compile-backend")?,
            "--python" => a.python = Some(value(&mut it, "--python")?),
            "--ref-script" => a.ref_script = Some(value(&mut it, "--ref-script")?.into()),
            "--no-count" => a.count = false,
            // The table comes from the counted step.
            "--ops" => {
                a.ops = value(&mut it, "--ops")?.parse().context("--ops N")?;
                a.count = a.ops > 0 || a.count;
            }
            "--rounds" => {
                a.rounds = Some(value(&mut it, "--rounds")?.parse().context("--rounds N")?)
            }
            "--save-inputs" => a.save_inputs = Some(value(&mut it, "--save-inputs")?.into()),
            "--deadline-s" => {
                a.deadline_s = Some(
                    value(&mut it, "--deadline-s")?
                        .parse()
                        .context("--deadline-s S")?,
                )
            }
            other => bail!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The PyTorch reference script: see the module documentation for the order of choices.
fn ref_script(a: &Args) -> anyhow::Result<PathBuf> {
    let chosen = a
        .ref_script
        .clone()
        .or_else(|| std::env::var_os("WEAVER_REF_SCRIPT").map(PathBuf::from));
    if let Some(p) = chosen {
        if !p.is_file() {
            bail!(
                "the PyTorch reference script {} does not exist",
                p.display()
            );
        }
        return Ok(p);
    }
    let here = PathBuf::from("python/weaver_ref.py");
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python/weaver_ref.py");
    [here, built_from]
        .into_iter()
        .find(|p| p.is_file())
        .context("python/weaver_ref.py not found; pass --ref-script PATH or set WEAVER_REF_SCRIPT")
}

/// The PyTorch side's process (`what` names it in messages): the JSON lines it prints,
/// read on a thread as they come, and its stdin (open while steps are interleaved).
struct TorchProc {
    child: std::process::Child,
    what: String,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    errors: std::thread::JoinHandle<String>,
    /// The mode lines (`{"mode": ..}`) read so far.
    runs: Vec<serde_json::Value>,
}

impl TorchProc {
    fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<TorchProc> {
        // Its own process group: stopping it at the deadline also stops the compile workers
        // torch.compile starts.
        let piped::Piped {
            child,
            stdin,
            lines,
            errors,
        } = piped::spawn(cmd.process_group(0), what)?;
        Ok(TorchProc {
            stdin,
            child,
            what: what.to_string(),
            lines,
            errors,
            runs: Vec::new(),
        })
    }

    /// The next JSON line that has `key` (mode lines seen meanwhile are kept); `None` when
    /// the process ended or `deadline` passed first.
    fn wait_for(&mut self, key: &str, deadline: Option<Instant>) -> Option<serde_json::Value> {
        loop {
            let wait = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            match self.lines.recv_timeout(wait) {
                Ok(line) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v.get(key).is_some() {
                            if key == "mode" {
                                self.runs.push(v.clone());
                            }
                            return Some(v);
                        }
                        if v.get("mode").is_some() {
                            self.runs.push(v);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return None;
                    }
                }
            }
        }
    }

    /// Sends one command line to an interleaved run.
    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let stdin = self
            .stdin
            .as_mut()
            .context("the PyTorch side's stdin is closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("{} stopped listening", self.what))
    }

    /// Collects the mode lines until the process ends, or kills it at `deadline` keeping
    /// what it measured so far. A process that fails or is stopped adds a line
    /// `{"process": why}` (with the end of its stderr).
    fn finish(mut self, deadline: Option<Instant>) -> anyhow::Result<Vec<serde_json::Value>> {
        drop(self.stdin.take());
        let mut stopped = false;
        while self.wait_for("mode", deadline).is_some() {}
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) on the process group this program started (the child
                // leads it); it touches no memory of ours.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            stopped = true;
        }
        let status = self.child.wait()?;
        let err = self.errors.join().unwrap_or_default();
        let tail: String = {
            let lines: Vec<&str> = err.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        let what = &self.what;
        if stopped {
            self.runs.push(serde_json::json!({
                "process": format!("{what} was stopped at the deadline (--deadline-s) before it finished"),
            }));
        } else if !status.success() {
            self.runs.push(serde_json::json!({
                "process": format!("{what} failed ({status}): {tail}"),
            }));
        }
        if !tail.trim().is_empty() && (stopped || !status.success()) {
            eprintln!("{what} said:\n{tail}");
        }
        Ok(self.runs)
    }
}

/// One training step of weaver on a fixed batch: the unit this bench times and counts.
///
/// It is the step of the trainer `weaver train` runs (`ParallelTrainer`, the layout
/// collapsed into one process: schedule executor, f32 gradient buckets, device-side norm and
/// clip, fused AdamW over flat buffers), fed the fixed batch instead of the data source, and
/// unlogged (nothing read back to the host, as on every step but the logged ones).
struct Step {
    trainer: ParallelTrainer,
    device: Device,
}

/// Seconds spent in each part of a step: the pipeline schedule (forwards and backwards of
/// every micro-batch) and the rest (gradient reduction, norm, clip, AdamW), the latter with a
/// device synchronisation at the end.
#[derive(Default)]
struct Parts {
    forward_backward: Vec<f64>,
    rest: Vec<f64>,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

impl Step {
    fn sync(&self) {
        sync(self.device);
    }

    /// One unlogged step. With `parts`, the step is synchronized at its end and split into
    /// the schedule (host time; on a GPU the kernels it queued may still run) and the rest.
    fn run(&mut self, parts: Option<&mut Parts>) -> anyhow::Result<()> {
        let t0 = Instant::now();
        self.trainer.step_once(false)?;
        if let Some(p) = parts {
            self.sync();
            let all = t0.elapsed().as_secs_f64();
            let schedule = self.trainer.last_schedule_times().1;
            p.forward_backward.push(schedule);
            p.rest.push(all - schedule);
        }
        Ok(())
    }

    /// One logged step (losses, norm and control requests read back): its loss (the mean
    /// over the micro-batches; the anchor reports its last micro-batch's, the same with one).
    fn logged(&mut self) -> anyhow::Result<f64> {
        Ok(self.trainer.train_step()?.loss)
    }
}

/// The `n` operators with the largest self time on either side: weaver's profiled step next
/// to eager's (`[{name, calls, self_ns}]` from weaver_ref.py `--ops`).
fn print_ops(ours: &[OpTime], eager: &[serde_json::Value], n: usize) {
    let mut theirs: Vec<OpTime> = eager
        .iter()
        .filter_map(|o| {
            Some(OpTime {
                name: o["name"].as_str()?.to_string(),
                calls: o["calls"].as_u64()?,
                self_ns: o["self_ns"].as_u64()?,
            })
        })
        .collect();
    theirs.sort_by_key(|o| std::cmp::Reverse(o.self_ns));
    let find = |ops: &'_ [OpTime], name: &str| ops.iter().find(|o| o.name == name).cloned();
    let key = |name: &str| {
        let self_ns = |o: Option<OpTime>| o.map_or(0, |o| o.self_ns);
        self_ns(find(ours, name)).max(self_ns(find(&theirs, name)))
    };
    let mut names: Vec<&str> = ours
        .iter()
        .take(n)
        .chain(theirs.iter().take(n))
        .map(|o| o.name.as_str())
        .collect();
    names.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.cmp(b)));
    names.dedup();
    let total = |ops: &[OpTime]| ops.iter().map(|o| o.self_ns).sum::<u64>() as f64 / 1e6;
    println!(
        "where the profiled step's host time goes (self time per operator, ms; the profiler's overhead included):"
    );
    println!(
        "{:<60} {:>10} {:>7} {:>10} {:>7}",
        "operator", "weaver", "calls", "eager", "calls"
    );
    let cell = |x: Option<OpTime>| match x {
        Some(o) => format!("{:>10.2} {:>7}", o.self_ns as f64 / 1e6, o.calls),
        None => format!("{:>10} {:>7}", "-", "-"),
    };
    for name in names.iter().take(n) {
        let shown: String = name.chars().take(60).collect();
        println!(
            "{shown:<60} {} {}",
            cell(find(ours, name)),
            cell(find(&theirs, name))
        );
    }
    println!(
        "{:<60} {:>10.2} {:>7} {:>10.2}",
        "all operators",
        total(ours),
        "",
        total(&theirs)
    );
}

/// What PyTorch reported for one mode (eager, compile).
struct TorchRun {
    label: String,
    key: &'static str,
    step_s: f64,
    /// Median CPU seconds per step (the process's, every thread).
    cpu_s: Option<f64>,
    peak_bytes: Option<f64>,
    counts: Option<serde_json::Value>,
    loss: f64,
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let a = args()?;
    let mut job = JobConfig::load(&a.config, &a.sets)?;
    // The anchor trains at a constant learning rate (torch.optim.AdamW with no scheduler):
    // so does the trainer here, or the losses compared below would differ by the schedule.
    job.train.warmup_steps = 0;
    job.train.min_lr_ratio = 1.0;
    let threads = configure_threads(job.train.threads, 1);
    let dir = tempfile::tempdir()?;
    let mut trainer = ParallelTrainer::solo(job.clone(), dir.path().join("run"), false)?;
    let device = trainer.store().device;
    let cuda = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
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
        mlm: 0.0,
        vqa: 0.0,
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
    let dtype = match trainer.store().kind {
        Kind::BFloat16 => "bf16",
        _ => "f32",
    };
    let pad_id = data.tokenizer.pad_id();
    let params = trainer.store().numel();
    let mut step = Step { trainer, device };

    // The PyTorch side's command line (`serve`: eager steps interleaved with ours).
    let py = a
        .python
        .clone()
        .or_else(|| std::env::var("WEAVER_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let script = ref_script(&a)?;
    let modes: &[&str] = if a.compile {
        &["eager", "compile"]
    } else {
        &["eager"]
    };
    let what = format!("{py} {}", script.display());
    let torch_cmd = |serve: bool| -> anyhow::Result<Command> {
        let meta = serde_json::json!({
            "model": job.model,
            "weights": {"itc": w.itc, "caption": w.caption, "itm": w.itm},
            "pad_id": pad_id,
            "train": job.train,
        });
        let cfg = dir.path().join("cfg.json");
        std::fs::write(&cfg, meta.to_string())?;
        let dev = match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        };
        let mut cmd = Command::new(&py);
        cmd.arg(&script)
            .arg("bench")
            .arg("--config")
            .arg(&cfg)
            .arg("--weights")
            .arg(&weights)
            .arg("--batch")
            .arg(&batch_path)
            .args(["--device", &dev, "--dtype", dtype])
            .args(["--steps", &a.steps.to_string()])
            .args(["--warmup", &a.warmup.to_string()])
            .args(["--microbatches", &k.to_string()])
            .args(["--threads", &threads.to_string()])
            .args([
                "--modes",
                &modes.join(","),
                "--compile-backend",
                &a.compile_backend,
            ]);
        if a.count {
            cmd.arg("--count");
        }
        if a.ops > 0 {
            cmd.args(["--ops", &a.ops.to_string()]);
        }
        if serve {
            cmd.arg("--serve");
        }
        Ok(cmd)
    };
    // Leave a few seconds to print what was measured before the caller's deadline.
    let deadline = a
        .deadline_s
        .map(|s| started + Duration::from_secs_f64((s - 5.0).max(0.0)));
    let rounds = a.rounds.unwrap_or(if cuda.is_some() { 0 } else { 3 });
    if rounds > 0 && cuda.is_some() {
        bail!("--rounds: interleaving shares the GPU's memory between both sides; use --rounds 0 on CUDA");
    }
    let interleaved = rounds > 0 && a.torch;
    if let Some(out) = &a.save_inputs {
        // For profiling the PyTorch side by hand: its config, the weights and the batch.
        std::fs::create_dir_all(out)?;
        drop(torch_cmd(false)?);
        for f in ["cfg.json", "w.safetensors", "batch.safetensors"] {
            std::fs::copy(dir.path().join(f), out.join(f))
                .with_context(|| format!("--save-inputs {}", out.display()))?;
        }
    }
    // Interleaved: PyTorch warms up beside our warmup, then waits for each round.
    let mut proc = if interleaved {
        Some(TorchProc::spawn(&mut torch_cmd(true)?, &what)?)
    } else {
        None
    };

    // Warmup, then the timed steps (one synchronisation at the end of each).
    for _ in 0..a.warmup {
        step.run(None)?;
    }
    step.sync();
    let mut ready = match proc.as_mut() {
        Some(p) => p.wait_for("ready", deadline).is_some(),
        None => false,
    };
    // The figures beside the step time are worth having, not worth losing the time over:
    // a profiler or allocator that will not answer is reported, and its columns stay empty.
    let warn = |what: &str, e: &dyn std::fmt::Display| eprintln!("model_bench: {what}: {e}");
    let mut peak_ok = true;
    if let Some(i) = cuda {
        if let Err(e) = cuda_memory::reset_peak(i) {
            warn("no peak memory", &e);
            peak_ok = false;
        }
    }
    // The timed steps, `a.steps` per round (one round unless interleaved), each round of
    // ours followed by one of PyTorch's; the very last step is logged, and its loss is the
    // one compared with the anchor's (the loss of its last timed step, after the same number
    // of updates).
    let mut times = Vec::new();
    let mut cpu_times = Vec::new();
    let mut round_ratios: Vec<(f64, f64)> = Vec::new();
    let mut unlogged = 0;
    let mut host_syncs_per_logged_step = 0;
    let mut loss = f64::NAN;
    for r in 0..rounds.max(1) {
        let (mut wall, mut used) = (Vec::new(), Vec::new());
        for i in 0..a.steps {
            let last = r + 1 == rounds.max(1) && i + 1 == a.steps;
            step.sync();
            let before = host_syncs();
            let (t0, c0) = (Instant::now(), process_cpu_s());
            if last {
                loss = step.logged()?;
            } else {
                step.run(None)?;
            }
            step.sync();
            wall.push(t0.elapsed().as_secs_f64());
            used.push(process_cpu_s() - c0);
            // Device→host reads of the trainer's step path, counted by its own counter
            // (`weaver_worker::sync`): per unlogged step, and for one logged step.
            if last {
                host_syncs_per_logged_step = host_syncs() - before;
            } else {
                unlogged += host_syncs() - before;
            }
        }
        if let (Some(p), true) = (proc.as_mut(), ready) {
            p.send(&format!("run {}", a.steps))?;
            match p.wait_for("round", deadline) {
                Some(v) => {
                    let nums = |k: &str| -> Vec<f64> {
                        v[k].as_array()
                            .map(|x| x.iter().filter_map(|x| x.as_f64()).collect())
                            .unwrap_or_default()
                    };
                    let (tw, tc) = (nums("wall_s"), nums("cpu_s"));
                    if !tw.is_empty() && !tc.is_empty() {
                        round_ratios.push((
                            median(wall.clone()) / median(tw),
                            median(used.clone()) / median(tc),
                        ));
                    }
                }
                None => ready = false,
            }
        }
        times.extend(wall);
        cpu_times.extend(used);
    }
    if let (Some(p), true) = (proc.as_mut(), ready) {
        p.send("done")?;
    }
    let host_syncs_per_step = unlogged as f64 / (times.len() - 1).max(1) as f64;
    let ours = median(times);
    let ours_cpu = median(cpu_times);
    let our_peak = match cuda {
        Some(i) if peak_ok => match cuda_memory::peak(i) {
            Ok(p) => Some(p.allocated as f64),
            Err(e) => {
                warn("no peak memory", &e);
                None
            }
        },
        _ => None,
    };
    // Untimed: where a step's time goes, and what it did, counted.
    let mut parts = Parts::default();
    for _ in 0..a.steps.min(3) {
        step.run(Some(&mut parts))?;
    }
    let mut our_ops: Vec<OpTime> = Vec::new();
    let counts: Option<Counts> = if a.count {
        match weaver_prof::count_ops(cuda, || step.run(None)) {
            Ok((_, c, ops)) => {
                our_ops = ops;
                Some(c)
            }
            Err(ProfError::Work(e)) => bail!("the profiled step failed: {e}"),
            Err(e) => {
                warn("no counts", &e);
                None
            }
        }
    } else {
        None
    };
    drop(step);
    if cuda.is_some() {
        // PyTorch runs next on the same GPU: give it the memory weaver's allocator caches.
        if let Err(e) = cuda_memory::empty_cache() {
            warn("weaver's cached CUDA memory stays held", &e);
        }
    }

    let flops = job.model.train_flops_per_sample(w.itm > 0.0) * gb as f64;
    let tokens = (gb * tokens_per_sample(job.model.num_patches(), job.model.max_text_len)) as f64;

    let mut theirs: Vec<TorchRun> = Vec::new();
    // Modes that produced no figures: (key, label, why).
    let mut missing: Vec<(&str, String, String)> = Vec::new();
    if a.torch {
        let runs = match proc {
            Some(p) => p.finish(deadline)?,
            None => TorchProc::spawn(&mut torch_cmd(false)?, &what)?.finish(deadline)?,
        };
        for mode in modes {
            let (key, label) = match *mode {
                "eager" => ("torch", "pytorch eager".to_string()),
                _ => ("compile", format!("torch.compile ({})", a.compile_backend)),
            };
            let m = runs.iter().find(|r| r["mode"] == *mode);
            match m.and_then(|m| m["step_s"].as_f64().map(|s| (m, s))) {
                Some((m, step_s)) => theirs.push(TorchRun {
                    label,
                    key,
                    step_s,
                    cpu_s: m["cpu_step_s"].as_f64(),
                    peak_bytes: m["peak_mem_bytes"].as_f64(),
                    counts: m.get("counts").cloned(),
                    loss: m["loss"].as_f64().unwrap_or(f64::NAN),
                }),
                None => {
                    let why = m
                        .and_then(|m| m["error"].as_str())
                        .map(String::from)
                        .unwrap_or_else(|| {
                            runs.iter()
                                .find_map(|r| r["process"].as_str())
                                .unwrap_or("no figures")
                                .to_string()
                        });
                    missing.push((key, label, why));
                }
            }
        }
    }

    let peak = (t.peak_tflops > 0.0).then_some(t.peak_tflops * 1e12);
    fn opt_str(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
        x.map(f).unwrap_or_else(|| "-".into())
    }
    println!(
        "model bench: flavor {} ({:.3e} params), fusion {}, device {:?}, {dtype}, global batch {gb} in {k} micro-batch(es), {threads} thread(s)",
        job.model.flavor,
        job.model.num_params() as f64,
        job.model.fusion.name(),
        device
    );
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>12} {:>9} {:>7} {:>9} {:>9} {:>9} {:>7}",
        "",
        "step (ms)",
        "CPU ms",
        "samples/s",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak GiB",
        "ATen ops",
        "kernels",
        "syncs"
    );
    let count_of = |c: &Option<serde_json::Value>, k: &str| c.as_ref().and_then(|c| c[k].as_f64());
    let row = |name: &str,
               s: f64,
               cpu_s: Option<f64>,
               mem: Option<f64>,
               ops: Option<f64>,
               kern: Option<f64>,
               sy: Option<f64>| {
        println!(
            "{name:<26} {:>10.2} {:>10} {:>10.1} {:>12.0} {:>9.3} {:>7} {:>9} {:>9} {:>9} {:>7}",
            s * 1e3,
            opt_str(cpu_s, |c| format!("{:.2}", c * 1e3)),
            gb as f64 / s,
            tokens / s,
            flops / s / 1e12,
            opt_str(peak, |p| format!("{:.1}%", 100.0 * flops / s / p)),
            opt_str(mem, |m| format!("{:.2}", m / (1u64 << 30) as f64)),
            opt_str(ops, |x| format!("{x:.0}")),
            opt_str(kern, |x| format!("{x:.0}")),
            opt_str(sy, |x| format!("{x:.0}")),
        )
    };
    let on_cuda = |x: u64| cuda.map(|_| x as f64);
    row(
        "weaver",
        ours,
        Some(ours_cpu),
        our_peak,
        counts.map(|c| c.aten_ops as f64),
        counts.and_then(|c| on_cuda(c.gpu_kernels)),
        counts.and_then(|c| on_cuda(c.sync_calls)),
    );
    for r in &theirs {
        row(
            &r.label,
            r.step_s,
            r.cpu_s,
            r.peak_bytes,
            count_of(&r.counts, "aten_ops"),
            count_of(&r.counts, "gpu_kernels"),
            count_of(&r.counts, "sync_calls"),
        );
    }
    for (_, label, why) in &missing {
        println!("{label:<26} no figures: {why}");
    }
    for r in &theirs {
        print!("weaver / {} step time: {:.3}", r.label, ours / r.step_s);
        if let Some(c) = r.cpu_s {
            print!(", CPU time per step: {:.3}", ours_cpu / c);
        }
        println!();
    }
    let round_wall: Vec<f64> = round_ratios.iter().map(|r| r.0).collect();
    let round_cpu: Vec<f64> = round_ratios.iter().map(|r| r.1).collect();
    if interleaved {
        println!(
            "interleaved: {rounds} rounds of {} steps per side (weaver, then eager); weaver / eager per round, wall: [{}], CPU: [{}]; medians {:.3} and {:.3}",
            a.steps,
            round_wall.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", "),
            round_cpu.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", "),
            if round_wall.is_empty() { f64::NAN } else { median(round_wall.clone()) },
            if round_cpu.is_empty() { f64::NAN } else { median(round_cpu.clone()) },
        );
    }
    if dtype == "bf16" && !theirs.is_empty() {
        println!(
            "note: weaver keeps bf16 weights with f32 masters and computes in bf16; PyTorch \
             keeps f32 weights under bf16 autocast (a different mechanism): the matmuls are \
             bf16 on both sides, but autocast keeps the residual stream and the layer norms' \
             outputs in f32"
        );
    }
    if cuda.is_none() {
        println!(
            "note: on a CPU there are no kernel launches; 'ATen ops' is the op count per step \
             (ATen operator calls, nested included)"
        );
    }
    println!(
        "weaver step parts (ms): schedule (forward+backward) {:.2}, the rest (gradient reduction, norm, clip, AdamW; synchronized) {:.2}",
        median(parts.forward_backward) * 1e3,
        median(parts.rest) * 1e3
    );
    println!(
        "weaver host syncs (device→host reads of the step, counted): {host_syncs_per_step:.1} per unlogged step, {host_syncs_per_logged_step} per logged step"
    );
    if a.ops > 0 {
        let eager_ops = theirs
            .iter()
            .find(|r| r.key == "torch")
            .and_then(|r| r.counts.as_ref())
            .and_then(|c| c["ops"].as_array().cloned())
            .unwrap_or_default();
        print_ops(&our_ops, &eager_ops, a.ops);
    }
    print!("final loss: weaver {loss:.4}");
    for r in &theirs {
        print!(", {} {:.4}", r.label, r.loss);
    }
    println!();

    let mut result = serde_json::json!({
        "bench": "model", "flavor": job.model.flavor, "device": format!("{device:?}"),
        "dtype": dtype, "global_batch": gb, "params": params,
        "flops_per_step": flops, "threads": threads,
        "weaver_step_s": ours, "weaver_cpu_step_s": ours_cpu,
        "interleaved_rounds": if interleaved { rounds } else { 0 },
        "weaver_samples_per_s": gb as f64 / ours,
        "weaver_tokens_per_s": tokens / ours, "weaver_tflops": flops / ours / 1e12,
        "weaver_peak_mem_bytes": our_peak, "weaver_loss": loss,
        "host_syncs_per_step": host_syncs_per_step,
        "host_syncs_per_logged_step": host_syncs_per_logged_step,
    });
    if let Some(c) = counts {
        result["aten_ops_per_step"] = c.aten_ops.into();
        result["kernel_launches_per_step"] = on_cuda(c.gpu_kernels).into();
        result["gpu_memcpys_per_step"] = on_cuda(c.gpu_memcpys).into();
        result["gpu_memsets_per_step"] = on_cuda(c.gpu_memsets).into();
        result["cuda_sync_calls_per_step"] = on_cuda(c.sync_calls).into();
    }
    if let Some(p) = peak {
        result["weaver_mfu"] = (flops / ours / p).into();
    }
    for r in &theirs {
        let key = r.key;
        result[format!("{key}_step_s")] = r.step_s.into();
        result[format!("{key}_cpu_step_s")] = r.cpu_s.into();
        if key == "torch" {
            result["weaver_over_torch_step"] = (ours / r.step_s).into();
            result["weaver_over_torch_cpu"] = r.cpu_s.map(|c| ours_cpu / c).into();
            if !round_wall.is_empty() {
                result["weaver_over_torch_round_wall"] = round_wall.clone().into();
                result["weaver_over_torch_round_cpu"] = round_cpu.clone().into();
            }
        }
        result[format!("{key}_samples_per_s")] = (gb as f64 / r.step_s).into();
        result[format!("{key}_tokens_per_s")] = (tokens / r.step_s).into();
        result[format!("{key}_tflops")] = (flops / r.step_s / 1e12).into();
        result[format!("{key}_peak_mem_bytes")] = r.peak_bytes.into();
        result[format!("{key}_loss")] = r.loss.into();
        if let Some(p) = peak {
            result[format!("{key}_mfu")] = (flops / r.step_s / p).into();
        }
        if let Some(c) = &r.counts {
            result[format!("{key}_aten_ops_per_step")] = c["aten_ops"].clone();
            result[format!("{key}_kernel_launches_per_step")] = c["gpu_kernels"].clone();
            result[format!("{key}_cuda_sync_calls_per_step")] = c["sync_calls"].clone();
        }
        if key == "compile" {
            result["compile_backend"] = a.compile_backend.clone().into();
        }
    }
    for (key, _, why) in &missing {
        result[format!("{key}_error")] = why.clone().into();
    }
    println!("RESULT {result}");
    if !missing.is_empty() {
        bail!(
            "the PyTorch side measured {} of {} mode(s); see above",
            theirs.len(),
            theirs.len() + missing.len()
        );
    }
    Ok(())
}
