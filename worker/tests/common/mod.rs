//! Runs every rank of a job as a thread of the test process, over the tcp backend on
//! 127.0.0.1 (the code path of separate processes, without their start-up cost).

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use weaver_checkpoint::CkptStore;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, TcpComm};
use weaver_parallel::store::Store;
use weaver_parallel::tcp_store::{TcpStore, TcpStoreServer};
use weaver_worker::ckpt::{LocalCommitter, ShardSink};
use weaver_worker::parallel::{checkpoint_layout, ParallelTrainer, Plan, RankSetup};

/// Builds every rank of `job` and runs `body(rank, trainer)` on each, in parallel; returns
/// the results in rank order.
pub(crate) fn on_ranks<R, F>(job: &JobConfig, run_dir: &Path, body: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, ParallelTrainer) -> R + Send + Sync + 'static,
{
    try_on_ranks(job, run_dir, move |rank, t| body(rank, t.unwrap()))
}

/// [`on_ranks`] for a job whose ranks may fail to build: `body` gets each rank's
/// `ParallelTrainer::new` result.
pub(crate) fn try_on_ranks<R, F>(job: &JobConfig, run_dir: &Path, body: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(usize, Result<ParallelTrainer, weaver_worker::WorkerError>) -> R + Send + Sync + 'static,
{
    let p = &job.parallel;
    let world = p.tp * p.pp * p.dp;
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let addr = server.addr();
    let body = Arc::new(body);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let (job, run_dir, body) = (job.clone(), run_dir.to_path_buf(), body.clone());
            std::thread::spawn(move || {
                let store: Arc<dyn Store> = Arc::new(TcpStore::new(addr, Duration::from_secs(30)));
                let comm: Arc<dyn Communicator> = Arc::new(
                    TcpComm::connect(
                        store,
                        "test",
                        rank,
                        world,
                        "127.0.0.1",
                        Duration::from_secs(60),
                    )
                    .unwrap(),
                );
                let t = ParallelTrainer::new(
                    job,
                    RankSetup {
                        world: comm,
                        run_dir,
                        local_procs: world,
                        progress: false,
                        metrics: None,
                    },
                );
                body(rank, t)
            })
        })
        .collect();
    let out = handles.into_iter().map(|h| h.join().unwrap()).collect();
    drop(server);
    out
}

/// A debug-flavor job with micro-batches of 4 samples whatever the layout
/// (`dp × microbatches = 4`), short timeouts, one thread per rank.
pub(crate) fn job(
    tp: usize,
    pp: usize,
    dp: usize,
    schedule: &str,
    v: usize,
    extra: &[String],
) -> JobConfig {
    let text = format!(
        "[model]\nflavor = \"debug\"\n\
         [train]\nsteps = 6\nglobal_batch = 16\nwarmup_steps = 2\nlr = 2e-3\nthreads = 1\n\
         [parallel]\ntp = {tp}\npp = {pp}\ndp = {dp}\nmicrobatches = {}\nschedule = \"{schedule}\"\nvirtual_stages = {v}\ninit_timeout_s = 30\ntimeout_s = 30\n",
        4 / dp
    );
    JobConfig::parse(&text, extra).unwrap()
}

/// One rank's part of one parameter: name, global shape, which part, an f32 CPU copy.
pub(crate) type Piece = (String, Vec<i64>, weaver_models::nn::Shard, tch::Tensor);

/// This rank's parameters, copied (what the test later assembles into the whole model).
pub(crate) fn local_params(t: &ParallelTrainer) -> Vec<Piece> {
    t.store()
        .params()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.global_shape.clone(),
                p.shard,
                p.tensor
                    .detach()
                    .to_kind(tch::Kind::Float)
                    .to_device(tch::Device::Cpu)
                    .copy(),
            )
        })
        .collect()
}

/// The whole model from every rank's pieces (replicas of a part are identical; any one is
/// kept), in name order.
pub(crate) fn assemble(ranks: Vec<Vec<Piece>>) -> Vec<(String, tch::Tensor)> {
    let mut whole: std::collections::BTreeMap<String, tch::Tensor> = Default::default();
    for (name, global, shard, t) in ranks.into_iter().flatten() {
        let dst = whole.entry(name).or_insert_with(|| {
            tch::Tensor::zeros(global.as_slice(), (tch::Kind::Float, tch::Device::Cpu))
        });
        if shard.world == 1 {
            dst.copy_(&t);
        } else {
            let (dim, start, len) = shard.range(&global);
            dst.narrow(dim as i64, start, len).copy_(&t);
        }
    }
    whole.into_iter().collect()
}

/// `job` with its checkpoints at `url`.
pub(crate) fn with_ckpt(job: JobConfig, url: &Path) -> JobConfig {
    JobConfig::parse(
        &job.to_toml(),
        &[format!("checkpoint.url=\"{}\"", url.display())],
    )
    .unwrap()
}

/// What commits the checkpoints of `job`'s ranks, all of them threads of this process.
pub(crate) fn committer(job: &JobConfig) -> Arc<dyn ShardSink> {
    let p = &job.parallel;
    let world = p.dp * p.pp * p.tp;
    let plan = Plan::new(job, world).unwrap();
    Arc::new(LocalCommitter::new(
        CkptStore::open(&job.checkpoint.url).unwrap(),
        world,
        0,
        checkpoint_layout(job, &plan),
    ))
}

/// The largest absolute difference between each parameter of `want` and the same-named one
/// of `got`; panics (naming `what` and the parameter) when one is missing or differs by
/// `tol` or more.
pub(crate) fn worst_param_diff(
    what: &str,
    want: &[(String, tch::Tensor)],
    got: &[(String, tch::Tensor)],
    tol: f64,
) -> f64 {
    let mut worst = 0f64;
    for (name, r) in want {
        let (_, p) = got
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{what}: {name} missing from the assembled model"));
        let diff = (r - p).abs().max().double_value(&[]);
        worst = worst.max(diff);
        assert!(diff < tol, "{what}: {name} differs by {diff:e}");
    }
    worst
}

/// Trains `job` for `steps` steps, checkpointing after step `save_at`; rank 0's losses.
pub(crate) fn train_saving(
    job: &JobConfig,
    steps: u64,
    save_at: u64,
    url: &std::path::Path,
) -> Vec<f64> {
    let job = with_ckpt(job.clone(), url);
    let sink = committer(&job);
    let dir = tempfile::tempdir().unwrap();
    let out = on_ranks(&job, dir.path(), move |_, mut t| {
        t.enable_checkpoints(sink.clone()).unwrap();
        let mut losses = Vec::new();
        for _ in 0..steps {
            losses.push(t.train_step().unwrap().loss);
            if t.step() == save_at {
                t.save_checkpoint().unwrap();
            }
        }
        t.finish_checkpoints().unwrap();
        losses
    });
    out[0].clone()
}

/// Resumes `job` from the checkpoint at `url` and trains `steps` more; rank 0's losses.
pub(crate) fn resume_training(job: &JobConfig, url: String, steps: u64) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let out = on_ranks(job, dir.path(), move |_, mut t| {
        let ckpt = weaver_worker::ckpt::open_resume(&url, &t.job().checkpoint.url).unwrap();
        t.resume(ckpt).unwrap();
        (0..steps)
            .map(|_| t.train_step().unwrap().loss)
            .collect::<Vec<f64>>()
    });
    out[0].clone()
}

const COLORS: [&str; 3] = ["red", "green", "blue"];
const SHAPES: [&str; 2] = ["circle", "square"];

/// `shards` shards of ten samples named `prefix-S.tar`: test-pattern JPEGs, captions in the
/// grammar's words.
pub(crate) fn write_shards(dir: &std::path::Path, prefix: &str, shards: u64, offset: u64) {
    use weaver_data::image::{encode_jpeg, test_pattern};
    use weaver_data::tar::TarWriter;
    std::fs::create_dir_all(dir).unwrap();
    for s in 0..shards {
        let f = std::fs::File::create(dir.join(format!("{prefix}-{s}.tar"))).unwrap();
        let mut tw = TarWriter::new(f);
        for i in 0..10u64 {
            let n = offset + s * 10 + i;
            let key = format!("{n:05}");
            let img = test_pattern(48, 40, n);
            tw.append(&format!("{key}.jpg"), &encode_jpeg(&img, 90).unwrap())
                .unwrap();
            let caption = format!(
                "a small {} {}",
                COLORS[(n % 3) as usize],
                SHAPES[(n / 3 % 2) as usize]
            );
            tw.append(&format!("{key}.txt"), caption.as_bytes())
                .unwrap();
        }
        tw.finish().unwrap();
    }
}
