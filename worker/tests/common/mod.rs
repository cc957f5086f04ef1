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
                )
                .unwrap();
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
