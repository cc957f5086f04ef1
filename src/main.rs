//! `weaver`: the one binary. See DESIGN.md, "The CLI contract".

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weaver_models::JobConfig;
use weaver_worker::eval::evaluate;
use weaver_worker::parallel::ParallelTrainer;
use weaver_worker::train::{build, configure_threads, load_params};

#[derive(Debug, Parser)]
#[command(
    name = "weaver",
    version,
    about = "Train multimodal transformers across many GPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train in this process (the whole model on one device).
    Train(TrainArgs),
    /// Evaluate saved weights on the held-out pool (recall@1 both ways, caption exact match).
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The job's TOML config.
    #[arg(long)]
    config: PathBuf,
    /// Override a config key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Debug, Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Where metrics.jsonl, config.toml and model.safetensors go
    /// (default: runs/<config name>-<unix time>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Weights to evaluate: a safetensors file of global parameters (a run's
    /// model.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load_config(a: &ConfigArgs) -> Result<JobConfig> {
    Ok(JobConfig::load(&a.config, &a.overrides)?)
}

fn default_run_dir(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("{stem}-{secs}"))
}

fn train(a: TrainArgs) -> Result<()> {
    let job = load_config(&a.config)?;
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| default_run_dir(&a.config.config));
    let p = &job.parallel;
    if p.dp * p.pp * p.tp > 1 {
        tracing::info!(
            dp = p.dp,
            pp = p.pp,
            tp = p.tp,
            "weaver train runs one process: the layout's {} micro-batches are accumulated here (weaver launch runs the layout)",
            p.dp * p.microbatches
        );
    }
    let mut trainer = ParallelTrainer::solo(job, run_dir.clone(), std::io::stderr().is_terminal())?;
    let summary = trainer.run()?;
    println!(
        "trained {} steps in {:.1}s, final loss {:.4}",
        summary.steps, summary.wall_s, summary.final_loss
    );
    if let Some(e) = summary.eval {
        println!(
            "eval on {} held-out pairs: i2t_r1 {:.3}  t2i_r1 {:.3}  caption_exact {:.3}",
            e.pool, e.i2t_r1, e.t2i_r1, e.caption_exact
        );
    }
    println!("run directory: {}", run_dir.display());
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let job = load_config(&a.config)?;
    configure_threads(job.train.threads, 1);
    let mut built = build(&job)?;
    load_params(&mut built.store, &a.checkpoint)
        .with_context(|| format!("loading {}", a.checkpoint.display()))?;
    let e = evaluate(
        &built.model,
        &built.data,
        job.eval.pool,
        job.micro_batch_size(),
        built.device,
        0,
    )?;
    println!("{}", serde_json::to_string(&e)?);
    Ok(())
}
