//! `weaver`: the one binary. See DESIGN.md, "The CLI contract".

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

mod plan_cmd;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weaver_checkpoint::{block_on, Checkpoint, CkptStore};
use weaver_config::config::LayoutMode;
use weaver_coordinator::{
    ClientTls, CoordinatorOptions, JobOutcome, JobToken, ResumePoint, SessionOptions, TlsIdentity,
    WorkerInfo,
};
use weaver_launch::{LaunchOptions, WorkerEnv};
use weaver_models::{JobConfig, Model};
use weaver_worker::agent::{run_agent, AgentExit, AgentOptions, Committer};
use weaver_worker::ckpt::{export_final, is_param, open_resume, LocalCommitter};
use weaver_worker::eval::evaluate_weights;
use weaver_worker::parallel::{checkpoint_layout, ParallelTrainer, Plan};
use weaver_worker::probe::{probe, ProbeConfig, SceneLabel, SyntheticLabels};
use weaver_worker::train::{build, configure_threads};

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
    /// Train in this process (the whole model; a config's layout is collapsed into
    /// micro-batches, the same function `weaver launch` trains).
    Train(TrainArgs),
    /// Run a job here: the coordinator plus N local worker processes with the config's
    /// [parallel] layout (torchrun's standalone mode).
    Launch(LaunchArgs),
    /// Serve one job's coordinator (cluster mode; workers join with `weaver worker`).
    Coordinator(CoordinatorArgs),
    /// Join a job as a worker.
    Worker(WorkerArgs),
    /// Evaluate weights on the held-out pool (recall@1 both ways, caption exact match).
    Eval(EvalArgs),
    /// Embeddings or captions of every sample of a set of shards, written to object
    /// storage per input shard; resumable (finished shards are never redone).
    Infer(InferArgs),
    /// Inspect, verify, export checkpoints; ask a running job for one.
    #[command(subcommand)]
    Ckpt(CkptCommand),
    /// Print a running job's state and its workers.
    Status(ClientArgs),
    /// Convert weights from another framework into a weaver checkpoint.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Make and look at WebDataset shards.
    #[command(subcommand)]
    Data(DataCommand),
    /// The layouts of a job that fit on N GPUs, best first, with their memory per GPU and
    /// step time broken down (the memory and step-time model of `parallel.layout = "auto"`).
    Plan(plan_cmd::PlanArgs),
    /// Draw a run's metrics (losses, learning rate, gradient norm, throughput, MFU,
    /// held-out recall; restarts marked) into a PNG.
    Plot(PlotArgs),
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// The run directory (its metrics.jsonl).
    run_dir: PathBuf,
    /// The picture to write (default: RUN_DIR/metrics.png).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ImportCommand {
    /// An open_clip state dict (CoCa or CLIP) as a weaver checkpoint of step 0; start runs
    /// from it with `[model] init_from = OUT`.
    OpenClip {
        /// open_clip architecture: coca_ViT-B-32, coca_ViT-L-14 or ViT-B-32.
        #[arg(long)]
        arch: String,
        /// The state dict: .safetensors, or a torch.save file (.bin, .pt, .pth).
        #[arg(long)]
        weights: PathBuf,
        /// Checkpoint root to write (local path, file://, s3://, gs://, az://).
        #[arg(long)]
        out: String,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Pack images and captions into WebDataset tar shards (and stats.json, sizes.json).
    Pack {
        /// Folder the caption file's image names are relative to.
        #[arg(long)]
        images: PathBuf,
        /// Captions: .jsonl (fields image|file|filename|path and caption|text) or .csv/.tsv
        /// (a header row naming those columns).
        #[arg(long)]
        captions: PathBuf,
        /// Where the shards go: a folder, file://, s3://, gs:// or az:// URL.
        #[arg(long)]
        out: String,
        /// Samples per shard.
        #[arg(long, default_value_t = 10_000)]
        shard_size: usize,
        /// Shrink images whose shorter side exceeds S pixels (re-encoded as JPEG, quality 90);
        /// default: store the files as they are.
        #[arg(long, value_name = "S")]
        image_size: Option<u32>,
        /// Shard names: PREFIX-00000.tar, ...
        #[arg(long, default_value = "shard")]
        prefix: String,
    },
    /// Count a shard set's shards and samples (stats.json when present) and show a few.
    Inspect {
        /// A shard, a brace pattern, a list file or a folder (local or a store URL).
        url: String,
        /// Samples to show.
        #[arg(long, default_value_t = 3)]
        show: usize,
        /// Read every shard and decode every image, counting bad samples.
        #[arg(long)]
        full: bool,
        /// Image member extensions, as data.image_key.
        #[arg(long, default_value = "jpg;jpeg;png;webp")]
        image_key: String,
        /// Caption member extensions, as data.caption_key.
        #[arg(long, default_value = "txt;json")]
        caption_key: String,
    },
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
    /// Continue from a checkpoint: `latest` (under [checkpoint] url) or a checkpoint URL.
    #[arg(long)]
    resume: Option<String>,
}

#[derive(Debug, Args)]
struct LaunchArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Worker processes (must equal dp × pp × tp).
    #[arg(long)]
    nproc: usize,
    /// Where metrics.jsonl, config.toml and model.safetensors go.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from a checkpoint: `latest` or a checkpoint URL.
    #[arg(long)]
    resume: Option<String>,
    /// Serve the job's metrics for Prometheus at http://ADDR/metrics (port 0: any free
    /// port, logged).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    recovery: RecoveryArgs,
}

#[derive(Debug, Args)]
struct CoordinatorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:29400")]
    listen: SocketAddr,
    /// The job token file (created, mode 0600, when missing). Default: generate one and
    /// write it to <run dir>/job.token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where metrics.jsonl goes.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue from a checkpoint: `latest` or a checkpoint URL.
    #[arg(long)]
    resume: Option<String>,
    /// Serve TLS with this certificate chain (PEM) ...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve the job's metrics for Prometheus at http://ADDR/metrics (e.g. 0.0.0.0:9400).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// On SIGTERM (preemption), seconds to wait for the workers' checkpoint to be committed
    /// before stopping; keep it under the scheduler's kill delay (SLURM's KillWait).
    #[arg(long, default_value_t = 25)]
    preempt_grace_s: u64,
    #[command(flatten)]
    recovery: RecoveryArgs,
    #[command(flatten)]
    elastic: ElasticArgs,
}

/// What the coordinator does when a worker is lost.
#[derive(Debug, Args)]
struct RecoveryArgs {
    /// New generations (after a lost worker) allowed before the job fails.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Seconds a silent worker is given before it counts as lost.
    #[arg(long, default_value_t = 10)]
    heartbeat_timeout_s: u64,
}

/// What a cluster coordinator does when lost workers do not come back (`weaver launch`
/// restarts its own workers instead).
#[derive(Debug, Args)]
struct ElasticArgs {
    /// Seconds a new generation waits for every worker to register again after a loss.
    #[arg(long, default_value_t = 300)]
    regather_timeout_s: u64,
    /// Elastic: if fewer workers come back within --regather-timeout-s, continue from the
    /// latest checkpoint with dp shrunk (to no less than this) instead of failing. The
    /// global batch stays; spare workers stand by.
    #[arg(long)]
    elastic_min_dp: Option<usize>,
}

#[derive(Debug, Args)]
struct ClientArgs {
    /// The coordinator (`host:port`, `http://…`, `https://…`); default $WEAVER_COORDINATOR.
    #[arg(long)]
    coordinator: Option<String>,
    /// The job token file (else $WEAVER_TOKEN_FILE or $WEAVER_JOB_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust a TLS coordinator.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// `cpu`, `cuda:K`, or `auto`: cuda:(local rank mod GPUs) on a machine with GPUs, else
    /// cpu; a tcp job whose `train.device` is `cpu` stays on the CPU.
    #[arg(long, default_value = "auto")]
    device: String,
    /// This worker's directory (metrics go to the coordinator; the final weights are
    /// exported from the last checkpoint by whoever ends the job).
    #[arg(long, default_value = "runs/worker")]
    run_dir: PathBuf,
    /// The address other workers reach this one at (tcp backend). Default: 127.0.0.1 when
    /// the coordinator is on loopback, else this host's name.
    #[arg(long)]
    listen_host: Option<String>,
}

#[derive(Debug, Args)]
struct EvalArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Weights to evaluate: a safetensors file of global parameters (a run's
    /// model.safetensors, `weaver ckpt export`), or a checkpoint URL.
    #[arg(long)]
    checkpoint: String,
    /// Instead of retrieval and captioning: a linear probe of the frozen image features
    /// predicting this label of the synthetic scenes (`shape` or `color` of the first
    /// object).
    #[arg(long, value_name = "LABEL")]
    probe: Option<String>,
    /// Training samples of the probe.
    #[arg(long, default_value_t = 2000)]
    probe_train: usize,
    /// Held-out samples of the probe.
    #[arg(long, default_value_t = 1000)]
    probe_test: usize,
}

#[derive(Debug, Args)]
struct InferArgs {
    /// The weights: a checkpoint URL (a step, or a root for its latest), float or INT8.
    #[arg(long)]
    checkpoint: String,
    /// The input: `synthetic` (infer.synthetic_shards × infer.shard_size held-out samples)
    /// or WebDataset shards (a brace pattern, a list file, a folder; local or a store URL).
    #[arg(long)]
    data: String,
    /// `embed` (image and text embeddings, safetensors) or `caption` (JSONL).
    #[arg(long, default_value = "embed")]
    task: String,
    /// Where the outputs and progress markers go (a folder, file://, s3://, ...).
    #[arg(long)]
    out: String,
    /// Captions: beams per image (1: greedy).
    #[arg(long)]
    beam: Option<usize>,
    /// Captions: most new tokens after BOS (default: as many as the model's text length allows).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Captions: stop token: `eos`, `none` or a token id.
    #[arg(long)]
    stop: Option<String>,
    /// Samples per forward.
    #[arg(long)]
    batch: Option<usize>,
    /// Worker processes: 1 runs here; more runs the job under a local coordinator (as
    /// `weaver launch`), the input shards split across data-parallel workers.
    #[arg(long, default_value_t = 1)]
    nproc: usize,
    /// A job config for everything else (tokenizer, data keys, device, [parallel] layout,
    /// [infer] keys); default: the checkpoint's own config with dp = --nproc.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config key: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Where the job's metrics.jsonl and token go (with --nproc > 1).
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CkptCommand {
    /// List the checkpoints under URL (committed, incomplete, broken; which is latest).
    Ls {
        /// Checkpoint root (`/path`, `file://…`, `s3://bucket/prefix`, …).
        url: String,
    },
    /// Layout, tensors and sizes of a checkpoint (URL/step-N, or the root for the latest).
    Inspect {
        /// Checkpoint URL.
        url: String,
    },
    /// Read every byte of a checkpoint and check its checksums.
    Verify {
        /// Checkpoint URL.
        url: String,
    },
    /// Write a checkpoint's parameters as one safetensors file (global tensors).
    Export {
        /// Checkpoint URL.
        url: String,
        /// Output file.
        out: PathBuf,
        /// Export the optimizer moments and training state too.
        #[arg(long)]
        all: bool,
        /// `weaver` (global weaver names) or `open_clip` (an open_clip state dict of the
        /// checkpoint's model, for `load_state_dict(strict=True)`).
        #[arg(long, default_value = "weaver")]
        format: String,
    },
    /// Ask a running job to checkpoint at its next possible step.
    Save(ClientArgs),
    /// Write an int8 copy of a checkpoint: every linear layer's weight as per-output-channel
    /// symmetric int8 with f32 scales (`weaver eval` and the loader run it).
    Quantize {
        /// The float checkpoint (URL/step-N, or the root for the latest).
        url: String,
        /// Checkpoint root of the quantized copy (same step).
        #[arg(long)]
        out: String,
        /// `int8-weight` (float activations) or `int8-dynamic` (activations quantized per
        /// token at run time, int8 x int8 products with int32 accumulation).
        #[arg(long)]
        scheme: String,
        /// Held-out samples of the calibration pass (int8-dynamic; default 256, 0: none):
        /// from `data.eval_shards` after the evaluation pool when the job names held-out
        /// shards, else from the synthetic held-out split.
        #[arg(long)]
        calibrate: Option<usize>,
        /// SmoothQuant migration strength in [0, 1] (int8-dynamic; default 0.5, 0: none).
        #[arg(long)]
        smooth_alpha: Option<f64>,
        /// The job config for the data of the calibration pass and the tokenizer (the model
        /// always comes from the checkpoint); default: the checkpoint's own config.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key: `--set section.key=value` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Write a pruned copy of a checkpoint: `magnitude` zeroes the smallest entries of every
    /// block linear weight; `mlp` removes the lowest-scoring MLP hidden channels (a smaller
    /// model: `model.mlp_ratio · (1 − sparsity)`); `heads` removes the lowest-scoring whole
    /// attention heads (a smaller model: `heads · (1 − sparsity)` heads of the same
    /// `head_dim` per tower).
    Prune {
        /// The float checkpoint (URL/step-N, or the root for the latest).
        url: String,
        /// Checkpoint root of the pruned copy (same step).
        #[arg(long)]
        out: String,
        /// Fraction to remove, in (0, 1).
        #[arg(long)]
        sparsity: f64,
        /// `magnitude`, `mlp` or `heads`.
        #[arg(long, default_value = "magnitude")]
        method: String,
        /// The job config for the tokenizer when the checkpoint carries none (the model
        /// always comes from the checkpoint when it does).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a config key: `--set section.key=value` (repeatable).
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    // A file-size limit (ulimit -f) is one way a store runs out of space: let the write
    // fail with EFBIG and the checkpoint report it, rather than SIGXFSZ killing the process.
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Train(a) => train(a),
        Command::Launch(a) => launch(a),
        Command::Coordinator(a) => coordinator(a),
        Command::Worker(a) => worker(a),
        Command::Eval(a) => eval(a),
        Command::Infer(a) => infer(a),
        Command::Ckpt(c) => ckpt(c),
        Command::Status(a) => status(a),
        Command::Import(c) => import(c),
        Command::Data(c) => data(c),
        Command::Plan(a) => plan_cmd::plan(a),
        Command::Plot(a) => plot(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Exit status of a run stopped by SIGTERM after checkpointing (128 + 15).
const PREEMPTED: i32 = 143;

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

/// A flag set by SIGTERM (preemption).
fn sigterm_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, flag.clone())
        .context("cannot install the SIGTERM handler")?;
    Ok(flag)
}

/// With no `[checkpoint] url`, checkpoints go to `<run dir>/checkpoints` (an absolute path:
/// workers and committers may run elsewhere in the file system). The final weights are
/// exported from the last checkpoint, so every run checkpoints.
fn default_checkpoint_url(job: &mut JobConfig, run_dir: &Path) -> Result<()> {
    if job.checkpoint.url.is_empty() {
        let dir = std::path::absolute(run_dir.join("checkpoints"))
            .with_context(|| format!("resolving {}", run_dir.display()))?;
        job.checkpoint.url = dir.display().to_string();
        job.file.checkpoint.url = job.checkpoint.url.clone();
    }
    Ok(())
}

/// How long the process that ends a job waits for the final checkpoint's commit before
/// exporting it.
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(120);

fn train(a: TrainArgs) -> Result<i32> {
    let mut job = load_config(&a.config)?;
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| default_run_dir(&a.config.config));
    default_checkpoint_url(&mut job, &run_dir)?;
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
    let url = job.checkpoint.url.clone();
    let keep = job.checkpoint.keep;
    refuse_taken_url(&url, a.resume.as_deref())?;
    let steps = job.train.steps;
    let sigterm = sigterm_flag()?;
    let mut trainer = ParallelTrainer::solo(job, run_dir.clone(), std::io::stderr().is_terminal())?;
    let plan = Plan::new(trainer.job(), 1)?;
    let layout = checkpoint_layout(trainer.job(), &plan);
    // This process commits its checkpoints, and exports the last one as the final weights.
    trainer.enable_checkpoints(Arc::new(
        LocalCommitter::new(CkptStore::open(&url)?, 1, keep, layout)
            .with_final_export(steps, run_dir.join("model.safetensors")),
    ))?;
    if let Some(spec) = &a.resume {
        let ckpt = open_resume(spec, &url)?;
        let step = trainer.resume(ckpt)?;
        println!("resumed from step {step}");
    }
    {
        let (control, flag) = (trainer.control(), sigterm.clone());
        std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!("SIGTERM: checkpointing and stopping at the end of this step");
            control.request_stop();
        });
    }
    let summary = trainer.run()?;
    if summary.preempted {
        println!(
            "stopped at step {} after a checkpoint in {url}; continue with --resume latest",
            summary.steps
        );
        return Ok(PREEMPTED);
    }
    println!(
        "trained {} steps in {:.1}s, final loss {:.4}",
        summary.steps, summary.wall_s, summary.final_loss
    );
    if let Some(e) = summary.eval {
        println!(
            "eval on {} held-out pairs: i2t r@1/5/10 {:.3}/{:.3}/{:.3}  t2i r@1/5/10 {:.3}/{:.3}/{:.3}  caption_exact {:.3}",
            e.pool, e.i2t_r1, e.i2t_r5, e.i2t_r10, e.t2i_r1, e.t2i_r5, e.t2i_r10, e.caption_exact
        );
        if let (Some(acc), Some(majority)) = (e.vqa_acc, e.vqa_majority) {
            println!("vqa on the same samples: accuracy {acc:.3}  majority answer {majority:.3}");
        }
    }
    println!("run directory: {}", run_dir.display());
    Ok(0)
}

/// A new run (no `--resume`) refuses a checkpoint URL that already holds committed
/// checkpoints, before the model is built: otherwise it would train until its first
/// commit and fail there. (`weaver launch` and `weaver coordinator` refuse in
/// `Coordinator::new`, through the committer.) A malformed URL is refused here too.
fn refuse_taken_url(url: &str, resume: Option<&str>) -> Result<()> {
    if url.is_empty() {
        return Ok(());
    }
    let store = CkptStore::open(url)?;
    if resume.is_none() {
        block_on(weaver_checkpoint::ensure_unused(&store))?;
    }
    Ok(())
}

fn plot(a: PlotArgs) -> Result<i32> {
    let out = a.out.unwrap_or_else(|| a.run_dir.join("metrics.png"));
    let r = weaver_plot::plot(&a.run_dir, &out)?;
    if r.unreadable_lines > 0 {
        tracing::warn!(
            lines = r.unreadable_lines,
            "passed over metrics lines that are not JSON (a line cut short by a crash?)"
        );
    }
    println!(
        "{} ({} steps, {} evaluations, {} restarts marked)",
        r.path.display(),
        r.steps,
        r.evals,
        r.marks.len()
    );
    Ok(0)
}

/// The coordinator's options for `job`: the model's real limits, stages cut as the workers
/// cut them, the checkpoint committer, the resume point.
fn coordinator_options(
    job: JobConfig,
    token: JobToken,
    run_dir: &Path,
    resume: Option<&str>,
    recovery: &RecoveryArgs,
) -> Result<CoordinatorOptions> {
    let mut o = CoordinatorOptions::new(job.clone(), token);
    o.limits = Model::limits(&job.model);
    o.stage_planner = Arc::new(|job: &JobConfig, pp: usize| {
        let world = job.parallel.dp * pp * job.parallel.tp;
        let plan = Plan::new(job, world).map_err(|e| e.to_string())?;
        // One range per pipeline rank: its first chunk (interleaved ranks hold more).
        Ok((0..pp).map(|r| plan.stages[r].clone()).collect())
    });
    if !job.checkpoint.url.is_empty() {
        o.committer = Some(Arc::new(Committer::new(&job)?));
    }
    o.run_dir = Some(run_dir.to_path_buf());
    o.policy.max_restarts = recovery.max_restarts;
    o.policy.heartbeat_timeout = Duration::from_secs(recovery.heartbeat_timeout_s.max(2));

    if let Some(spec) = resume {
        let ckpt = open_resume(spec, &job.checkpoint.url)?;
        o.resume_from = Some(ResumePoint {
            url: ckpt.url(),
            step: ckpt.step(),
        });
    }
    Ok(o)
}

fn outcome_code(o: &JobOutcome) -> i32 {
    if o.is_success() {
        0
    } else {
        eprintln!("job failed: {o:?}");
        1
    }
}

fn launch(a: LaunchArgs) -> Result<i32> {
    let mut job = load_config(&a.config)?;
    if job.parallel.layout == LayoutMode::Auto {
        // The coordinator chooses the layout for the --nproc workers once they registered.
        if job.parallel.workers != 0 && job.parallel.workers != a.nproc {
            bail!(
                "--nproc {} but parallel.workers = {} for layout = \"auto\"; make them equal (or leave workers at 0)",
                a.nproc,
                job.parallel.workers
            );
        }
        let mut file = job.file.clone();
        file.parallel.workers = a.nproc;
        job = JobConfig::from_file_config(file)?;
    }
    let p = &job.parallel;
    if p.layout == LayoutMode::Manual && a.nproc != p.dp * p.pp * p.tp {
        bail!(
            "--nproc {} does not match [parallel] dp × pp × tp = {} × {} × {} = {}; change one of them",
            a.nproc,
            p.dp,
            p.pp,
            p.tp,
            p.dp * p.pp * p.tp
        );
    }
    if p.layout == LayoutMode::Manual {
        Plan::new(&job, a.nproc)?;
    }
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| default_run_dir(&a.config.config));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let inference = job.file.infer.enabled();
    if !inference {
        default_checkpoint_url(&mut job, &run_dir)?;
    }
    let (url, steps) = (job.checkpoint.url.clone(), job.train.steps);
    let token = JobToken::generate()?;
    // For `weaver status` and `weaver ckpt save` while the job runs.
    let token_file = run_dir.join("job.token");
    token.write_file(&token_file)?;
    let mut copts = coordinator_options(job, token, &run_dir, a.resume.as_deref(), &a.recovery)?;
    copts.metrics_listen = a.metrics_listen;
    let exe = std::env::current_exe().context("cannot find the weaver binary")?;
    let command: Vec<OsString> = vec![
        exe.into(),
        "worker".into(),
        "--run-dir".into(),
        run_dir.clone().into(),
    ];
    let opts = LaunchOptions::new(copts, a.nproc, command);
    let report = weaver_launch::launch(opts)?;
    let code = outcome_code(&report.outcome);
    if code == 0 && inference {
        println!("job completed: {:?}", report.outcome);
        println!("run directory: {}", run_dir.display());
    } else if code == 0 {
        // The coordinator committed the last checkpoint: it is the final weights.
        let out = run_dir.join("model.safetensors");
        export_final(&url, steps, &out, FINAL_COMMIT_WAIT)?;
        println!("job completed: {:?}", report.outcome);
        println!("run directory: {}", run_dir.display());
    }
    Ok(code)
}

fn coordinator(a: CoordinatorArgs) -> Result<i32> {
    let job = load_config(&a.config)?;
    if let Some(min) = a.elastic.elastic_min_dp {
        // With layout = "auto" dp is chosen later, at most the workers gathered (a minimum
        // above the chosen dp never shrinks).
        let (most, what) = if job.parallel.layout == LayoutMode::Auto {
            (job.parallel.world(), "the workers of layout = \"auto\"")
        } else {
            (job.parallel.dp, "[parallel] dp")
        };
        if min == 0 || min > most {
            bail!("--elastic-min-dp {min} must be between 1 and {what} = {most}");
        }
    }
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| default_run_dir(&a.config.config));
    std::fs::create_dir_all(&run_dir)?;
    let mut job = job;
    let inference = job.file.infer.enabled();
    if !inference {
        default_checkpoint_url(&mut job, &run_dir)?;
    }
    let (url, steps) = (job.checkpoint.url.clone(), job.train.steps);
    let token_file = a.token_file.unwrap_or_else(|| run_dir.join("job.token"));
    let (token, created) = JobToken::load_or_create(&token_file)?;
    if created {
        println!(
            "job token written to {} (give it to the workers: --token-file)",
            token_file.display()
        );
    }
    let mut copts = coordinator_options(job, token, &run_dir, a.resume.as_deref(), &a.recovery)?;
    copts.policy.regather_timeout = Duration::from_secs(a.elastic.regather_timeout_s.max(1));
    copts.policy.elastic_min_dp = a.elastic.elastic_min_dp;
    copts.metrics_listen = a.metrics_listen;
    copts.preempt_grace = Duration::from_secs(a.preempt_grace_s);
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        copts.tls = Some(TlsIdentity::from_files(cert, key)?);
    }
    let outcome = weaver_launch::serve_coordinator(copts, a.listen, |addr| {
        println!("coordinator listening on {addr}");
    })?;
    let code = outcome_code(&outcome);
    if code == 0 && !inference {
        export_final(
            &url,
            steps,
            &run_dir.join("model.safetensors"),
            FINAL_COMMIT_WAIT,
        )?;
    }
    Ok(code)
}

fn client_parts(a: &ClientArgs) -> Result<(String, JobToken, Option<ClientTls>)> {
    let url = a
        .coordinator
        .clone()
        .or_else(|| std::env::var(weaver_launch::env::COORDINATOR_ENV).ok())
        .filter(|s| !s.is_empty())
        .context("no coordinator: pass --coordinator URL or set WEAVER_COORDINATOR")?;
    let token = weaver_launch::resolve_token(a.token_file.as_deref())?;
    let tls = match &a.tls_ca {
        Some(ca) => Some(ClientTls::from_file(ca)?),
        None => None,
    };
    Ok((url, token, tls))
}

fn worker(a: WorkerArgs) -> Result<i32> {
    let env = WorkerEnv::from_env()?;
    let (url, token, tls) = client_parts(&a.client)?;
    // Before any training: a run directory that cannot be made fails now, not at the end.
    std::fs::create_dir_all(&a.run_dir)
        .with_context(|| format!("creating the run directory {}", a.run_dir.display()))?;
    if let Some(t) = env.threads {
        configure_threads(t, 1);
    }
    let mut info = WorkerInfo::cpu(&env.host, env.local_rank);
    let device = match a.device.as_str() {
        "auto" => {
            let gpus = tch::Cuda::device_count();
            if gpus > 0 {
                format!("cuda:{}", i64::from(env.local_rank) % gpus)
            } else {
                "cpu".into()
            }
        }
        d => d.to_string(),
    };
    weaver_models::device::parse_device(&device)?;
    info.device_memory = WorkerInfo::cpu_share(env.local_world_size);
    if device != "cpu" {
        info.device_kind = "cuda".into();
        // For `parallel.layout = "auto"`: the GPU's total memory (0, unknown, if the CUDA
        // allocator cannot say; the coordinator then assumes the planner's default GPU).
        info.device_memory = match weaver_models::device::parse_device(&device)? {
            tch::Device::Cuda(k) => weaver_prof::cuda_memory::info(k)
                .map(|(_, total)| total)
                .unwrap_or(0),
            _ => 0,
        };
        info.device = device;
    }
    let loopback = [
        "127.",
        "localhost",
        "http://127.",
        "http://localhost",
        "[::1]",
    ]
    .iter()
    .any(|p| url.starts_with(p));
    let listen_host = a.listen_host.clone().unwrap_or_else(|| {
        if loopback {
            "127.0.0.1".into()
        } else {
            env.host.clone()
        }
    });
    let mut session = SessionOptions::new(&url, token);
    session.tls = tls;
    let opts = AgentOptions {
        session,
        info,
        device_auto: a.device == "auto",
        listen_host,
        run_dir: a.run_dir.clone(),
        local_procs: Some(env.local_world_size as usize),
        assignment_timeout: Duration::from_secs(900),
    };
    let sigterm = sigterm_flag()?;
    match run_agent(opts, sigterm)? {
        AgentExit::Completed => Ok(0),
        AgentExit::Stopped(why) => {
            tracing::info!(reason = %why, "worker stopped");
            Ok(if why == "SIGTERM" { PREEMPTED } else { 0 })
        }
    }
}

fn eval(a: EvalArgs) -> Result<i32> {
    let job = load_config(&a.config)?;
    configure_threads(job.train.threads, 1);
    let device = weaver_models::device::parse_device(&job.train.device)?;
    let path = Path::new(&a.checkpoint);
    if !path.is_file() {
        // A quantized checkpoint has int8 weights the float store cannot take: the
        // compression loader builds its model.
        let ckpt = block_on(Checkpoint::open_url(&a.checkpoint))?;
        // A pruned checkpoint may be a smaller model than the config's (`--method mlp`):
        // the loader builds it from the checkpoint's own config.
        // Pruned and quantized checkpoints: the compression loader builds the model (from
        // the checkpoint's own config), evaluated on the held-out pool.
        let evaluate_compressed = || -> Result<()> {
            let opts = weaver_compress::LoadOptions {
                device,
                ..weaver_compress::LoadOptions::cpu()
            };
            let loaded = weaver_compress::load_checkpoint(&ckpt, &job, &opts)?;
            let data = weaver_worker::train::dataset(&loaded.job)?;
            let e = weaver_worker::eval::evaluate(
                &loaded.model,
                &data,
                loaded.job.eval.pool,
                loaded.job.micro_batch_size(),
                device,
                loaded.step,
            )?;
            println!("{}", serde_json::to_string(&e)?);
            Ok(())
        };
        if let Some(p) = weaver_compress::prune::pruning(ckpt.manifest())? {
            if a.probe.is_none() {
                evaluate_compressed()?;
                tracing::info!(
                    method = p.method.name(),
                    sparsity = p.sparsity,
                    "evaluated a pruned checkpoint"
                );
                return Ok(0);
            }
        }
        if let Some(q) = weaver_compress::load::quantization(ckpt.manifest())? {
            if a.probe.is_some() {
                bail!(
                    "--probe runs on float weights and {} is quantized ({}): probe its source {}",
                    ckpt.url(),
                    q.scheme.name(),
                    q.source
                );
            }
            evaluate_compressed()?;
            return Ok(0);
        }
    }
    // The evaluation line's step: the checkpoint's (a bare weights file has none: 0).
    let mut step = 0;
    let named = if path.is_file() {
        tch::Tensor::read_safetensors(path)
            .with_context(|| format!("reading weights from {}", path.display()))?
    } else {
        // A checkpoint: read each parameter whole.
        let ckpt = block_on(Checkpoint::open_url(&a.checkpoint))?;
        step = ckpt.step();
        let names: Vec<String> = ckpt
            .manifest()
            .tensors
            .keys()
            .filter(|n| is_param(n))
            .cloned()
            .collect();
        let named = names
            .into_iter()
            .map(|n| {
                let t = block_on(ckpt.read_tensor(&n))
                    .with_context(|| format!("reading {n} from {}", ckpt.url()))?;
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        // A LoRA checkpoint evaluated with a config without adapters: merge them (with the
        // checkpoint's own scale), as its export would.
        if job.train.lora_rank == 0
            && named
                .iter()
                .any(|(n, _)| weaver_models::lora::is_adapter(n))
        {
            let text = block_on(ckpt.read_bytes(weaver_worker::ckpt::CONFIG))?;
            let saved = weaver_models::JobConfig::parse(&String::from_utf8_lossy(&text), &[])?;
            let spec = weaver_models::lora::LoraSpec::of(&saved.train).context(
                "the checkpoint holds LoRA adapters but its config has train.lora_rank = 0",
            )?;
            weaver_models::lora::merge_all(named, spec.scale())?
        } else {
            named
        }
    };
    if let Some(label) = &a.probe {
        let label: SceneLabel = label.parse()?;
        let mut built = build(&job)?;
        let named: Vec<(String, tch::Tensor)> = named
            .iter()
            .map(|(n, t)| {
                Ok((
                    n.clone(),
                    t.f_to_kind(built.store.kind)?.f_to_device(device)?,
                ))
            })
            .collect::<Result<_, tch::TchError>>()?;
        built.store.load_local(&named)?;
        let source = SyntheticLabels {
            data: built.data.clone(),
            label,
        };
        let cfg = ProbeConfig {
            train: a.probe_train,
            test: a.probe_test,
            ..ProbeConfig::default()
        };
        let r = probe(&built.model, &source, &cfg, device)?;
        let mut v = serde_json::to_value(&r)?;
        v["probe"] = serde_json::json!(format!("{label:?}").to_lowercase());
        println!("{v}");
        return Ok(0);
    }
    let e = evaluate_weights(&job, &named, device, step)?;
    println!("{}", serde_json::to_string(&e)?);
    Ok(0)
}

/// `weaver infer`: the job config (given, or the checkpoint's own) with `[infer]` and
/// `[data]` from the flags; one process runs it here, more run it as a job under a local
/// coordinator.
fn infer(a: InferArgs) -> Result<i32> {
    let mut sets: Vec<String> = Vec::new();
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    sets.push(format!("infer.checkpoint={}", quote(&a.checkpoint)));
    sets.push(format!("infer.out={}", quote(&a.out)));
    sets.push(format!("infer.task={}", quote(&a.task)));
    if a.data == "synthetic" {
        sets.push("data.source=\"synthetic\"".into());
    } else {
        sets.push("data.source=\"shards\"".into());
        sets.push(format!("data.shards={}", quote(&a.data)));
    }
    if let Some(b) = a.beam {
        sets.push(format!("infer.beam={b}"));
    }
    if let Some(n) = a.max_new_tokens {
        sets.push(format!("infer.max_new_tokens={n}"));
    }
    if let Some(st) = &a.stop {
        sets.push(format!("infer.stop={}", quote(st)));
    }
    if let Some(b) = a.batch {
        sets.push(format!("infer.batch={b}"));
    }
    let job = match &a.config {
        Some(path) => {
            sets.extend(a.overrides.iter().cloned());
            let job = JobConfig::load(path, &sets)?;
            let p = &job.parallel;
            if a.nproc != p.dp * p.pp * p.tp && a.nproc > 1 {
                bail!(
                    "--nproc {} does not match [parallel] dp × pp × tp = {} × {} × {}; change one of them",
                    a.nproc, p.dp, p.pp, p.tp
                );
            }
            job
        }
        None => {
            let ckpt = block_on(Checkpoint::open_url(&a.checkpoint))?;
            let Some(saved) = weaver_compress::load::checkpoint_job(&ckpt)? else {
                bail!(
                    "{} carries no job config (train.config): pass --config",
                    ckpt.url()
                );
            };
            // The training layout does not carry over: dp = --nproc workers, each with the
            // whole model; the data keys of training that constrain dp are reset.
            let n = a.nproc;
            let mut base = vec![
                format!("parallel.dp={n}"),
                "parallel.tp=1".into(),
                "parallel.pp=1".into(),
                "parallel.microbatches=1".into(),
                "parallel.schedule=\"1f1b\"".into(),
                "parallel.virtual_stages=1".into(),
                "parallel.shard_optimizer=false".into(),
                format!("data.streams={n}"),
                format!("train.global_batch={}", 8 * n),
                "checkpoint.url=\"\"".into(),
                "data.eval_shards=\"\"".into(),
            ];
            base.extend(sets);
            base.extend(a.overrides.iter().cloned());
            JobConfig::parse(&saved.to_toml(), &base)?
        }
    };
    if a.nproc <= 1 {
        let sigterm = sigterm_flag()?;
        let stop = || sigterm.load(Ordering::SeqCst);
        let mut shards = 0usize;
        let s = weaver_worker::infer::run_solo(&job, &stop, &mut |d| {
            shards += 1;
            let line = serde_json::json!({
                "infer_shard": d.name, "samples": d.samples, "skipped": d.skipped,
                "seconds": d.seconds, "bad_samples": d.bad_samples,
            });
            println!("{line}");
        })?;
        println!("{}", serde_json::to_string(&s)?);
        if s.stopped {
            eprintln!(
                "stopped by SIGTERM after {shards} shards; run the same command again to continue"
            );
            return Ok(PREEMPTED);
        }
        return Ok(0);
    }
    let run_dir = a
        .run_dir
        .unwrap_or_else(|| default_run_dir(Path::new("infer")));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    std::fs::write(run_dir.join("config.toml"), job.to_toml())
        .with_context(|| format!("writing {}", run_dir.display()))?;
    let token = JobToken::generate()?;
    token.write_file(&run_dir.join("job.token"))?;
    let recovery = RecoveryArgs {
        max_restarts: 3,
        heartbeat_timeout_s: 10,
    };
    let copts = coordinator_options(job, token, &run_dir, None, &recovery)?;
    let exe = std::env::current_exe().context("cannot find the weaver binary")?;
    let command: Vec<OsString> = vec![
        exe.into(),
        "worker".into(),
        "--run-dir".into(),
        run_dir.clone().into(),
    ];
    let report = weaver_launch::launch(LaunchOptions::new(copts, a.nproc, command))?;
    let code = outcome_code(&report.outcome);
    if code == 0 {
        println!("job completed: {:?}", report.outcome);
        println!("run directory: {}", run_dir.display());
    }
    Ok(code)
}

fn import(c: ImportCommand) -> Result<i32> {
    match c {
        ImportCommand::OpenClip { arch, weights, out } => {
            let r = weaver_openclip::import(&arch, &weights, &out)?;
            println!(
                "imported {} tensors ({} parameters) of open_clip {arch} as flavor {}: {}",
                r.tensors, r.numel, r.flavor, r.url
            );
            println!(
                "start a run from it with --set model.flavor={} --set model.init_from={}",
                r.flavor, r.url
            );
        }
    }
    Ok(0)
}

fn ckpt(c: CkptCommand) -> Result<i32> {
    let mut out = std::io::stdout();
    match c {
        CkptCommand::Ls { url } => {
            weaver_checkpoint::cli::ls(&url, &mut out)?;
        }
        CkptCommand::Inspect { url } => {
            weaver_checkpoint::cli::inspect(&url, &mut out)?;
        }
        CkptCommand::Verify { url } => {
            let report = weaver_checkpoint::cli::verify(&url, &mut out)?;
            if !report.is_ok() {
                return Ok(1);
            }
        }
        CkptCommand::Export {
            url,
            out: file,
            all,
            format,
        } => match format.as_str() {
            // A LoRA run's parameters are exported merged (unless --all asks for
            // everything as saved).
            "weaver" if !all => {
                let ckpt = block_on(Checkpoint::open_url(&url))?;
                let n = weaver_worker::ckpt::export_params(&ckpt, &file)?;
                println!(
                    "exported step {} ({n} tensors) to {}",
                    ckpt.step(),
                    file.display()
                );
            }
            "weaver" => {
                let keep = |_: &str| true;
                weaver_checkpoint::cli::export(&url, &file, &keep, &mut out)?;
            }
            "open_clip" => {
                if all {
                    bail!("--all exports weaver's optimizer state, which open_clip has no place for; drop --all");
                }
                let r = weaver_openclip::export(&url, &file)?;
                println!(
                    "wrote {} tensors to {} (open_clip {})",
                    r.tensors,
                    r.path.display(),
                    r.arch
                );
            }
            other => bail!("unknown --format {other:?}; use weaver or open_clip"),
        },
        CkptCommand::Save(a) => {
            let (url, token, tls) = client_parts(&a)?;
            let step = weaver_launch::request_checkpoint(&url, &token, tls.as_ref())?;
            println!("the job will checkpoint after step {step}");
        }
        CkptCommand::Quantize {
            url,
            out: dest,
            scheme,
            calibrate,
            smooth_alpha,
            config,
            overrides,
        } => {
            let scheme: weaver_compress::Scheme = scheme.parse()?;
            let mut opts = weaver_compress::QuantizeOptions::new(scheme);
            if let Some(n) = calibrate {
                opts.calibration_samples = n;
            }
            if let Some(a) = smooth_alpha {
                opts.smooth_alpha = a;
            }
            let job = match config {
                Some(path) => JobConfig::load(&path, &overrides)?,
                None => {
                    let ckpt = block_on(Checkpoint::open_url(&url))?;
                    let Some(saved) = weaver_compress::load::checkpoint_job(&ckpt)? else {
                        bail!(
                            "{} carries no job config (train.config): pass --config",
                            ckpt.url()
                        );
                    };
                    JobConfig::parse(&saved.to_toml(), &overrides)?
                }
            };
            // A job with held-out shards calibrates on them (read by the worker's loader).
            let shards = |job: &JobConfig,
                          samples: usize,
                          batch: usize|
             -> weaver_compress::Result<
                Box<dyn Iterator<Item = weaver_compress::Result<weaver_models::data::Batch>>>,
            > {
                let heldout = |e: weaver_worker::error::WorkerError| {
                    weaver_compress::CompressError::Heldout(e.to_string())
                };
                let batches =
                    weaver_worker::heldout::heldout_shards(job, samples, batch).map_err(heldout)?;
                Ok(Box::new(batches.map(move |b| b.map_err(heldout))))
            };
            let r = weaver_compress::quantize_with(&url, &dest, &job, &opts, Some(&shards))?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({
                    "url": r.url,
                    "scheme": scheme.name(),
                    "layers": r.info.layers,
                    "int8_params": r.int8_params,
                    "float_params": r.float_params,
                    "calibration_samples": r.info.calibration_samples,
                    "smooth_alpha": r.info.smooth_alpha,
                    "source_param_bytes": r.source_param_bytes,
                    "bytes": r.bytes,
                }))?
            );
        }
        CkptCommand::Prune {
            url,
            out: dest,
            sparsity,
            method,
            config,
            overrides,
        } => {
            let method: weaver_compress::prune::Method = method.parse()?;
            let job = match config {
                Some(path) => JobConfig::load(&path, &overrides)?,
                None => {
                    let ckpt = block_on(Checkpoint::open_url(&url))?;
                    let Some(saved) = weaver_compress::load::checkpoint_job(&ckpt)? else {
                        bail!(
                            "{} carries no job config (train.config): pass --config",
                            ckpt.url()
                        );
                    };
                    JobConfig::parse(&saved.to_toml(), &overrides)?
                }
            };
            let r = weaver_compress::prune::prune(&url, &dest, &job, method, sparsity)?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({
                    "url": r.url,
                    "method": method.name(),
                    "sparsity": sparsity,
                    "layers": r.info.layers,
                    "params_before": r.params_before,
                    "params_after": r.params_after,
                    "zeros": r.zeros,
                    "bytes": r.bytes,
                }))?
            );
        }
    }
    Ok(0)
}

fn data(c: DataCommand) -> Result<i32> {
    let stores = weaver_data::shards::Stores::default();
    let progress = std::io::stderr().is_terminal();
    match c {
        DataCommand::Pack {
            images,
            captions,
            out,
            shard_size,
            image_size,
            prefix,
        } => {
            let stats = weaver_data::pack::pack(
                &weaver_data::pack::PackOptions {
                    images,
                    captions,
                    out: out.clone(),
                    shard_size,
                    image_size,
                    prefix,
                    progress,
                },
                &stores,
            )?;
            for s in stats.skipped.iter().take(20) {
                eprintln!("skipped {s}");
            }
            println!(
                "{} samples in {} shards ({:.1} MiB) under {out}; {} skipped; images {}–{} × {}–{} px; stats.json written",
                stats.samples,
                stats.shards,
                stats.bytes as f64 / (1 << 20) as f64,
                stats.skipped.len(),
                stats.width.min,
                stats.width.max,
                stats.height.min,
                stats.height.max
            );
        }
        DataCommand::Inspect {
            url,
            show,
            full,
            image_key,
            caption_key,
        } => {
            let fields = weaver_data::sample::Fields::new(&image_key, &caption_key, "caption");
            let r = weaver_data::pack::inspect(&url, show, full, &fields, &stores)?;
            println!("{} shards", r.shards);
            if let Some(st) = &r.stats {
                println!(
                    "stats.json: {} samples, {} bytes, formats {}",
                    st["samples"], st["bytes"], st["formats"]
                );
            }
            if full {
                println!(
                    "read {} samples: {} bad, {} unreadable members",
                    r.samples, r.bad, r.bad_members
                );
            }
            for s in &r.shown {
                let members: Vec<String> = s
                    .members
                    .iter()
                    .map(|(x, n)| format!("{x} ({n} B)"))
                    .collect();
                println!(
                    "{}  {}  [{}]  image {}  caption {:?}",
                    s.shard,
                    s.key,
                    members.join(", "),
                    s.image,
                    s.caption
                );
            }
            if full && r.bad > 0 {
                return Ok(2);
            }
        }
    }
    Ok(0)
}

fn status(a: ClientArgs) -> Result<i32> {
    let (url, token, tls) = client_parts(&a)?;
    print!("{}", weaver_launch::status(&url, &token, tls.as_ref())?);
    Ok(0)
}
