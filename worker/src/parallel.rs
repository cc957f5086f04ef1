//! One rank of a 3-D parallel job, composed of parts with narrow interfaces (the way
//! torchtitan keeps its train loop, `parallelize`, checkpointing and metrics apart):
//!
//! - [`ScheduleExecutor`] runs the rank's pipeline actions over its model chunks (training,
//!   or forwards only);
//! - [`GradSync`] owns the f32 gradient buckets and their data-parallel reduction, started
//!   while the backward runs when `parallel.overlap` is on;
//! - [`FlatAdamW`] updates parameters, master weights and moments laid out in the same
//!   buckets, with ATen's fused AdamW; the global gradient norm and the clip stay on the
//!   device;
//! - a [`BatchSource`] (weaver-data's: synthetic data or WebDataset shards, prepared ahead
//!   on background threads, see [`crate::data`]) hands out the rank's micro-batches of each
//!   step;
//! - [`CheckpointDriver`] saves and loads the rank's shard;
//! - [`Control`] carries outside requests, agreed by all ranks at logged steps;
//! - this module's [`ParallelTrainer`] builds them (the order of parallelisms below) and runs
//!   the loop: steps, metrics, progress, requests, evaluation, checkpoints.
//!
//! The order of parallelisms, applied once when the rank is built (torchtitan's
//! `parallelize`): the pipeline plan cuts the layers into virtual stages (balanced by
//! FLOPs); each stage is built, layer by layer, with this rank's tensor-parallel part of
//! every layer; the gradient buckets are laid out over the stage's parameters in reverse
//! layer order, and the parameters move into flat buffers of the same layout; the
//! data-parallel replicas start from identical values (initial values are a function of the
//! parameter's name) and stay identical because they apply identical, all-reduced gradients.
//!
//! One step: every rank draws the same global batch; data-parallel rank `d` takes
//! micro-batches `d·M .. (d+1)·M` of the `dp·M` the batch is cut into — the same
//! micro-batches a single process would accumulate, so the layouts compute one function.
//! The pipeline schedule runs the micro-batches; gradients are all-reduced over the
//! data-parallel group in buckets; the global gradient norm sums sharded parameters on every
//! TP rank and replicated ones once; AdamW updates identically everywhere. Nothing is read
//! back to the host except at logged steps (`train.log_every`): the losses, the norm and the
//! ranks' control requests, in one collective and one read.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tracing::{info, info_span};
use weaver_checkpoint::Checkpoint;
use weaver_data::loader::DataStats;
use weaver_data::source::{BatchSource, Stopped};
use weaver_models::config::{Backend, Contrastive, DataSource, Schedule as ScheduleName};
use weaver_models::data::{Batch, Dataset, SamplerState, Split};
use weaver_models::device::compute_kind;
use weaver_models::model::LossWeights;
use weaver_models::nn::ParamStore;
use weaver_models::objectives::Objectives;
use weaver_models::{JobConfig, Model};
use weaver_parallel::comm::{mesh_groups, Communicator, MeshComms, P2POp, ReduceOp, SoloComm};
use weaver_parallel::mesh::{Coord, ParallelDims};
use weaver_parallel::pp::{Schedule, ScheduleKind};
use weaver_parallel::tp::TpPos;

use crate::buckets::ParamInfo;
use crate::ckpt::{CheckpointDriver, ShardSink, TrainingState};
use crate::contrastive::GlobalContrast;
use crate::control::Agreed;
pub use crate::control::Control;
use crate::error::WorkerError;
use crate::eval::Evaluator;
use crate::finetune::Finetune;
use crate::grads::GradSync;
use crate::memory::MemoryMeter;
use crate::metrics::{DataCounts, EvalMetrics, MetricsSink, MetricsWriter, StepMetrics};
use crate::optim::{clip_scale, lr_at, AdamWConfig, FlatAdamW};
use crate::schedule::{Chunk, ExecutorConfig, ScheduleExecutor};
use crate::sync;
use crate::train::{dataset, StepLosses, Summary};

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

/// Opens the pipeline group's links to both neighbours (and around the ring, which the
/// interleaved schedule uses) before the schedule runs. The tcp backend connects a link on
/// its first use and a receive waits for the peer's connection, so a batch whose receive
/// comes from a peer that has not yet sent anything could wait on that peer while the peer
/// waits for our send; one exchange in each direction, sends listed first, connects every
/// link without such a wait.
pub(crate) fn connect_pipeline(
    pp: &dyn Communicator,
) -> Result<(), weaver_parallel::comm::CommError> {
    let n = pp.size();
    if n < 2 {
        return Ok(());
    }
    let r = pp.rank();
    let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
    for (to, from) in [(next, prev), (prev, next)] {
        let out = Tensor::from_slice(&[r as i64]).f_to_device(pp.device())?;
        let mut inp = Tensor::from_slice(&[0i64]).f_to_device(pp.device())?;
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
    /// Where rank 0 writes `metrics.jsonl` and `config.toml` (unless `metrics` is given).
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
    // One process has no TP group to split sequences over.
    p.sequence_parallel = false;
    p.schedule = ScheduleName::OneFOneB;
    p.virtual_stages = 1;
    job.file.parallel = job.parallel.clone();
    // One process holds the whole teacher.
    job.distill.teacher_tp = 0;
    job.file.distill.teacher_tp = 0;
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

/// One rank of a parallel job (see the module docs for its parts).
#[derive(Debug)]
pub struct ParallelTrainer {
    job: JobConfig,
    plan: Plan,
    coord: Coord,
    rank: usize,
    world: Arc<dyn Communicator>,
    comms: MeshComms,
    store: ParamStore,
    executor: ScheduleExecutor,
    grads: GradSync,
    optimizer: FlatAdamW,
    /// Which parameters train, at what lr multiple (`train.freeze`, `lr_mult`, LoRA).
    finetune: Finetune,
    /// This rank's micro-batches, prepared ahead (see [`crate::data`]).
    source: Box<dyn BatchSource>,
    /// The dataset (the synthetic source renders it; a resume restarts the source).
    data: Dataset,
    /// The MLM and VQA rows each micro-batch gets.
    objectives: Objectives,
    /// The padding id when each micro-batch's text is trimmed after its last token
    /// ([`crate::data::trims_text`]).
    trim_text: Option<i64>,
    local_procs: usize,
    /// The data counters of the last step's input (cumulative; reported at logged steps).
    data_stats: DataStats,
    /// `<run dir>/data-keys-rankR.jsonl` when `data.log_keys` is on.
    keys_log: Option<std::io::BufWriter<std::fs::File>>,
    run_dir: PathBuf,
    evaluator: Evaluator,
    /// Whether there is a held-out pool to evaluate on (synthetic data, or
    /// `data.eval_shards`).
    evaluates: bool,
    checkpoints: CheckpointDriver,
    control: Arc<Control>,
    agreed: Agreed,
    metrics: Option<Box<dyn MetricsSink>>,
    progress: bool,
    device: Device,
    /// Steps completed.
    step: u64,
    /// Whether a step completed in this process (the tight timeout applies after it).
    warmed_up: bool,
    /// When the last reported step ended, and its number: step times are averaged over the
    /// steps between two reports (the report's host read is the only point where the
    /// device's queue is known to be drained).
    last_report: Option<(Instant, u64)>,
    /// This rank's peak memory per step (see [`crate::memory`]).
    memory: MemoryMeter,
    /// The last step's peak, in bytes (none: not measurable here).
    step_peak: Option<u64>,
    /// `train.prune_mask`: the pruned entries re-zeroed after every optimizer step.
    prune_mask: Option<crate::prune_mask::PruneMask>,
}

impl ParallelTrainer {
    /// Builds this rank: groups, model chunks, gradient buckets, optimizer. Collective:
    /// every rank of `world` calls it.
    pub fn new(job: JobConfig, setup: RankSetup) -> Result<ParallelTrainer, WorkerError> {
        let world = setup.world;
        let rank = world.rank();
        let plan = Plan::new(&job, world.size())?;
        let coord = plan.dims.coord(rank);
        crate::train::configure_threads(job.train.threads, setup.local_procs);
        let device = weaver_models::device::parse_device(&job.train.device)?;
        weaver_models::device::check_device(device)?;
        // Before the rank's first tensor: the CPU counter sees only what is allocated after.
        let memory = MemoryMeter::new(device);
        // Every tensor this rank hands to a communicator lives on the compute device, which
        // must therefore be the communicators' (tcp stages CUDA tensors through host memory;
        // nccl runs on its GPU).
        if world.size() > 1 && world.device() != device {
            return Err(WorkerError::Layout(format!(
                "train.device = {:?} but the {} communicator works on {:?}; give the worker that device (weaver worker --device) or set train.device to it",
                job.train.device,
                world.backend(),
                world.device()
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
        store.set_lora(weaver_models::lora::LoraSpec::of(&job.train));
        let tp = TpPos {
            rank: coord.tp,
            size: plan.dims.tp,
        };
        let p = plan.dims.pp;
        // Distillation: the frozen teacher (split over `distill.teacher_tp` ranks, or
        // whole), on the ranks of the last stage (where the student's losses are computed;
        // see `crate::distill`), loaded before the student's layers so that its feature
        // projection can join the last layer's parameters. Its groups are split from the
        // world on every rank.
        let last_vs = plan.stages.len() - 1;
        let holds_last = executor_holds(&plan, coord, last_vs);
        let groups = if job.distill.enabled() {
            teacher_groups(world.as_ref(), &job, &plan, coord, holds_last, &comms)?
        } else {
            None
        };
        let mut teacher = match groups {
            Some(g) => Some(crate::distill::Teacher::load(&job, device, g)?),
            None => None,
        };
        let n_layers = Model::num_layers(&job.model);
        // Each layer is a model of its own, so that the stage can be cut (and its gradients
        // reported) layer by layer; the parameters each layer creates belong to it.
        let mut chunks = Vec::with_capacity(plan.chunks);
        let mut layer_of = Vec::new();
        for c in 0..plan.chunks {
            let vs = c * p + coord.pp;
            let mut layers = Vec::new();
            for i in plan.stages[vs].clone() {
                let mut model = Model::new(
                    &mut store,
                    &job.model,
                    i..i + 1,
                    tp,
                    data.tokenizer.pad_id(),
                )?;
                if let (Some(t), true) = (&teacher, i + 1 == n_layers) {
                    t.add_projection(&mut store, &job.model)?;
                    model.keep_caption_logits();
                }
                layer_of.resize(store.params().len(), i);
                layers.push((i, model));
            }
            chunks.push(Chunk { vs, layers });
        }
        // Fine-tuning: frozen parameters stop requiring grad before anything is built over
        // the parameters (buckets, optimizer); every rank checks the keys with the others.
        let finetune = Finetune::new(&job, &store, plan.dims.tp);
        finetune.check_over(&job, world.as_ref())?;
        finetune.freeze(&store);
        let info: Vec<ParamInfo> = store
            .params()
            .iter()
            .zip(&layer_of)
            .enumerate()
            .map(|(i, (p, &layer))| ParamInfo {
                layer,
                numel: p.tensor.numel() as i64,
                sharded: p.shard.world > 1,
                decay: p.decay,
                lr_group: finetune.lr_group[i],
                frozen: finetune.frozen[i],
            })
            .collect();
        let overlap = job.parallel.overlap && plan.dims.dp > 1;
        let bucket_bytes = (job.parallel.bucket_mib * 1024.0 * 1024.0) as usize;
        let adamw = AdamWConfig {
            beta1: job.train.beta1,
            beta2: job.train.beta2,
            eps: job.train.eps,
            weight_decay: job.train.weight_decay,
        };
        let passes = job.parallel.microbatches;
        // The distributed optimizer (ZeRO-1): gradients reduce-scattered, each replica
        // updating its shard of every bucket, parameters all-gathered.
        let shard_optimizer = job.parallel.shard_optimizer;
        let (grads, mut optimizer) = if shard_optimizer {
            let dp = comms.dp.clone();
            let g =
                GradSync::new_sharded(&store, &info, dp.clone(), bucket_bytes, overlap, passes)?;
            let o = FlatAdamW::new_sharded(adamw, &store, g.layout(), dp)?;
            (g, o)
        } else {
            let g = GradSync::new(
                &store,
                &info,
                comms.dp.clone(),
                bucket_bytes,
                overlap,
                passes,
            )?;
            let o = FlatAdamW::new(adamw, &store, g.layout())?;
            (g, o)
        };
        // Sequence parallelism: the replicated parameters applied to sequence shards have
        // their gradients summed over the TP group.
        let sequence_parallel = job.parallel.sequence_parallel && plan.dims.tp > 1;
        let grads = if sequence_parallel {
            let split: std::collections::HashSet<usize> = chunks
                .iter()
                .flat_map(|c| c.layers.iter())
                .flat_map(|(_, m)| m.sequence_region_params())
                .map(|t| t.data_ptr() as usize)
                .collect();
            let flagged: Vec<(usize, usize)> = store
                .params()
                .iter()
                .enumerate()
                .filter(|(_, p)| split.contains(&(p.tensor.data_ptr() as usize)))
                .map(|(i, _)| (i, layer_of[i]))
                .collect();
            grads.with_tp_sum(comms.tp.clone(), &flagged)?
        } else {
            grads
        };
        optimizer.set_lr_mults(finetune.mults.clone())?;
        let schedule = Schedule::new(plan.kind, p, job.parallel.microbatches, plan.chunks)
            .map_err(|e| WorkerError::Layout(e.to_string()))?;
        let executor = ScheduleExecutor::new(
            ExecutorConfig {
                model: job.model.clone(),
                stages: plan.stages.clone(),
                pp_rank: coord.pp,
                pp_size: p,
                weights: LossWeights {
                    itc: job.train.itc_weight,
                    caption: job.train.caption_weight,
                    itm: job.train.itm_weight,
                    mlm: job.train.mlm_weight,
                    vqa: job.train.vqa_weight,
                },
                kind,
                device,
                cut_layers: overlap,
                recompute: job.parallel.recompute,
                sequence_parallel,
            },
            chunks,
            schedule,
            comms.pp.clone(),
            comms.tp.clone(),
        );
        let mut executor = executor;
        // Global contrastive negatives need the data-parallel group and the cache only when a
        // step has more than one micro-batch in all; with one, the micro-batch is the batch.
        if job.train.contrastive == Contrastive::Global
            && job.train.itc_weight > 0.0
            && plan.dims.dp * job.parallel.microbatches > 1
        {
            executor.set_contrastive(Some(GlobalContrast::new(
                comms.dp.clone(),
                job.parallel.microbatches,
                job.train.contrastive_local_loss,
            )));
        }
        if let Some(t) = &mut teacher {
            t.bind_projection(&store)?;
        }
        executor.set_teacher(teacher);
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
        let eval_pool = crate::eval::EvalPool::for_job(&job, &data, setup.local_procs)?;
        let mut evaluator = Evaluator::new(
            data.clone(),
            job.eval.pool,
            job.micro_batch_size(),
            job.model.embed_dim,
            job.model.multimodal_layers > 0,
            device,
            comms.clone(),
            plan.dims,
            coord,
        )
        .with_vqa(job.train.vqa_weight > 0.0)
        // Captions decode with the key/value cache on the layout where each pipeline rank
        // holds one chunk (the stage as one model, as `weaver infer` decodes).
        .with_stage_captioning(
            (plan.chunks == 1 && job.model.multimodal_layers > 0).then(|| {
                crate::eval::StageCaptioning::new(
                    job.model.clone(),
                    weaver_models::lora::LoraSpec::of(&job.train),
                    plan.stages.clone(),
                    tp,
                    data.tokenizer.pad_id(),
                    kind,
                )
            }),
        );
        if let Some(p) = eval_pool.clone() {
            evaluator.set_pool(p);
        }
        // `[model] init_from`: the initial parameters (and their f32 values) from a checkpoint.
        crate::init::load_init_from(&job.model, &store, crate::init::Values::Flat(&optimizer))?;
        // `train.prune_mask`: the zero pattern of the weights just loaded stays.
        let prune_mask = if job.train.prune_mask {
            Some(crate::prune_mask::PruneMask::from_store(&store)?)
        } else {
            None
        };
        let checkpoints = if shard_optimizer {
            CheckpointDriver::new_sharded(rank, coord.dp, coord.tp, &store)
        } else {
            CheckpointDriver::new(rank, coord.dp, coord.tp, &store)
        };
        let metrics: Option<Box<dyn MetricsSink>> = if setup.metrics.is_some() {
            setup.metrics
        } else if rank == 0 {
            std::fs::create_dir_all(&setup.run_dir)
                .map_err(|e| WorkerError::io(&setup.run_dir, e))?;
            let cfg = setup.run_dir.join("config.toml");
            std::fs::write(&cfg, job.to_toml()).map_err(|e| WorkerError::io(&cfg, e))?;
            Some(Box::new(MetricsWriter::for_job(&setup.run_dir, &job)?))
        } else {
            None
        };
        info!(
            rank,
            coord = %coord,
            layers = ?(0..plan.chunks).map(|c| plan.stages[c * p + coord.pp].clone()).collect::<Vec<_>>(),
            params = store.numel(),
            buckets = grads.layout().len(),
            overlap,
            shard_optimizer,
            optimizer_state_bytes = optimizer.state_bytes(),
            ?device,
            "rank built"
        );
        let objectives = crate::train::objectives(&job, &data)?;
        let trim_text = crate::data::trims_text(&job, device).then(|| data.tokenizer.pad_id());
        Ok(ParallelTrainer {
            job,
            plan,
            coord,
            rank,
            world,
            comms,
            store,
            executor,
            grads,
            optimizer,
            finetune,
            source,
            objectives,
            trim_text,
            data,
            local_procs: setup.local_procs,
            data_stats: DataStats::default(),
            keys_log,
            run_dir: setup.run_dir,
            evaluator,
            evaluates: eval_pool.is_some(),
            checkpoints,
            control: Arc::new(Control::default()),
            agreed: Agreed::default(),
            metrics,
            progress: setup.progress && rank == 0,
            device,
            step: 0,
            warmed_up: false,
            last_report: None,
            memory,
            step_peak: None,
            prune_mask,
        })
    }

    /// The world rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The job (its layout as this rank runs it).
    pub fn job(&self) -> &JobConfig {
        &self.job
    }

    /// The layout.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// This rank's coordinates.
    pub fn coord(&self) -> Coord {
        self.coord
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// This rank's parameters (its stages, its TP part), views of the optimizer's flat
    /// buffers.
    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// The optimizer (its state, read-only).
    pub fn optimizer(&self) -> &FlatAdamW {
        &self.optimizer
    }

    /// The distillation teacher, on ranks of the last pipeline stage of a job with
    /// `[distill]`.
    pub fn teacher(&self) -> Option<&crate::distill::Teacher> {
        self.executor.teacher()
    }

    /// The gradient buckets (their layout, read-only).
    pub fn grads(&self) -> &GradSync {
        &self.grads
    }

    /// Replaces where this rank's micro-batches come from (benchmarks feed a fixed batch).
    pub fn set_source(&mut self, source: Box<dyn BatchSource>) {
        self.source = source;
    }

    /// Seconds the last step's pipeline schedule spent computing (forwards, backwards,
    /// losses) and in all (computing plus waiting for transfers): the measured bubble is
    /// `1 − busy / total`.
    pub fn last_schedule_times(&self) -> (f64, f64) {
        self.executor.last_times()
    }

    /// Seconds the last step's data-parallel gradient reduction kept the host waiting after
    /// the backward (what overlap did not hide).
    pub fn last_sync_wait(&self) -> f64 {
        self.grads.last_wait().as_secs_f64()
    }

    /// One optimizer step over the whole job, reported: every rank returns the same metrics
    /// (the losses, the norm and the ranks' requests are read back and agreed).
    pub fn train_step(&mut self) -> Result<StepMetrics, WorkerError> {
        self.step_once(true)?
            .ok_or_else(|| WorkerError::Other("a reported step gave no metrics".into()))
    }

    /// One optimizer step; with `report`, also the readback and agreement of
    /// [`ParallelTrainer::train_step`] (every rank must pass the same `report`). Without
    /// it, nothing is read back to the host.
    pub fn step_once(&mut self, report: bool) -> Result<Option<StepMetrics>, WorkerError> {
        let _span = info_span!("step", step = self.step + 1, rank = self.rank).entered();
        if self.last_report.is_none() {
            // The first step since the start (or a resume): step times count from here.
            self.last_report = Some((Instant::now(), self.step));
        }
        self.memory.begin_step();
        let t = self.job.train.clone();
        let lr = lr_at(self.step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        // This rank's micro-batches `d·M .. (d+1)·M` of the global batch, prepared ahead.
        let input = self.source.next_step()?;
        self.log_keys(self.step + 1, &input.keys)?;
        self.data_stats = input.stats;
        let mut batches = input.micro;
        if self.objectives.any() {
            self.attach_objectives(&mut batches, &input.keys)?;
        }
        if let Some(pad) = self.trim_text {
            batches = batches
                .iter()
                .map(|b| b.trim_text(pad))
                .collect::<Result<_, _>>()?;
        }
        let k_total = (self.plan.dims.dp * self.job.parallel.microbatches) as f64;
        self.grads.zero()?;
        let loss_sums = self
            .executor
            .train(&batches, 1.0 / k_total, &mut self.grads)?;
        self.grads.finish()?;
        self.finetune
            .sum_partial_grads(&self.store, self.comms.tp.as_ref())?;
        let norm = self.global_grad_norm()?;
        let scale = clip_scale(&norm, t.grad_clip)?;
        self.optimizer.step(&self.grads, lr, scale.as_ref())?;
        // The distributed optimizer's parameter all-gathers ran while the later buckets
        // were updated; every rank holds the whole parameters after this.
        self.optimizer.finish_gathers()?;
        if let Some(m) = &self.prune_mask {
            m.apply(&self.store, &self.optimizer)?;
        }
        self.step_peak = self.memory.peak();
        self.step += 1;
        if !self.warmed_up {
            // The first step (connections, allocation) is done: from now on a silent peer
            // is a lost peer within the tight timeout.
            self.warmed_up = true;
            self.world
                .set_timeout(Duration::from_secs(self.job.parallel.timeout_s));
        }
        if !report {
            return Ok(None);
        }
        self.report(&loss_sums, &norm, lr).map(Some)
    }

    /// The readback of a reported step: every rank's loss sums, the norm and its control
    /// wishes, all-gathered over the world in one collective and read in one transfer.
    fn report(
        &mut self,
        loss_sums: &Tensor,
        norm: &Tensor,
        lr: f64,
    ) -> Result<StepMetrics, WorkerError> {
        // The data counters of each replica (counted once, by its position writer; they are
        // cumulative, so reading them at logged steps only loses nothing) ride along.
        let counted = if writes_data_position(self.coord) {
            let s = self.data_stats;
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
        let mut host = self.control.wishes().to_vec();
        host.extend_from_slice(&counted);
        host.push(self.step_peak.map_or(-1.0, |b| b as f64));
        let host = sync::to_device_async(&Tensor::f_from_slice(&host)?, self.device)?;
        let loss_sums = loss_sums.f_to_kind(Kind::Double)?;
        let mine = Tensor::f_cat(
            &[
                loss_sums.f_narrow(0, 0, 4)?,
                norm.f_to_kind(Kind::Double)?.f_reshape([1])?,
                host,
                loss_sums.f_narrow(0, 4, crate::schedule::LOSS_TERMS - 4)?,
            ],
            0,
        )?
        .f_reshape([1, ROW as i64])?;
        let world = self.world.size();
        let mut all = Tensor::f_zeros([world as i64, ROW as i64], (Kind::Double, self.device))?;
        self.world.all_gather(&mine, &mut all).map_err(comm_err)?;
        let v = sync::read_f64s(&all)?;
        let row = |r: usize| &v[r * ROW..(r + 1) * ROW];
        let mut sums = [0f64; 4];
        let mut mins = [f64::INFINITY; 2];
        let mut counts = [0f64; 5];
        let mut objectives = [0f64; 2];
        for r in 0..world {
            for (s, x) in sums.iter_mut().zip(&row(r)[..4]) {
                *s += x;
            }
            for (s, x) in objectives.iter_mut().zip(&row(r)[ROW - 2..]) {
                *s += x;
            }
            mins[0] = mins[0].min(row(r)[5]);
            mins[1] = mins[1].min(row(r)[6]);
            for (c, x) in counts.iter_mut().zip(&row(r)[7..ROW_PEAK]) {
                *c += x;
            }
        }
        self.agreed.update(mins);
        let k_total = (self.plan.dims.dp * self.job.parallel.microbatches) as f64;
        let losses = StepLosses {
            total: sums[0] / k_total,
            itc: sums[1] / k_total,
            caption: sums[2] / k_total,
            itm: sums[3] / k_total,
            mlm: objectives[0] / k_total,
            vqa: objectives[1] / k_total,
        };
        if !losses.total.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.step,
                loss: losses.total,
            });
        }
        let now = Instant::now();
        // The clock started at the latest with this step (see `step_once`).
        let (at, from) = self.last_report.unwrap_or((now, self.step - 1));
        let secs = (now - at).as_secs_f64() / self.step.saturating_sub(from).max(1) as f64;
        self.last_report = Some((now, self.step));
        let mut metrics =
            StepMetrics::of_step(&self.job, self.step, &losses, lr, row(0)[4], secs, world);
        // Each rank's peak (exact in an f64 below 2^53 bytes); none if any rank has none.
        let peaks: Option<Vec<u64>> = (0..world)
            .map(|r| {
                let b = row(r)[ROW_PEAK];
                (b >= 0.0).then_some(b as u64)
            })
            .collect();
        if let Some(p) = peaks {
            metrics.peak_mem_bytes = p.iter().copied().max();
            metrics.peak_mem_bytes_ranks = Some(p);
        }
        if self.job.distill.enabled() {
            // The distillation terms, summed on the last stage: one more small collective
            // at reported steps of distillation jobs only.
            let mut d = match self.executor.distill_sums() {
                Some(d) => d.f_detach_copy()?,
                None => Tensor::f_zeros([crate::distill::TERMS], (Kind::Double, self.device))?,
            };
            self.world
                .all_reduce(&mut d, ReduceOp::Sum)
                .map_err(comm_err)?;
            let v = sync::read_f64s(&d)?;
            metrics.distill = Some(crate::metrics::DistillMetrics {
                distill_itc_kl: v[0] / k_total,
                distill_caption_kl: v[1] / k_total,
                distill_feature: v[2] / k_total,
                distill_icl: v[3] / k_total,
            });
        }
        if self.job.data.source == DataSource::Shards {
            metrics.data = Some(DataCounts {
                data_samples: counts[0] as u64,
                data_bad_image: counts[1] as u64,
                data_bad_caption: counts[2] as u64,
                data_bad_members: counts[3] as u64,
                data_shards_skipped: counts[4] as u64,
            });
        }
        Ok(metrics)
    }

    /// Adds the MLM and VQA rows to this step's micro-batches. The MLM draws are seeded by
    /// the synthetic sample index, or for shards by a hash of the sample's key, so that
    /// every layout and a resumed run mask each sample alike.
    fn attach_objectives(&self, batches: &mut [Batch], keys: &[String]) -> Result<(), WorkerError> {
        let synthetic = self.job.data.source == DataSource::Synthetic;
        let mut at = 0;
        for b in batches.iter_mut() {
            if let (Some(spec), false) = (&self.objectives.mlm, synthetic) {
                let ids: Vec<u64> = keys
                    .get(at..at + b.len())
                    .ok_or_else(|| WorkerError::Other("fewer sample keys than samples".into()))?
                    .iter()
                    .map(|k| key_id(k))
                    .collect();
                b.mlm = Some(weaver_models::objectives::mlm_rows(&b.tokens, &ids, spec)?);
            }
            at += b.len();
            self.objectives
                .attach(b, &self.data, Split::Train, synthetic)?;
        }
        Ok(())
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

    /// Whether this job evaluates: on held-out shards (`data.eval_shards`), or on the
    /// synthetic held-out split when it trains on synthetic data (that split says nothing
    /// about a model trained on real data).
    fn evaluates(&self) -> bool {
        self.evaluates
    }

    /// The norm of the whole model's gradient, as a device scalar: sharded parameters count
    /// on every TP rank, replicated ones on TP rank 0 only; summed over the TP and PP
    /// groups, and over the DP group when the optimizer is sharded (each replica holds the
    /// summed gradients of its shard only). No host read.
    fn global_grad_norm(&self) -> Result<Tensor, WorkerError> {
        let mut sq = self.grads.norm_sq(self.coord.tp == 0)?.f_reshape([1])?;
        let dp = self.grads.is_sharded().then_some(&self.comms.dp);
        for g in [&self.comms.tp, &self.comms.pp].into_iter().chain(dp) {
            if g.size() > 1 {
                g.all_reduce(&mut sq, ReduceOp::Sum).map_err(comm_err)?;
            }
        }
        Ok(sq.f_sqrt()?.f_reshape([])?)
    }

    /// Evaluates the current weights on the layout (see [`Evaluator`]): every rank returns
    /// the same metrics. Collective over the world.
    pub fn evaluate(&mut self) -> Result<EvalMetrics, WorkerError> {
        let _span = info_span!("eval", step = self.step).entered();
        let steady = self.world.timeout();
        self.world
            .set_timeout(Duration::from_secs(self.job.parallel.init_timeout_s));
        let result = self
            .evaluator
            .evaluate(&mut self.executor, &self.store, self.step);
        self.world.set_timeout(steady);
        result
    }

    /// Trains until `train.steps` (or a stop request), then evaluates; rank 0 reports
    /// metrics; every rank checkpoints when checkpoints are enabled (every `every` steps, on
    /// request, on stop, and at the end: the final weights are that last checkpoint).
    pub fn run(&mut self) -> Result<Summary, WorkerError> {
        let started = Instant::now();
        let total = self.job.train.steps;
        let log_every = self.job.train.log_every.max(1);
        let info_every = (total / 20).max(1);
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
            let next = self.step + 1;
            // Logged steps are the agreement steps of control requests (see control.rs).
            let report = next.is_multiple_of(log_every) || next == total;
            let m = self.step_once(report)?;
            let step = self.step;
            bar.set_position(step);
            if let Some(m) = &m {
                last_loss = m.loss;
                bar.set_message(format!("loss {:.4}  {:.0} tok/s", m.loss, m.tokens_per_s));
                if let Some(w) = &mut self.metrics {
                    w.step(m)?;
                }
                if self.rank == 0 && (step.is_multiple_of(info_every) || step == 1 || step == total)
                {
                    info!(
                        step,
                        loss = format!("{:.4}", m.loss),
                        grad_norm = format!("{:.3}", m.grad_norm),
                        tokens_per_s = format!("{:.0}", m.tokens_per_s),
                        step_s = format!("{:.3}", m.step_time_s),
                        "train"
                    );
                }
            }
            self.checkpoints.poll()?;
            let (save_now, stop_now) = self.agreed.due(step);
            // A stop at the last step is moot: the run ends normally.
            let stop_now = stop_now && step < total;
            if stop_now {
                // Before the checkpoint: its shard reports say it is the one stopped at.
                self.control.mark_stopped(step);
            }
            if save_now || stop_now || (every > 0 && step.is_multiple_of(every)) {
                if self.checkpoints.enabled() {
                    self.save_checkpoint()?;
                    saved_at = Some(step);
                }
                self.control.saved(step);
            }
            if stop_now {
                info!(step, "stop requested: leaving the step loop");
                preempted = true;
                break;
            }
            let eval_every = self.job.train.eval_every;
            if eval_every > 0
                && step.is_multiple_of(eval_every)
                && step != total
                && self.evaluates()
            {
                let e = self.evaluate()?;
                self.write_eval(&e)?;
            }
        }
        bar.finish_and_clear();
        if self.checkpoints.enabled() && saved_at != Some(self.step) {
            self.save_checkpoint()?;
        }
        self.checkpoints.finish()?;
        // The final weights are the last checkpoint, which its committer exports (see
        // `ckpt::export_final`).
        let eval = if preempted {
            None
        } else if !self.evaluates() {
            info!("data.source = \"shards\" and no data.eval_shards: no evaluation");
            None
        } else {
            let e = self.evaluate()?;
            self.write_eval(&e)?;
            Some(e)
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
        self.checkpoints.enable(&url, sink)
    }

    /// Waits until this rank's checkpoint in flight is durable and reported.
    pub fn finish_checkpoints(&mut self) -> Result<(), WorkerError> {
        self.checkpoints.finish()
    }

    /// The checkpoint layout of this job (what a committer records in the manifest).
    pub fn checkpoint_layout(&self) -> weaver_checkpoint::Layout {
        checkpoint_layout(&self.job, &self.plan)
    }

    /// Starts this rank's shard of a checkpoint of the current step; returns once it is
    /// copied to host memory (the upload goes on in the background). Every rank calls it
    /// at the same step.
    pub fn save_checkpoint(&mut self) -> Result<(), WorkerError> {
        let state = TrainingState {
            step: self.step,
            optimizer_step: self.optimizer.steps(),
            data: self.source.position(),
        };
        self.checkpoints
            .save(&self.store, &self.optimizer, &state, &self.job.to_toml())
    }

    /// Loads the checkpoint `ckpt` (of any layout) into this rank: its part of every
    /// parameter and moment, the step, the data position. Collective: every rank loads, and
    /// all settle on the same step.
    pub fn resume(&mut self, ckpt: Checkpoint) -> Result<u64, WorkerError> {
        let resumed = self.checkpoints.resume(
            self.world.as_ref(),
            ckpt,
            &self.store,
            &mut self.optimizer,
            Duration::from_secs(self.job.parallel.init_timeout_s),
        )?;
        self.step = resumed.step;
        // The data continues where the checkpoint's position pieces say (any dp: each rank
        // reads the pieces of the streams it owns now). Old checkpoints carry the synthetic
        // sampler's position in train.state only. The old source stops before the new one
        // starts reading.
        self.source = Box::new(Stopped);
        let ckpt = &resumed.checkpoint;
        let mut read = |name: &str| crate::ckpt::read_data_piece(ckpt, name);
        self.source = crate::data::start_source(
            &self.job,
            &self.data,
            self.plan.dims.dp,
            self.coord.dp,
            writes_data_position(self.coord),
            self.device,
            self.local_procs,
            Some(&mut read),
            resumed.sampler,
        )?;
        self.last_report = None;
        Ok(self.step)
    }

    /// Logs an evaluation and writes its line (world rank 0: every rank holds the same
    /// numbers).
    fn write_eval(&mut self, e: &EvalMetrics) -> Result<(), WorkerError> {
        if self.rank != 0 {
            return Ok(());
        }
        info!(
            step = e.step,
            i2t_r1 = e.i2t_r1,
            t2i_r1 = e.t2i_r1,
            i2t_r5 = e.i2t_r5,
            t2i_r5 = e.t2i_r5,
            caption_exact = e.caption_exact,
            "eval"
        );
        if let Some(w) = &mut self.metrics {
            w.eval(e)?;
        }
        Ok(())
    }
}

/// Values each rank contributes to a reported step's all-gather: loss sums (total, itc,
/// caption, itm), the gradient norm, the control wishes (save at, stop at), the data
/// counters (samples, bad images, bad captions, bad members, skipped shards), the rank's
/// peak memory in the step (bytes; −1: not measured), the objectives' loss sums (mlm, vqa).
const ROW: usize = 15;
/// Where the peak memory sits in a row (after the counters).
const ROW_PEAK: usize = 12;

/// Whether the rank at `coord` runs virtual stage `vs` (one of its chunks).
/// The communicators of the distillation teacher on the rank at `coord` (`None` on ranks
/// that do not hold the last stage): its tensor-parallel group of `k = distill.teacher_tp`
/// ranks and, when that spans `r > 1` data-parallel replicas, the group of the `r` ranks
/// (one per replica, the same tensor-parallel coordinate) whose micro-batches it runs
/// together. Those two are split from the world here: collective over the world (every
/// rank calls it, the others with no group).
fn teacher_groups(
    world: &dyn Communicator,
    job: &JobConfig,
    plan: &Plan,
    coord: Coord,
    holds_last: bool,
    comms: &MeshComms,
) -> Result<Option<crate::distill::TeacherGroups>, WorkerError> {
    let dims = plan.dims;
    let (k, r) = job
        .distill
        .teacher_group(dims.tp, dims.dp)
        .map_err(WorkerError::Layout)?;
    let student = comms.tp.clone();
    if r == 1 {
        return Ok(holds_last.then(|| crate::distill::TeacherGroups {
            group: (k > 1).then(|| student.clone()),
            replicas: None,
            student,
        }));
    }
    // The replicas `r·j .. r·(j+1)` form teacher group `j` (its rank `(d mod r)·tp + t`);
    // their ranks of tensor-parallel coordinate `t` gather their micro-batches.
    let block = (coord.dp / r) as u32;
    let (color, key) = if holds_last {
        (Some(block), (coord.dp % r) * dims.tp + coord.tp)
    } else {
        (None, 0)
    };
    let group = world.split(color, key).map_err(comm_err)?;
    let (color, key) = if holds_last {
        (Some(block * dims.tp as u32 + coord.tp as u32), coord.dp % r)
    } else {
        (None, 0)
    };
    let replicas = world.split(color, key).map_err(comm_err)?;
    if !holds_last {
        return Ok(None);
    }
    let missing = || WorkerError::Layout("the distillation teacher's group was not formed".into());
    Ok(Some(crate::distill::TeacherGroups {
        group: Some(group.ok_or_else(missing)?),
        replicas: Some(replicas.ok_or_else(missing)?),
        student,
    }))
}

fn executor_holds(plan: &Plan, coord: Coord, vs: usize) -> bool {
    (0..plan.chunks).any(|c| c * plan.dims.pp + coord.pp == vs)
}

/// A sample key's 64-bit FNV-1a hash: the MLM draws' sample id for shards.
fn key_id(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
