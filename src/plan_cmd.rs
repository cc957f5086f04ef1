//! `weaver plan`: the layouts of a job that fit on the given machines, best first, with
//! their memory per device and step time broken down (the `weaver-plan` crate's model).

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use weaver_config::config::Features;
use weaver_config::JobConfig;
use weaver_plan::hardware::{fmt_bytes, parse_bytes};
use weaver_plan::{Hardware, Plan};

/// `weaver plan` flags.
#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// The job's TOML config (its `[parallel]` layout keys are what is being chosen).
    #[arg(long)]
    config: PathBuf,
    /// Override a config key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// GPUs in all.
    #[arg(long)]
    gpus: usize,
    /// GPUs per node (tensor parallelism stays inside a node).
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Memory of one GPU (`141GiB`, `80GB`, bytes); default an H200's 140 GiB usable.
    #[arg(long)]
    gpu_memory: Option<String>,
    /// Achieved bandwidth between GPUs of a node, Gbit/s per GPU (default NVLink, 3000).
    #[arg(long)]
    intra_node_gbps: Option<f64>,
    /// Achieved bandwidth between nodes, Gbit/s per GPU (default 360).
    #[arg(long)]
    inter_node_gbps: Option<f64>,
    /// Dense TFLOP/s of one GPU in the compute dtype (default an H200's 989).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Fraction of the peak reached between communications (default 0.45).
    #[arg(long)]
    mfu: Option<f64>,
    /// Plans to print.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Only layouts the trainer runs today (no memory feature it lacks yet).
    #[arg(long)]
    runnable: bool,
}

/// Runs `weaver plan`.
pub(crate) fn plan(a: PlanArgs) -> Result<i32> {
    let job = JobConfig::load_with(&a.config, &a.overrides, Features::ALL)?;
    let mut hw = Hardware::h200(a.gpus, a.gpus_per_node);
    if let Some(m) = &a.gpu_memory {
        hw.memory_bytes = parse_bytes(m)?;
    }
    if let Some(x) = a.intra_node_gbps {
        hw.intra_node_gbps = x;
    }
    if let Some(x) = a.inter_node_gbps {
        hw.inter_node_gbps = x;
    }
    if let Some(x) = a.peak_tflops {
        hw.peak_tflops = x;
    }
    if let Some(x) = a.mfu {
        hw.mfu = x;
    }
    let features = if a.runnable {
        Features::TRAINER
    } else {
        Features::ALL
    };
    let plans = weaver_plan::plan(&job, &hw, features)?;
    print!("{}", report(&job, &hw, &plans, a.top));
    Ok(0)
}

/// The printed plan: assumptions, a table of the best `top`, each one's breakdown, and why
/// the best wins.
pub(crate) fn report(job: &JobConfig, hw: &Hardware, plans: &[Plan], top: usize) -> String {
    let mut out = String::new();
    let m = &job.model;
    let _ = writeln!(
        out,
        "model {} ({:.2}B parameters, {} layers), global batch {}, dtype {}",
        m.flavor,
        m.num_params() as f64 / 1e9,
        m.num_layers(),
        job.train.global_batch,
        job.train.dtype
    );
    let _ = writeln!(
        out,
        "hardware: {} GPUs, {} per node, {} each ({} usable: {} outside the allocator, {:.0}% headroom), {} TFLOP/s at {:.0}% MFU, {} / {} Gbit/s intra / inter node, {} GB/s memory",
        hw.devices,
        hw.per_node,
        fmt_bytes(hw.memory_bytes),
        fmt_bytes(hw.usable_bytes()),
        fmt_bytes(hw.reserve_bytes),
        100.0 * hw.headroom,
        hw.peak_tflops,
        100.0 * hw.mfu,
        hw.intra_node_gbps,
        hw.inter_node_gbps,
        hw.memory_gbps
    );
    let _ = writeln!(
        out,
        "{} layouts fit; the best {}:",
        plans.len(),
        top.min(plans.len())
    );
    let _ = writeln!(
        out,
        "{:>3}  {:<62} {:>11} {:>9} {:>10}",
        "#", "layout", "memory/GPU", "step s", "samples/s"
    );
    for (i, p) in plans.iter().take(top).enumerate() {
        let t = p.time.total();
        let _ = writeln!(
            out,
            "{:>3}  {:<62} {:>11} {:>9.4} {:>10.1}{}",
            i + 1,
            p.describe(),
            fmt_bytes(p.memory.total()),
            t,
            job.train.global_batch as f64 / t,
            if p.runnable {
                ""
            } else {
                "  (needs issue 12 features)"
            }
        );
    }
    for (i, p) in plans.iter().take(top).enumerate() {
        let mem = p.memory;
        let _ = writeln!(out, "\n#{} {}", i + 1, p.describe());
        let _ = writeln!(
            out,
            "  memory (pipeline rank {}): parameters {}, gradients {}, optimizer {}, activations {} (one micro-batch), in flight {}, working {}, data {}, reserve {}, distillation teacher {}; total {}",
            p.worst_rank,
            fmt_bytes(mem.params),
            fmt_bytes(mem.grads),
            fmt_bytes(mem.optimizer),
            fmt_bytes(mem.activations),
            fmt_bytes(mem.in_flight),
            fmt_bytes(mem.working),
            fmt_bytes(mem.data),
            fmt_bytes(mem.reserve),
            fmt_bytes(mem.teacher),
            fmt_bytes(mem.total())
        );
        let parts: Vec<String> = p
            .time
            .parts()
            .iter()
            .map(|(name, s)| format!("{name} {s:.4}"))
            .collect();
        let _ = writeln!(out, "  step {:.4} s: {}", p.time.total(), parts.join(", "));
    }
    let _ = writeln!(out, "\n{}", weaver_plan::why(plans, hw));
    out
}
