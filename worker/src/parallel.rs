//! One rank of a 3-D parallel job: its pipeline chunk(s) of the model, its tensor-parallel
//! part of each layer, and its share of the data; the schedule's actions driven over the
//! communicators.
//!
//! The order of parallelisms, applied once when the rank is built (torchtitan's
//! `parallelize`): the pipeline plan cuts the layers into virtual stages (balanced by
//! FLOPs); each stage is built with this rank's tensor-parallel part of every layer; the
//! data-parallel replicas start from identical values (initial values are a function of the
//! parameter's name) and stay identical because they apply identical, all-reduced gradients.
//!
//! One step: every rank draws the same global batch; data-parallel rank `d` takes
//! micro-batches `d·M .. (d+1)·M` of the `dp·M` the batch is cut into — the same
//! micro-batches a single process would accumulate, so the layouts compute one function.
//! The pipeline schedule runs the micro-batches; gradients are all-reduced over the
//! data-parallel group in buckets; the global gradient norm sums sharded parameters on every
//! TP rank and replicated ones once; AdamW updates identically everywhere.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weaver_checkpoint::{Checkpoint, Selector, SliceRequest};

use tch::{Device, Kind, Tensor};
use tracing::{debug, info, info_span, warn};
use weaver_data::source::{BatchSource, Piece};
use weaver_models::config::DataSource;
use weaver_models::config::{Backend, Schedule as ScheduleName};
use weaver_models::data::{Batch, Dataset, SamplerState};
use weaver_models::device::compute_kind;
use weaver_models::model::{ActField, Acts, LossWeights, Losses};
use weaver_models::nn::ParamStore;
use weaver_models::{JobConfig, Model};
use weaver_parallel::comm::{mesh_groups, Communicator, MeshComms, P2POp, ReduceOp, SoloComm};
use weaver_parallel::mesh::{Coord, ParallelDims};
use weaver_parallel::pp::{Action, Payload, Schedule, ScheduleKind, Transfer};
use weaver_parallel::tp::{Tape, TpPos};

use crate::ckpt::{
    exp_avg_name, exp_avg_sq_name, param_ranges, read_with_fallback, to_param, Saver, ShardSink,
    CONFIG, STATE,
};
use crate::error::WorkerError;
use crate::eval::evaluate_weights;
use crate::metrics::{DataCounts, EvalMetrics, MetricsSink, MetricsWriter, StepMetrics};
use crate::optim::{clip_grads, lr_at, AdamW, AdamWConfig};
use crate::train::{dataset, StepLosses, Summary};

/// What a rank tells rank 0 about each parameter piece it sends when the model is gathered.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PieceHeader {
    name: String,
    global: Vec<i64>,
    local: Vec<i64>,
    dim: usize,
    rank: usize,
    world: usize,
}

/// Tensors of one transfer, by (payload, micro-batch, boundary).
type Mailbox = HashMap<(Payload, usize, usize), Vec<Tensor>>;

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

fn tp_err(e: weaver_parallel::tp::TpError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

/// Opens the pipeline group's links to both neighbours (and around the ring, which the
/// interleaved schedule uses) before the schedule runs. The tcp backend connects a link on
/// its first use and a receive waits for the peer's connection, so a batch whose receive
/// comes from a peer that has not yet sent anything could wait on that peer while the peer
/// waits for our send; one exchange in each direction, sends listed first, connects every
/// link without such a wait.
fn connect_pipeline(pp: &dyn Communicator) -> Result<(), weaver_parallel::comm::CommError> {
    let n = pp.size();
    if n < 2 {
        return Ok(());
    }
    let r = pp.rank();
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for (to, from) in [(next, prev), (prev, next)] {
        let out = Tensor::from_slice(&[r as i64]);
        let mut inp = Tensor::from_slice(&[0i64]);
        pp.batch_p2p(&mut [
            P2POp::Send {
                tensor: &out,
                peer: to,
            },
            P2POp::Recv {
                tensor: &mut inp,
                peer: from,
            },
        ])?;
    }
    Ok(())
}

/// The layout a job asks for, checked against the model and the process count.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Mesh sizes.
    pub dims: ParallelDims,
    /// Layers of each virtual stage (`pp · v` of them; stage `s` on pipeline rank `s mod pp`).
    pub stages: Vec<Range<usize>>,
    /// The schedule family.
    pub kind: ScheduleKind,
    /// Chunks per pipeline rank.
    pub chunks: usize,
}

impl Plan {
    /// Validates `[parallel]` for `world` processes and cuts the model into stages (the
    /// one validation the coordinator and the planner use too: `weaver_config::layout`).
    pub fn new(job: &JobConfig, world: usize) -> Result<Plan, WorkerError> {
        let l = weaver_config::layout::ParallelLayout::new(job, world)
            .map_err(|e| WorkerError::Layout(e.to_string()))?;
        Ok(Plan {
            dims: l.dims,
            stages: l.stages,
            kind: l.kind,
            chunks: l.chunks,
        })
    }
}

/// What a rank is handed to run.
#[derive(Debug)]
pub struct RankSetup {
    /// The world communicator (all ranks).
    pub world: Arc<dyn Communicator>,
    /// Where rank 0 writes metrics and the final weights.
    pub run_dir: PathBuf,
    /// Training processes on this host (to share the cores).
    pub local_procs: usize,
    /// Show a progress bar on rank 0 (drawn only when stderr is a terminal).
    pub progress: bool,
    /// Where this rank's metrics go (none: rank 0 writes `<run dir>/metrics.jsonl`, the
    /// others nothing).
    pub metrics: Option<Box<dyn MetricsSink>>,
}

/// The job's layout collapsed into one process: `dp × microbatches` micro-batches
/// accumulated by a single rank that holds the whole model — the same function as the
/// layout, so `weaver train` on any config trains what `weaver launch` would.
pub fn collapse(mut job: JobConfig) -> JobConfig {
    let p = &mut job.parallel;
    p.microbatches *= p.dp;
    p.dp = 1;
    p.pp = 1;
    p.tp = 1;
    p.schedule = ScheduleName::OneFOneB;
    p.virtual_stages = 1;
    job.file.parallel = job.parallel.clone();
    job
}

impl ParallelTrainer {
    /// A one-process trainer for `job` (its layout collapsed, see [`collapse`]).
    pub fn solo(
        job: JobConfig,
        run_dir: PathBuf,
        progress: bool,
    ) -> Result<ParallelTrainer, WorkerError> {
        let collapsed = collapse(job);
        let device = weaver_models::device::parse_device(&collapsed.train.device)?;
        ParallelTrainer::new(
            collapsed,
            RankSetup {
                world: Arc::new(SoloComm::on(device)),
                run_dir,
                local_procs: 1,
                progress,
                metrics: None,
            },
        )
    }
}

/// Tensors produced by a forward and kept for its backward.
#[derive(Debug)]
struct InFlight {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    tape: Tape,
    loss: Option<Losses>,
}

/// One rank of a parallel job.
#[derive(Debug)]
pub struct ParallelTrainer {
    /// The job.
    pub job: JobConfig,
    /// The layout.
    pub plan: Plan,
    /// This rank's coordinates.
    pub coord: Coord,
    /// This rank's parameters (its stages, its TP part).
    pub store: ParamStore,
    /// Optimizer state of those parameters.
    pub opt: AdamW,
    /// Steps completed.
    pub step: u64,
    rank: usize,
    world: Arc<dyn Communicator>,
    comms: MeshComms,
    chunks: Vec<Model>,
    schedule: Schedule,
    /// This rank's micro-batches, prepared ahead (see [`crate::data`]).
    source: Box<dyn BatchSource>,
    data: Dataset,
    local_procs: usize,
    /// `<run dir>/data-keys-rankR.jsonl` when `data.log_keys` is on.
    keys_log: Option<std::io::BufWriter<std::fs::File>>,
    device: Device,
    kind: Kind,
    metrics: Option<Box<dyn MetricsSink>>,
    run_dir: PathBuf,
    /// Time of the last step's schedule: (computing, whole schedule), in seconds.
    last_schedule: (f64, f64),
    progress: bool,
    control: Arc<Control>,
    /// What every rank agreed at the end of the last step: (save now, stop now).
    agreed: (bool, bool),
    /// Whether a step completed in this process (the tight timeout applies after it).
    warmed_up: bool,
    saver: Option<Saver>,
}

/// Requests that reach a running trainer from outside the step loop (signal handlers, the
/// coordinator's events). Ranks see them at different moments, so each step ends with a
/// tiny all-reduce of every rank's requests: all ranks act on them at the same step.
#[derive(Debug)]
pub struct Control {
    save_at: AtomicU64,
    stop: AtomicBool,
    stop_at: AtomicU64,
    stopped_at: AtomicU64,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            save_at: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            stop_at: AtomicU64::new(u64::MAX),
            stopped_at: AtomicU64::new(u64::MAX),
        }
    }
}

impl Control {
    /// Checkpoint at the end of the first step numbered `step` or later.
    pub fn request_save_at(&self, step: u64) {
        self.save_at.fetch_min(step, Ordering::SeqCst);
    }

    /// Checkpoint (when a checkpoint URL is set) and stop at the end of the current step:
    /// preemption.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Checkpoint and stop at the end of the first step numbered `step` or later.
    pub fn request_stop_at(&self, step: u64) {
        self.request_save_at(step);
        self.stop_at.fetch_min(step, Ordering::SeqCst);
    }

    /// Whether a stop was requested (now, or by the step just finished).
    fn stop_wanted(&self, step: u64) -> bool {
        self.stop_requested() || self.stop_at.load(Ordering::SeqCst) <= step
    }

    /// The step the trainer stopped at (with a checkpoint, when checkpoints are on).
    pub fn stopped_at(&self) -> Option<u64> {
        Some(self.stopped_at.load(Ordering::SeqCst)).filter(|&s| s != u64::MAX)
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl ParallelTrainer {
    /// Builds this rank: groups, model chunks, optimizer. Collective: every rank of `world`
    /// calls it.
    pub fn new(job: JobConfig, setup: RankSetup) -> Result<ParallelTrainer, WorkerError> {
        let world = setup.world;
        let rank = world.rank();
        let plan = Plan::new(&job, world.size())?;
        let coord = plan.dims.coord(rank);
        crate::train::configure_threads(job.train.threads, setup.local_procs);
        let device = weaver_models::device::parse_device(&job.train.device)?;
        weaver_models::device::check_device(device)?;
        if world.size() > 1 && job.parallel.backend == Backend::Tcp && device != Device::Cpu {
            return Err(WorkerError::Layout(format!(
                "parallel.backend = \"tcp\" moves CPU tensors; set train.device = \"cpu\" or parallel.backend = \"nccl\" (got device {:?})",
                job.train.device
            )));
        }
        let kind = compute_kind(&job.train.dtype, device)?;
        world.set_timeout(Duration::from_secs(job.parallel.init_timeout_s));
        let comms = mesh_groups(world.as_ref(), &plan.dims).map_err(comm_err)?;
        if job.parallel.backend == Backend::Tcp && world.size() > 1 {
            connect_pipeline(comms.pp.as_ref()).map_err(comm_err)?;
        }
        let data = dataset(&job)?;
        let mut store = ParamStore::new(device, kind, job.train.seed);
        let tp = TpPos {
            rank: coord.tp,
            size: plan.dims.tp,
        };
        let p = plan.dims.pp;
        let chunks = (0..plan.chunks)
            .map(|c| {
                Model::new(
                    &mut store,
                    &job.model,
                    plan.stages[c * p + coord.pp].clone(),
                    tp,
                    data.tokenizer.pad_id(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schedule = Schedule::new(plan.kind, p, job.parallel.microbatches, plan.chunks)
            .map_err(|e| WorkerError::Layout(e.to_string()))?;
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: job.train.beta1,
                beta2: job.train.beta2,
                eps: job.train.eps,
                weight_decay: job.train.weight_decay,
            },
            store.params(),
        )?;
        crate::init::load_init_from(&job.model, &store, Some(&mut opt))?;
        let source = crate::data::start_source(
            &job,
            &data,
            plan.dims.dp,
            coord.dp,
            writes_data_position(coord),
            device,
            setup.local_procs,
            None,
            SamplerState::default(),
        )?;
        let keys_log = if job.data.log_keys && writes_data_position(coord) {
            std::fs::create_dir_all(&setup.run_dir)
                .map_err(|e| WorkerError::io(&setup.run_dir, e))?;
            let path = setup.run_dir.join(format!("data-keys-rank{rank}.jsonl"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| WorkerError::io(&path, e))?;
            Some(std::io::BufWriter::new(f))
        } else {
            None
        };
        let metrics: Option<Box<dyn MetricsSink>> = if setup.metrics.is_some() {
            setup.metrics
        } else if rank == 0 {
            std::fs::create_dir_all(&setup.run_dir)
                .map_err(|e| WorkerError::io(&setup.run_dir, e))?;
            let cfg = setup.run_dir.join("config.toml");
            std::fs::write(&cfg, job.to_toml()).map_err(|e| WorkerError::io(&cfg, e))?;
            Some(Box::new(MetricsWriter::open(&setup.run_dir)?))
        } else {
            None
        };
        info!(
            rank,
            coord = %coord,
            layers = ?(0..plan.chunks).map(|c| plan.stages[c * p + coord.pp].clone()).collect::<Vec<_>>(),
            params = store.numel(),
            ?device,
            "rank built"
        );
        Ok(ParallelTrainer {
            job,
            plan,
            coord,
            store,
            opt,
            step: 0,
            rank,
            world,
            comms,
            chunks,
            schedule,
            source,
            data,
            local_procs: setup.local_procs,
            keys_log,
            device,
            kind,
            metrics,
            run_dir: setup.run_dir,
            last_schedule: (0.0, 0.0),
            progress: setup.progress && rank == 0,
            control: Arc::new(Control::default()),
            agreed: (false, false),
            warmed_up: false,
            saver: None,
        })
    }

    /// The world rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Seconds the last step's pipeline schedule spent computing (forwards, backwards,
    /// losses) and in all (computing plus waiting for transfers): the measured bubble is
    /// `1 − busy / total`.
    pub fn last_schedule_times(&self) -> (f64, f64) {
        self.last_schedule
    }

    fn weights(&self) -> LossWeights {
        LossWeights {
            itc: self.job.train.itc_weight,
            caption: self.job.train.caption_weight,
            itm: self.job.train.itm_weight,
        }
    }

    fn mbs(&self) -> usize {
        self.job.micro_batch_size()
    }

    fn virtual_stage(&self, chunk: usize) -> usize {
        chunk * self.plan.dims.pp + self.coord.pp
    }

    /// Shapes of what crosses `boundary` (into virtual stage `boundary + 1`).
    fn boundary(&self, boundary: usize) -> Vec<(ActField, Vec<i64>, Kind)> {
        Model::boundary_layout(
            &self.job.model,
            self.plan.stages[boundary + 1].start,
            self.mbs(),
            self.job.train.itm_weight > 0.0,
            self.kind,
        )
    }

    /// One optimizer step over the whole job; every rank returns the same metrics.
    pub fn train_step(&mut self) -> Result<StepMetrics, WorkerError> {
        let _span = info_span!("step", step = self.step + 1, rank = self.rank).entered();
        let started = Instant::now();
        let t = self.job.train.clone();
        let lr = lr_at(self.step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        let m = self.job.parallel.microbatches;
        let k_total = (self.plan.dims.dp * m) as f64;
        // This rank's micro-batches `d·M .. (d+1)·M` of the global batch, prepared ahead.
        let input = self.source.next_step()?;
        self.log_keys(self.step + 1, &input.keys)?;
        let counted = if writes_data_position(self.coord) {
            let s = input.stats;
            [
                s.samples,
                s.bad_image,
                s.bad_caption,
                s.bad_members,
                s.shards_skipped,
            ]
            .map(|v| v as f64)
        } else {
            [0.0; 5]
        };
        let batches: HashMap<usize, Batch> = input.micro.into_iter().enumerate().collect();

        self.store.zero_grad();
        let loss_sums = self.run_schedule(&batches, k_total)?;
        self.ensure_grads()?;
        self.all_reduce_grads()?;
        let grad_norm = self.global_grad_norm()?;
        clip_grads(self.store.params(), grad_norm, t.grad_clip)?;
        self.opt.step(self.store.params(), lr)?;
        self.step += 1;

        // Losses live on the last stage; sum its data-parallel ranks' shares (once per TP
        // group) over the world so that every rank knows them. The same all-reduce carries
        // each rank's outside requests, so that every rank acts on them at this step.
        let save_wanted = self.control.save_at.load(Ordering::SeqCst) <= self.step;
        let stop_wanted = self.control.stop_wanted(self.step);
        // The data counters of each replica (counted once, by its position writer) ride along.
        let mut flags_and_counts = vec![
            f64::from(u8::from(save_wanted)),
            f64::from(u8::from(stop_wanted)),
        ];
        flags_and_counts.extend_from_slice(&counted);
        let flags = Tensor::from_slice(&flags_and_counts).f_to_device(self.device)?;
        let mut l = Tensor::f_cat(&[&loss_sums, &flags], 0)?;
        self.world
            .all_reduce(&mut l, ReduceOp::Sum)
            .map_err(comm_err)?;
        let l: Vec<f64> = Vec::<f64>::try_from(&l.to_device(Device::Cpu))?;
        self.agreed = (l[4] > 0.0, l[5] > 0.0);
        if self.agreed.0 {
            self.control.save_at.store(u64::MAX, Ordering::SeqCst);
        }
        let losses = StepLosses {
            total: l[0] / k_total,
            itc: l[1] / k_total,
            caption: l[2] / k_total,
            itm: l[3] / k_total,
        };
        if !losses.total.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.step,
                loss: losses.total,
            });
        }
        if !self.warmed_up {
            // The first step (connections, allocation) is done: from now on a silent peer
            // is a lost peer within the tight timeout.
            self.warmed_up = true;
            self.world
                .set_timeout(Duration::from_secs(self.job.parallel.timeout_s));
        }
        if let Device::Cuda(k) = self.device {
            tch::Cuda::synchronize(k as i64);
        }
        let secs = started.elapsed().as_secs_f64();
        let mut metrics = StepMetrics::of_step(
            &self.job,
            self.step,
            &losses,
            lr,
            grad_norm,
            secs,
            self.world.size(),
        );
        if self.job.data.source == DataSource::Shards {
            metrics.data = Some(DataCounts {
                data_samples: l[6] as u64,
                data_bad_image: l[7] as u64,
                data_bad_caption: l[8] as u64,
                data_bad_members: l[9] as u64,
                data_shards_skipped: l[10] as u64,
            });
        }
        Ok(metrics)
    }

    /// Appends this step's sample keys to the keys log (`data.log_keys`).
    fn log_keys(&mut self, step: u64, keys: &[String]) -> Result<(), WorkerError> {
        let Some(f) = &mut self.keys_log else {
            return Ok(());
        };
        use std::io::Write;
        let line = serde_json::json!({"step": step, "dp_rank": self.coord.dp, "keys": keys});
        writeln!(f, "{line}")
            .and_then(|()| f.flush())
            .map_err(|e| WorkerError::io(&self.run_dir, e))
    }

    /// Runs this rank's schedule; returns its sums of the micro-batch losses (total, itc,
    /// caption, itm, on the device; zero except on the last stage's TP rank 0).
    fn run_schedule(
        &mut self,
        batches: &HashMap<usize, Batch>,
        k_total: f64,
    ) -> Result<Tensor, WorkerError> {
        let last_vs = self.plan.stages.len() - 1;
        let itm = self.job.train.itm_weight > 0.0;
        let w = self.weights();
        let mut inflight: HashMap<(usize, usize), InFlight> = HashMap::new();
        let mut inbox: Mailbox = HashMap::new();
        let mut outbox: Mailbox = HashMap::new();
        let mut sums = Tensor::f_zeros([4], (Kind::Double, self.device))?;
        let actions = self.schedule.actions[self.coord.pp].clone();
        let started = Instant::now();
        let mut busy = Duration::ZERO;
        for action in &actions {
            let t0 = Instant::now();
            let computes = !matches!(action, Action::Comm(_));
            match *action {
                Action::Forward { mb, chunk } => {
                    let vs = self.virtual_stage(chunk);
                    let batch = &batches[&mb];
                    let mut acts = if vs == 0 {
                        Acts::default()
                    } else {
                        let fields: Vec<ActField> = self
                            .boundary(vs - 1)
                            .into_iter()
                            .map(|(f, _, _)| f)
                            .collect();
                        let tensors = inbox
                            .remove(&(Payload::Act, mb, vs - 1))
                            .ok_or_else(|| {
                                WorkerError::Comm(format!(
                                    "no activations for micro-batch {mb} at stage {vs}"
                                ))
                            })?
                            .into_iter()
                            .map(|t| t.set_requires_grad(true))
                            .collect();
                        Acts::from_fields(&fields, tensors)?
                    };
                    let inputs = acts.present();
                    let mut tape = Tape::new(Some(self.comms.tp.clone()));
                    self.chunks[chunk].forward(&mut tape, &mut acts, batch, itm)?;
                    let (outputs, loss) = if vs == last_vs {
                        let l = self.chunks[chunk].losses(&mut tape, &mut acts, batch, w)?;
                        if self.coord.tp == 0 {
                            // Kept on the device: reading a value back per micro-batch
                            // would stall a GPU pipeline on every one.
                            let v = Tensor::f_stack(&[&l.total, &l.itc, &l.caption, &l.itm], 0)?
                                .f_detach()?
                                .f_to_kind(Kind::Double)?;
                            sums = sums.f_add(&v)?;
                        }
                        (Vec::new(), Some(l))
                    } else {
                        let out = acts.present();
                        let sent = out
                            .iter()
                            .map(|t| t.f_detach())
                            .collect::<Result<Vec<_>, _>>()?;
                        outbox.insert((Payload::Act, mb, vs), sent);
                        (out, None)
                    };
                    inflight.insert(
                        (mb, chunk),
                        InFlight {
                            inputs,
                            outputs,
                            tape,
                            loss,
                        },
                    );
                }
                Action::Backward { mb, chunk } => {
                    let vs = self.virtual_stage(chunk);
                    let mut f = inflight.remove(&(mb, chunk)).ok_or_else(|| {
                        WorkerError::Comm(format!(
                            "backward of micro-batch {mb} before its forward"
                        ))
                    })?;
                    let seeds: Vec<(Tensor, Tensor)> = match &f.loss {
                        Some(l) => {
                            let scale = Tensor::from(1.0 / k_total).f_to_device(self.device)?;
                            vec![(l.total.shallow_clone(), scale)]
                        }
                        None => {
                            let grads =
                                inbox.remove(&(Payload::Grad, mb, vs)).ok_or_else(|| {
                                    WorkerError::Comm(format!(
                                        "no gradients for micro-batch {mb} at stage {vs}"
                                    ))
                                })?;
                            f.outputs
                                .iter()
                                .map(|o| o.shallow_clone())
                                .zip(grads)
                                .collect()
                        }
                    };
                    f.tape.backward(seeds).map_err(tp_err)?;
                    if vs > 0 {
                        let grads = f
                            .inputs
                            .iter()
                            .map(|x| {
                                let g = x.grad();
                                if g.defined() {
                                    Ok(g)
                                } else {
                                    x.f_zeros_like()
                                }
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        outbox.insert((Payload::Grad, mb, vs - 1), grads);
                    }
                }
                Action::Comm(ref transfers) => {
                    self.communicate(transfers, &mut inbox, &mut outbox)?
                }
            }
            if computes {
                busy += t0.elapsed();
            }
        }
        self.last_schedule = (busy.as_secs_f64(), started.elapsed().as_secs_f64());
        Ok(sums)
    }

    /// Posts one batch of transfers on the pipeline group.
    fn communicate(
        &self,
        transfers: &[Transfer],
        inbox: &mut Mailbox,
        outbox: &mut Mailbox,
    ) -> Result<(), WorkerError> {
        let mut sends: Vec<(usize, Vec<Tensor>)> = Vec::new();
        type Pending = ((Payload, usize, usize), usize, Vec<Tensor>);
        let mut recvs: Vec<Pending> = Vec::new();
        for t in transfers {
            let key = (t.payload, t.mb, t.boundary);
            if t.send {
                let ts = outbox.remove(&key).ok_or_else(|| {
                    WorkerError::Comm(format!(
                        "nothing to send for {:?} of micro-batch {} at boundary {}",
                        t.payload, t.mb, t.boundary
                    ))
                })?;
                sends.push((t.peer, ts));
            } else {
                let bufs = self
                    .boundary(t.boundary)
                    .into_iter()
                    .map(|(_, shape, kind)| Tensor::f_empty(&shape, (kind, self.device)))
                    .collect::<Result<Vec<_>, _>>()?;
                recvs.push((key, t.peer, bufs));
            }
        }
        {
            let mut ops: Vec<P2POp<'_>> = Vec::new();
            // The schedule's order: transfers in batch order, tensors in field order.
            let mut s_iter = sends.iter();
            let mut r_iter = recvs.iter_mut();
            for t in transfers {
                if t.send {
                    let (peer, ts) = s_iter.next().expect("one entry per send");
                    for x in ts {
                        ops.push(P2POp::Send {
                            tensor: x,
                            peer: *peer,
                        });
                    }
                } else {
                    let (_, peer, bufs) = r_iter.next().expect("one entry per receive");
                    let peer = *peer;
                    for x in bufs.iter_mut() {
                        ops.push(P2POp::Recv { tensor: x, peer });
                    }
                }
            }
            self.comms.pp.batch_p2p(&mut ops).map_err(comm_err)?;
        }
        for (key, _, bufs) in recvs {
            inbox.insert(key, bufs);
        }
        debug!(n = transfers.len(), "pipeline transfers done");
        Ok(())
    }

    /// Gives every parameter a gradient tensor (zeros where autograd never reached it), so
    /// that every replica contributes the same bucket layout.
    fn ensure_grads(&mut self) -> Result<(), WorkerError> {
        for p in self.store.params() {
            if !p.tensor.grad().defined() {
                p.tensor
                    .f_sum(Kind::Float)?
                    .f_mul_scalar(0.0)?
                    .f_backward()?;
            }
        }
        Ok(())
    }

    /// Sums gradients over the data-parallel group, in buckets of `bucket_mib`.
    fn all_reduce_grads(&mut self) -> Result<(), WorkerError> {
        if self.plan.dims.dp == 1 {
            return Ok(());
        }
        let limit = (self.job.parallel.bucket_mib * 1024.0 * 1024.0) as usize;
        let grads: Vec<Tensor> = self
            .store
            .params()
            .iter()
            .map(|p| p.tensor.grad())
            .collect();
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < grads.len() && (end == start || bytes + grads[end].numel() * 4 <= limit) {
                bytes += grads[end].numel() * grads[end].kind().elt_size_in_bytes();
                end += 1;
            }
            let flat: Vec<Tensor> = grads[start..end]
                .iter()
                .map(|g| g.f_reshape([-1]))
                .collect::<Result<_, _>>()?;
            let mut bucket = Tensor::f_cat(&flat, 0)?;
            self.comms
                .dp
                .all_reduce(&mut bucket, ReduceOp::Sum)
                .map_err(comm_err)?;
            let mut off = 0i64;
            for g in &grads[start..end] {
                let n = g.numel() as i64;
                g.shallow_clone()
                    .f_copy_(&bucket.f_narrow(0, off, n)?.f_view_as(g)?)?;
                off += n;
            }
            start = end;
        }
        Ok(())
    }

    /// The norm of the whole model's gradient: sharded parameters count on every TP rank,
    /// replicated ones on TP rank 0 only; summed over the TP and PP groups.
    fn global_grad_norm(&self) -> Result<f64, WorkerError> {
        let mut sq = 0.0f64;
        for p in self.store.params() {
            if p.shard.world > 1 || self.coord.tp == 0 {
                let g = p.tensor.grad();
                sq += g
                    .f_to_kind(Kind::Float)?
                    .f_square()?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?;
            }
        }
        let mut t = Tensor::from_slice(&[sq]);
        if self.device != Device::Cpu {
            t = t.to_device(self.device);
        }
        self.comms
            .tp
            .all_reduce(&mut t, ReduceOp::Sum)
            .map_err(comm_err)?;
        self.comms
            .pp
            .all_reduce(&mut t, ReduceOp::Sum)
            .map_err(comm_err)?;
        Ok(t.f_double_value(&[0])?.sqrt())
    }

    /// Collects the whole model's parameters (global tensors, f32, CPU) on world rank 0;
    /// `None` elsewhere. Collective over the world.
    pub fn gather_params(&self) -> Result<Option<Vec<(String, Tensor)>>, WorkerError> {
        // Only the first data-parallel replica sends; replicated parameters only from TP
        // rank 0.
        let mine: Vec<&weaver_models::nn::Param> = self
            .store
            .params()
            .iter()
            .filter(|p| self.saves(p))
            .collect();
        let pieces: Vec<PieceHeader> = mine
            .iter()
            .map(|p| PieceHeader {
                name: p.name.clone(),
                global: p.global_shape.clone(),
                local: p.tensor.size(),
                dim: p.shard.dim,
                rank: p.shard.rank,
                world: p.shard.world,
            })
            .collect();
        let cpu_f32 = |t: &Tensor| -> Result<Tensor, WorkerError> {
            Ok(t.f_detach()?
                .f_to_kind(Kind::Float)?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?)
        };
        let world = self.world.size();
        if self.rank != 0 {
            let h =
                serde_json::to_string(&pieces).map_err(|e| WorkerError::Other(e.to_string()))?;
            let len = Tensor::from_slice(&[h.len() as i64]);
            self.world.send(&len, 0).map_err(comm_err)?;
            let bytes = Tensor::from_slice(h.as_bytes());
            self.world.send(&bytes, 0).map_err(comm_err)?;
            for p in &mine {
                self.world.send(&cpu_f32(&p.tensor)?, 0).map_err(comm_err)?;
            }
            return Ok(None);
        }
        let mut full: Vec<(String, Tensor)> = Vec::new();
        let mut place = |h: &PieceHeader, local: &Tensor| -> Result<(), WorkerError> {
            if h.world == 0 || h.dim >= h.global.len().max(1) || h.rank >= h.world {
                return Err(WorkerError::Comm(format!(
                    "bad parameter piece {} (dim {}, part {} of {}) in a gathered model",
                    h.name, h.dim, h.rank, h.world
                )));
            }
            let idx = match full.iter().position(|(n, _)| n == &h.name) {
                Some(i) => i,
                None => {
                    full.push((
                        h.name.clone(),
                        Tensor::f_zeros(h.global.as_slice(), (Kind::Float, Device::Cpu))?,
                    ));
                    full.len() - 1
                }
            };
            let dst = &full[idx].1;
            if h.world == 1 {
                dst.shallow_clone().f_copy_(local)?;
            } else {
                let len = h.global[h.dim] / h.world as i64;
                dst.f_narrow(h.dim as i64, h.rank as i64 * len, len)?
                    .f_copy_(local)?;
            }
            Ok(())
        };
        for (h, p) in pieces.iter().zip(&mine) {
            place(h, &cpu_f32(&p.tensor)?)?;
        }
        for r in 1..world {
            let mut len = Tensor::from_slice(&[0i64]);
            self.world.recv(&mut len, r).map_err(comm_err)?;
            let n = len.f_int64_value(&[0])?;
            let mut bytes = Tensor::f_zeros([n], (Kind::Uint8, Device::Cpu))?;
            self.world.recv(&mut bytes, r).map_err(comm_err)?;
            let raw: Vec<u8> = Vec::<u8>::try_from(&bytes)?;
            let entries: Vec<PieceHeader> = serde_json::from_slice(&raw).map_err(|e| {
                WorkerError::Comm(format!("bad parameter header from rank {r}: {e}"))
            })?;
            for h in entries {
                let mut t = Tensor::f_zeros(h.local.as_slice(), (Kind::Float, Device::Cpu))?;
                self.world.recv(&mut t, r).map_err(comm_err)?;
                place(&h, &t)?;
            }
        }
        Ok(Some(full))
    }

    /// Gathers the model on rank 0 and evaluates it there; the other ranks wait.
    pub fn evaluate(&self) -> Result<Option<EvalMetrics>, WorkerError> {
        let _span = info_span!("eval", step = self.step).entered();
        if self.job.data.source == DataSource::Shards {
            // Held-out shards (data.eval_shards) are evaluated by a later change; the
            // synthetic pool says nothing about a model trained on real data.
            info!("data.source = \"shards\": no evaluation (evaluation on data.eval_shards is not built yet)");
            return Ok(None);
        }
        let steady = self.world.timeout();
        self.world
            .set_timeout(Duration::from_secs(self.job.parallel.init_timeout_s));
        let gathered = self.gather_params()?;
        let result = match gathered {
            Some(named) => Some(evaluate_weights(&self.job, &named, self.device, self.step)?),
            None => None,
        };
        self.world.barrier().map_err(comm_err)?;
        self.world.set_timeout(steady);
        Ok(result)
    }

    /// Trains until `train.steps` (or a stop request); rank 0 reports metrics, evaluates and
    /// saves the final weights; every rank checkpoints when `[checkpoint] url` is set (every
    /// `every` steps, on request, on stop, and at the end).
    pub fn run(&mut self) -> Result<Summary, WorkerError> {
        let started = Instant::now();
        let total = self.job.train.steps;
        let log_every = (total / 20).max(1);
        let mut last_loss = f64::NAN;
        let bar = if self.progress {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} steps  {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_position(self.step);
        let every = self.job.checkpoint.every;
        let mut saved_at = None;
        let mut preempted = false;
        while self.step < total {
            let m = self.train_step()?;
            last_loss = m.loss;
            bar.set_position(m.step);
            bar.set_message(format!("loss {:.4}  {:.0} tok/s", m.loss, m.tokens_per_s));
            if let Some(w) = &mut self.metrics {
                if m.step % self.job.train.log_every == 0 || m.step == total {
                    w.step(&m)?;
                }
            }
            if self.rank == 0 && (m.step % log_every == 0 || m.step == 1) {
                info!(
                    step = m.step,
                    loss = format!("{:.4}", m.loss),
                    grad_norm = format!("{:.3}", m.grad_norm),
                    tokens_per_s = format!("{:.0}", m.tokens_per_s),
                    step_s = format!("{:.3}", m.step_time_s),
                    "train"
                );
            }
            if let Some(saver) = &mut self.saver {
                saver.poll()?;
            }
            let (save_now, stop_now) = self.agreed;
            // A stop at the last step is moot: the run ends normally.
            let stop_now = stop_now && m.step < total;
            if stop_now {
                // Before the checkpoint: its shard reports say it is the one stopped at.
                self.control.stopped_at.store(m.step, Ordering::SeqCst);
            }
            if self.saver.is_some() && (save_now || stop_now || (every > 0 && m.step % every == 0))
            {
                self.save_checkpoint()?;
                saved_at = Some(m.step);
            }
            if stop_now {
                info!(step = m.step, "stop requested: leaving the step loop");
                preempted = true;
                break;
            }
            let eval_every = self.job.train.eval_every;
            if eval_every > 0 && m.step % eval_every == 0 && m.step != total {
                if let Some(e) = self.evaluate()? {
                    self.write_eval(&e)?;
                }
            }
        }
        bar.finish_and_clear();
        if self.saver.is_some() && saved_at != Some(self.step) {
            self.save_checkpoint()?;
        }
        if let Some(saver) = &mut self.saver {
            saver.finish()?;
        }
        let eval = if preempted {
            None
        } else {
            let e = self.evaluate()?;
            if let Some(e) = &e {
                self.write_eval(e)?;
            }
            self.save_final_weights()?;
            e
        };
        let wall_s = started.elapsed().as_secs_f64();
        if let Some(w) = &mut self.metrics {
            w.done(&serde_json::json!({
                "done": true,
                "step": self.step,
                "final_loss": last_loss,
                "wall_s": wall_s,
                "world_size": self.world.size(),
                "preempted": preempted,
            }))?;
        }
        Ok(Summary {
            steps: self.step,
            final_loss: last_loss,
            eval,
            wall_s,
            preempted,
        })
    }

    /// The handle through which signal handlers and coordinator events reach this rank.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }

    /// Turns checkpoints on (to `[checkpoint] url`), reporting durable shards to `sink`.
    pub fn enable_checkpoints(&mut self, sink: Arc<dyn ShardSink>) -> Result<(), WorkerError> {
        let url = self.job.checkpoint.url.clone();
        if url.is_empty() {
            return Err(WorkerError::Checkpoint(
                "checkpoints need [checkpoint] url".into(),
            ));
        }
        self.saver = Some(Saver::new(&url, self.rank, sink)?);
        Ok(())
    }

    /// Waits until this rank's checkpoint in flight is durable and reported.
    pub fn finish_checkpoints(&mut self) -> Result<(), WorkerError> {
        if let Some(saver) = &mut self.saver {
            saver.finish()?;
        }
        Ok(())
    }

    /// The checkpoint layout of this job (what a committer records in the manifest).
    pub fn checkpoint_layout(&self) -> weaver_checkpoint::Layout {
        checkpoint_layout(&self.job, &self.plan)
    }

    /// Whether this rank stores parameter `p` (each element is stored once: data-parallel
    /// rank 0 only, replicated parameters from TP rank 0 only).
    fn saves(&self, p: &weaver_models::nn::Param) -> bool {
        self.coord.dp == 0 && (p.shard.world > 1 || self.coord.tp == 0)
    }

    /// Starts this rank's shard of a checkpoint of the current step; returns once it is
    /// copied to host memory (the upload goes on in the background). Every rank calls it
    /// at the same step.
    pub fn save_checkpoint(&mut self) -> Result<(), WorkerError> {
        let started = Instant::now();
        let Some(saver) = &self.saver else {
            return Err(WorkerError::Checkpoint(
                "checkpoints are not enabled on this rank".into(),
            ));
        };
        let mut tensors = Vec::new();
        for (p, st) in self.store.params().iter().zip(&self.opt.states) {
            if !self.saves(p) {
                continue;
            }
            let value = st.master.as_ref().unwrap_or(&p.tensor).f_detach()?;
            tensors.push(saver.piece(p.name.clone(), &value, p)?);
            tensors.push(saver.piece(exp_avg_name(&p.name), &st.exp_avg, p)?);
            tensors.push(saver.piece(exp_avg_sq_name(&p.name), &st.exp_avg_sq, p)?);
        }
        // The data position: its own pieces, written by the rank of each replica that owns
        // them (the synthetic sampler's also stays in train.state for older readers).
        let position: Vec<Piece> = self.source.position();
        let sampler = position
            .iter()
            .find(|(n, _)| n == weaver_data::source::SAMPLER_PIECE)
            .map(|(_, v)| (v[1], v[2]))
            .unwrap_or((0, 0));
        for (name, values) in &position {
            tensors.push(weaver_checkpoint::SavedTensor::from_i64s(
                name.clone(),
                values,
            ));
        }
        if self.rank == 0 {
            tensors.push(weaver_checkpoint::SavedTensor::from_i64s(
                STATE,
                &[self.step as i64, sampler.0, sampler.1, self.opt.step as i64],
            ));
            tensors.push(weaver_checkpoint::SavedTensor::from_bytes(
                CONFIG,
                self.job.to_toml().as_bytes(),
            ));
        }
        let n = tensors.len();
        let step = self.step;
        if let Some(saver) = &mut self.saver {
            saver.start(step, tensors)?;
        }
        info!(
            step,
            tensors = n,
            stall_s = format!("{:.3}", started.elapsed().as_secs_f64()),
            "checkpoint started"
        );
        Ok(())
    }

    /// Loads the checkpoint `ckpt` (of any layout) into this rank: its part of every
    /// parameter and moment, the step, the sampler's position. Collective: every rank
    /// loads, and all settle on the same step (a rank that finds corrupt data falls back to
    /// an older checkpoint, and the others follow).
    pub fn resume(&mut self, ckpt: Checkpoint) -> Result<u64, WorkerError> {
        let steady = self.world.timeout();
        self.world
            .set_timeout(Duration::from_secs(self.job.parallel.init_timeout_s));
        let store = ckpt.store().clone();
        let mut ckpt = ckpt;
        loop {
            let (loaded, tensors) = read_with_fallback(ckpt, &self.resume_requests(), true)?;
            // Agree on the step: every rank must hold the same checkpoint.
            let mut s = Tensor::from_slice(&[loaded.step() as i64]);
            if self.device != Device::Cpu {
                s = s.to_device(self.device);
            }
            self.world
                .all_reduce(&mut s, ReduceOp::Min)
                .map_err(comm_err)?;
            let agreed = s.f_int64_value(&[0])? as u64;
            if agreed == loaded.step() {
                self.apply_resume(&loaded, tensors)?;
                break;
            }
            warn!(
                mine = loaded.step(),
                agreed, "another rank fell back to an older checkpoint; following it"
            );
            ckpt = weaver_checkpoint::block_on(Checkpoint::open(&store, Selector::Step(agreed)))?;
        }
        self.world.set_timeout(steady);
        info!(step = self.step, rank = self.rank, "resumed");
        Ok(self.step)
    }

    fn resume_requests(&self) -> Vec<SliceRequest> {
        let mut out = Vec::new();
        for p in self.store.params() {
            let r = param_ranges(p);
            out.push(SliceRequest::new(p.name.clone(), r.clone()));
            out.push(SliceRequest::new(exp_avg_name(&p.name), r.clone()));
            out.push(SliceRequest::new(exp_avg_sq_name(&p.name), r));
        }
        out
    }

    fn apply_resume(&mut self, ckpt: &Checkpoint, tensors: Vec<Tensor>) -> Result<(), WorkerError> {
        let state = weaver_checkpoint::block_on(ckpt.read_i64s(STATE))?;
        if state.len() != 4 {
            return Err(WorkerError::Checkpoint(format!(
                "{}: {STATE} holds {} values, expected 4",
                ckpt.url(),
                state.len()
            )));
        }
        let mut it = tensors.into_iter();
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (p, st) in self.store.params().iter().zip(self.opt.states.iter_mut()) {
                let (Some(value), Some(m), Some(v)) = (it.next(), it.next(), it.next()) else {
                    return Err(WorkerError::Checkpoint(
                        "fewer tensors than requested".into(),
                    ));
                };
                p.tensor.shallow_clone().f_copy_(&to_param(
                    &value,
                    p.tensor.kind(),
                    self.device,
                )?)?;
                if let Some(master) = &mut st.master {
                    master.f_copy_(&to_param(&value, Kind::Float, self.device)?)?;
                }
                st.exp_avg
                    .f_copy_(&to_param(&m, Kind::Float, self.device)?)?;
                st.exp_avg_sq
                    .f_copy_(&to_param(&v, Kind::Float, self.device)?)?;
            }
            Ok(())
        })?;
        self.step = state[0] as u64;
        self.opt.step = state[3] as u64;
        // The data continues where the checkpoint's position pieces say (any dp: each rank
        // reads the pieces of the streams it owns now). Old checkpoints carry the synthetic
        // sampler's position in train.state only.
        let fallback = SamplerState {
            epoch: state[1] as u64,
            position: state[2] as u64,
        };
        let mut read = |name: &str| -> weaver_data::Result<Option<Vec<i64>>> {
            if !ckpt.manifest().tensors.contains_key(name) {
                return Ok(None);
            }
            weaver_checkpoint::block_on(ckpt.read_i64s(name))
                .map(Some)
                .map_err(|e| weaver_data::DataError::BadPosition {
                    piece: name.to_string(),
                    message: e.to_string(),
                })
        };
        // The old source stops before the new one starts reading.
        self.source = Box::new(weaver_data::source::Stopped);
        self.source = crate::data::start_source(
            &self.job,
            &self.data,
            self.plan.dims.dp,
            self.coord.dp,
            writes_data_position(self.coord),
            self.device,
            self.local_procs,
            Some(&mut read),
            fallback,
        )?;
        Ok(())
    }

    /// Gathers the whole model and writes it to `<run dir>/model.safetensors` (rank 0).
    pub fn save_final_weights(&self) -> Result<(), WorkerError> {
        let steady = self.world.timeout();
        self.world
            .set_timeout(Duration::from_secs(self.job.parallel.init_timeout_s));
        if let Some(named) = self.gather_params()? {
            let path = self.run_dir.join("model.safetensors");
            Tensor::write_safetensors(&named, &path).map_err(WorkerError::from)?;
        }
        self.world.set_timeout(steady);
        Ok(())
    }

    fn write_eval(&mut self, e: &EvalMetrics) -> Result<(), WorkerError> {
        info!(
            step = e.step,
            i2t_r1 = e.i2t_r1,
            t2i_r1 = e.t2i_r1,
            caption_exact = e.caption_exact,
            "eval"
        );
        if let Some(w) = &mut self.metrics {
            w.eval(e)?;
        }
        Ok(())
    }
}

/// Whether the rank at `coord` writes its replica's data position and counts its data:
/// pipeline stage 0, tensor rank 0 (every rank of a replica reads the same data).
fn writes_data_position(coord: Coord) -> bool {
    coord.pp == 0 && coord.tp == 0
}

/// The checkpoint layout record of a job: its mesh and how it was cut.
pub fn checkpoint_layout(job: &JobConfig, plan: &Plan) -> weaver_checkpoint::Layout {
    let mut l = weaver_checkpoint::Layout::new(plan.dims.dp, plan.dims.pp, plan.dims.tp);
    l.extra = serde_json::json!({
        "schedule": format!("{:?}", plan.kind),
        "virtual_stages": plan.chunks,
        "stages": plan.stages.iter().map(|r| [r.start, r.end]).collect::<Vec<_>>(),
        "microbatches": job.parallel.microbatches,
        "global_batch": job.train.global_batch,
        "flavor": job.model.flavor,
    });
    l
}
