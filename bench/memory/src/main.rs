//! bench/memory: peak memory per rank, measured by `weaver launch` and modelled by
//! weaver-plan, for the `small` flavor on CPU (see run.sh).
//!
//! Each row is one config: a layout and the memory features of `[parallel]`. The job runs
//! for a few steps as `weaver launch` runs it (one process per rank over the tcp backend);
//! every rank reports the counted bytes of its live tensors at the step's high-water mark
//! (`peak_mem_bytes_ranks` in metrics.jsonl: parameters, gradient buckets, AdamW's moments,
//! activations, temporaries, the input batches its loader prepared ahead). The last step's
//! figure (the steady state: the moments exist from the first step on) is set beside
//! `MemoryModel::rank(pp).allocated()` for the rank's pipeline stage, the model's
//! prediction of the same figure.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weaver_config::config::Features;
use weaver_config::layout::ParallelLayout;
use weaver_config::JobConfig;
use weaver_plan::{DeviceKind, MemoryModel};

/// The job every row starts from: the small flavor, micro-batches of 4 samples, no
/// evaluation, one checkpoint at the end (the launcher's default).
const BASE: &str = "[model]\nflavor = \"small\"\n\
[train]\nglobal_batch = 16\nlr = 1e-3\nwarmup_steps = 1\neval_every = 0\n\
[parallel]\ninit_timeout_s = 120\ntimeout_s = 120\n";

/// The tolerance for the model.
const TOLERANCE: f64 = 0.15;

struct Row {
    name: &'static str,
    sets: &'static [&'static str],
}

const ROWS: &[Row] = &[
    Row {
        name: "1 rank",
        sets: &["parallel.microbatches=4"],
    },
    Row {
        name: "dp=2",
        sets: &["parallel.dp=2", "parallel.microbatches=2"],
    },
    Row {
        name: "tp=2",
        sets: &["parallel.tp=2", "parallel.microbatches=4"],
    },
    Row {
        name: "pp=2 1f1b",
        sets: &["parallel.pp=2", "parallel.microbatches=4"],
    },
    Row {
        name: "pp=2 1f1b, MLM + VQA rows",
        sets: &[
            "parallel.pp=2",
            "parallel.microbatches=4",
            "train.mlm_weight=0.5",
            "train.vqa_weight=0.5",
        ],
    },
    Row {
        name: "pp=2 gpipe",
        sets: &[
            "parallel.pp=2",
            "parallel.microbatches=4",
            "parallel.schedule=\"gpipe\"",
        ],
    },
    Row {
        name: "pp=2 interleaved v=2",
        sets: &[
            "parallel.pp=2",
            "parallel.microbatches=4",
            "parallel.schedule=\"interleaved\"",
            "parallel.virtual_stages=2",
        ],
    },
    Row {
        name: "dp=2 tp=2",
        sets: &["parallel.dp=2", "parallel.tp=2", "parallel.microbatches=2"],
    },
    Row {
        name: "pp=2 tp=2",
        sets: &["parallel.pp=2", "parallel.tp=2", "parallel.microbatches=4"],
    },
    Row {
        name: "1 rank, recompute selective",
        sets: &[
            "parallel.microbatches=4",
            "parallel.recompute=\"selective\"",
        ],
    },
    Row {
        name: "1 rank, recompute full",
        sets: &["parallel.microbatches=4", "parallel.recompute=\"full\""],
    },
    Row {
        name: "pp=2 1f1b, recompute full",
        sets: &[
            "parallel.pp=2",
            "parallel.microbatches=4",
            "parallel.recompute=\"full\"",
        ],
    },
    Row {
        name: "dp=2, sharded optimizer",
        sets: &[
            "parallel.dp=2",
            "parallel.microbatches=2",
            "parallel.shard_optimizer=true",
        ],
    },
    Row {
        name: "dp=4, sharded optimizer",
        sets: &[
            "parallel.dp=4",
            "parallel.microbatches=1",
            "parallel.shard_optimizer=true",
        ],
    },
    Row {
        name: "tp=2, sequence parallel",
        sets: &[
            "parallel.tp=2",
            "parallel.microbatches=4",
            "parallel.sequence_parallel=true",
        ],
    },
    Row {
        name: "pp=2 tp=2, sequence parallel",
        sets: &[
            "parallel.pp=2",
            "parallel.tp=2",
            "parallel.microbatches=4",
            "parallel.sequence_parallel=true",
        ],
    },
    Row {
        name: "dp=2 tp=2, sequence parallel, sharded, selective",
        sets: &[
            "parallel.dp=2",
            "parallel.tp=2",
            "parallel.microbatches=2",
            "parallel.sequence_parallel=true",
            "parallel.shard_optimizer=true",
            "parallel.recompute=\"selective\"",
        ],
    },
];

struct Args {
    weaver: PathBuf,
    steps: u64,
    only: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        weaver: PathBuf::from("target/release/weaver"),
        steps: 3,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--weaver" => a.weaver = PathBuf::from(value()?),
            "--steps" => a.steps = value()?.parse().context("--steps")?,
            "--only" => a.only = Some(value()?),
            other => bail!("unknown flag {other} (--weaver PATH, --steps N, --only NAME)"),
        }
    }
    if a.steps < 2 {
        bail!("--steps must be at least 2 (the last step is the steady state)");
    }
    Ok(a)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// What the model says for every world rank of `job`: (pp coordinate, breakdown).
fn modelled(job: &JobConfig) -> Result<Vec<(usize, weaver_plan::MemoryBreakdown)>> {
    let p = &job.parallel;
    let world = p.dp * p.pp * p.tp;
    let layout = ParallelLayout::new(job, world)?;
    let model = MemoryModel::new(job, &layout, DeviceKind::Cpu, 0)?;
    Ok((0..world)
        .map(|r| {
            let pp = layout.dims.coord(r).pp;
            (pp, model.rank(pp))
        })
        .collect())
}

/// Runs the row's job with `weaver launch`; every rank's peak of the last step.
fn measure(a: &Args, cfg: &Path, sets: &[String], world: usize) -> Result<Vec<u64>> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let mut cmd = Command::new(&a.weaver);
    cmd.arg("launch")
        .arg("--config")
        .arg(cfg)
        .arg("--nproc")
        .arg(world.to_string())
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--set")
        .arg(format!("train.steps={}", a.steps));
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", a.weaver.display()))?;
    if !out.status.success() {
        bail!(
            "weaver launch failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let last = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|l| l.get("loss").is_some())
        .context("no training line in metrics.jsonl")?;
    let ranks = last
        .get("peak_mem_bytes_ranks")
        .and_then(Value::as_array)
        .with_context(|| format!("no peak_mem_bytes_ranks in {last}"))?;
    Ok(ranks.iter().filter_map(Value::as_u64).collect())
}

fn main() -> Result<()> {
    let a = args()?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("small.toml");
    std::fs::write(&cfg, BASE)?;
    println!(
        "peak memory per rank, small flavor on CPU (f32), global batch 16, last of {} steps: \
         measured (counted live tensor bytes, `weaver launch`) vs weaver-plan's model",
        a.steps
    );
    println!(
        "{:<48} {:>4} {:>9} {:>12} {:>12} {:>7}   model: params+grads+optimizer / activations+in flight / working / data (MiB)",
        "config", "rank", "(dp,pp,tp)", "measured MiB", "model MiB", "model/measured"
    );
    let mut results = Vec::new();
    for row in ROWS {
        if a.only.as_deref().is_some_and(|o| !row.name.contains(o)) {
            continue;
        }
        let sets: Vec<String> = row.sets.iter().map(|s| s.to_string()).collect();
        let job = JobConfig::parse_with(BASE, &sets, Features::ALL)?;
        if let Some((key, value)) = Features::TRAINER.missing(&job.parallel) {
            println!(
                "{:<48} not available: the trainer does not run {key} = {value} yet",
                row.name
            );
            results.push(
                json!({"bench": "memory", "config": row.name, "available": false,
                "missing": format!("{key} = {value}")}),
            );
            continue;
        }
        let p = &job.parallel;
        let world = p.dp * p.pp * p.tp;
        let model = modelled(&job)?;
        let measured = match measure(&a, &cfg, &sets, world) {
            Ok(m) if m.len() == world => m,
            Ok(m) => bail!("{}: {} ranks reported, {world} expected", row.name, m.len()),
            Err(e) => {
                println!("{:<48} failed: {e:#}", row.name);
                results.push(
                    json!({"bench": "memory", "config": row.name, "available": true,
                    "error": format!("{e:#}")}),
                );
                continue;
            }
        };
        let layout = ParallelLayout::new(&job, world)?;
        let mut worst = 0f64;
        let mut ranks = Vec::new();
        for (r, (&m, (pp, b))) in measured.iter().zip(&model).enumerate() {
            let c = layout.dims.coord(r);
            let predicted = b.allocated();
            let ratio = predicted as f64 / m.max(1) as f64;
            worst = worst.max((ratio - 1.0).abs());
            println!(
                "{:<48} {:>4} {:>9} {:>12.1} {:>12.1} {:>7.3}   {:.1} / {:.1} / {:.1} / {:.1}",
                if r == 0 { row.name } else { "" },
                r,
                format!("({},{},{})", c.dp, c.pp, c.tp),
                mib(m),
                mib(predicted),
                ratio,
                mib(b.params + b.grads + b.optimizer),
                mib(b.activations + b.in_flight),
                mib(b.working),
                mib(b.data),
            );
            ranks.push(json!({"rank": r, "pp": pp, "measured_bytes": m,
                "model_bytes": predicted, "ratio": ratio,
                "model": {"params": b.params, "grads": b.grads, "optimizer": b.optimizer,
                    "activations": b.activations, "in_flight": b.in_flight,
                    "working": b.working, "data": b.data}}));
        }
        results.push(
            json!({"bench": "memory", "config": row.name, "available": true,
            "sets": sets, "world": world, "steps": a.steps, "max_error": worst,
            "within_tolerance": worst <= TOLERANCE, "ranks": ranks}),
        );
    }
    for r in &results {
        println!("RESULT {r}");
    }
    Ok(())
}
