//! The schedule executor: runs one rank's pipeline actions (`weaver_parallel::pp`) over its
//! model chunks — forwards, backwards and the batches of point-to-point transfers between
//! them — for a training step ([`ScheduleExecutor::train`]) or forwards only, for evaluation
//! ([`ScheduleExecutor::forward_only`]).
//!
//! A chunk (virtual stage) is a list of one-layer models, so that a stage's forward can be
//! cut at layer boundaries ([`Tape::begin_layer`]) and its backward reports each finished
//! layer to the gradient synchroniser, which starts reducing a bucket as soon as it is
//! complete (overlap). The same per-layer segments are where activation recomputation
//! plugs in (`parallel.recompute`, Korthikanti et al. 2022):
//!
//! - `full`: the forward runs without a graph and keeps only each layer's input (detached;
//!   tensors that pass a layer unchanged, like the decoder's image memory, share storage
//!   and are kept once). The backward walks the chunk's layers last to first: it runs the
//!   layer again with a graph from leaves of its saved input (the last layer of the last
//!   stage with its losses), seeds it with the gradient of its output (the next layer's
//!   input leaves, or what the next stage sent), and hands its input leaves' gradients on.
//!   Each layer is reported done to the gradient synchroniser as its backward ends, as
//!   without recomputation. The losses a step reports come from the graph-free forward.
//! - `selective`: the tape recomputes attention's core (the scaled dot product) before its
//!   backward ([`Tape::with_selective_recompute`]); everything else is kept.
//!
//! The model draws no random numbers (no dropout), so a rerun computes the same bits: on
//! CPU the losses and gradients with recomputation equal those without it exactly.
//!
//! Transfers are started without waiting ([`Communicator::batch_p2p_start`]): each batch is
//! posted where the schedule puts it, and the executor waits for it only right before a
//! computation needs what it receives (sends are waited for at the end of the schedule).
//! Backends that overlap (NCCL on a side stream, tcp on its threads) then keep the host
//! free while activations and gradients travel.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use tracing::debug;
use weaver_models::config::{ModelConfig, Recompute};
use weaver_models::data::Batch;
use weaver_models::model::{ActField, Acts, LossWeights, Losses};
use weaver_models::Model;
use weaver_parallel::comm::{Communicator, P2POwned, Work};
use weaver_parallel::pp::{Action, Payload, Schedule, Transfer};
use weaver_parallel::tp::{BackwardHooks, Tape, TpError};

use crate::contrastive::GlobalContrast;
use crate::error::WorkerError;
use crate::grads::GradSync;
use crate::shim;

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

fn tp_err(e: TpError) -> WorkerError {
    match e {
        TpError::Torch(t) => WorkerError::Torch(t),
        other => WorkerError::Comm(other.to_string()),
    }
}

/// Loss terms [`ScheduleExecutor::train`] sums: total, itc, caption, itm, mlm, vqa.
pub const LOSS_TERMS: i64 = 6;

/// One virtual stage of this rank: its layers, each a one-layer model.
#[derive(Debug)]
pub struct Chunk {
    /// The virtual stage.
    pub vs: usize,
    /// `(layer index, the model of that layer alone)`, in order.
    pub layers: Vec<(usize, Model)>,
}

impl Chunk {
    fn last(&self) -> Result<&Model, WorkerError> {
        self.layers
            .last()
            .map(|(_, m)| m)
            .ok_or_else(|| WorkerError::Layout(format!("virtual stage {} has no layers", self.vs)))
    }
}

/// What the executor needs to know about the job.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// The model's dimensions (for the shapes crossing each boundary).
    pub model: ModelConfig,
    /// Layers of every virtual stage.
    pub stages: Vec<Range<usize>>,
    /// This rank's pipeline position and the pipeline size.
    pub pp_rank: usize,
    /// Pipeline ranks.
    pub pp_size: usize,
    /// Loss weights (matching negatives run when `itm > 0`).
    pub weights: LossWeights,
    /// Compute dtype.
    pub kind: Kind,
    /// Compute device.
    pub device: Device,
    /// Cut each chunk's autograd graph at every layer boundary (overlapping data-parallel
    /// reduction with the backward).
    pub cut_layers: bool,
    /// Activation recomputation (see the module docs).
    pub recompute: Recompute,
    /// Sequence parallelism (`parallel.sequence_parallel`): the training passes split the
    /// regions between tensor-parallel blocks along the sequence over the TP group, and the
    /// pipeline boundaries carry sequence shards. Forward-only passes (evaluation, the
    /// global contrastive batch's embeddings) run plain tensor parallelism: their sinks
    /// read whole activations.
    pub sequence_parallel: bool,
}

/// Tensors produced by a forward and kept for its backward.
#[derive(Debug)]
struct InFlight {
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
    tape: Tape,
    loss: Option<Losses>,
    /// Full recomputation: the input of each of the chunk's layers, detached (the rest is
    /// empty).
    saved: Vec<Acts>,
    /// Full recomputation on the last stage of a distillation job: the teacher's outputs of
    /// the forward, for the backward's rerun of the loss.
    teacher_out: Option<crate::distill::TeacherOut>,
}

/// Full recomputation's forward of a chunk: each layer's input, the chunk's output, and on
/// the last virtual stage the losses and the distillation terms.
type KeptForward = (Vec<Acts>, Acts, Option<Losses>, Option<Distilled>);

/// The distillation terms of a micro-batch's forward under full recomputation, and the
/// teacher's outputs they came from (kept for the backward's rerun).
struct Distilled {
    terms: crate::distill::DistillTerms,
    out: crate::distill::TeacherOut,
}

/// `acts` without their graph (the same storage).
fn detached(acts: &Acts) -> Result<Acts, tch::TchError> {
    let d = |t: &Option<Tensor>| t.as_ref().map(|t| t.f_detach()).transpose();
    Ok(Acts {
        image: d(&acts.image)?,
        text: d(&acts.text)?,
        image_emb: d(&acts.image_emb)?,
        text_emb: d(&acts.text_emb)?,
    })
}

/// `acts` as fresh leaves that require grad (the start of a recomputed layer).
fn leaves(acts: &Acts) -> Result<Acts, tch::TchError> {
    let l = |t: &Option<Tensor>| {
        t.as_ref()
            .map(|t| t.f_detach().map(|t| t.set_requires_grad(true)))
            .transpose()
    };
    Ok(Acts {
        image: l(&acts.image)?,
        text: l(&acts.text)?,
        image_emb: l(&acts.image_emb)?,
        text_emb: l(&acts.text_emb)?,
    })
}

type Key = (Payload, usize, usize);

/// The shapes and dtypes of the tensors a receive brings.
type Shapes<'a> = &'a dyn Fn(&Transfer) -> Vec<(Vec<i64>, Kind)>;

/// Called on the last virtual stage with each micro-batch's final activations in a
/// forward-only run: `(micro-batch, the last layer's model, activations, batch)`.
pub type Sink<'a> = &'a mut dyn FnMut(usize, &Model, &mut Acts, &Batch) -> Result<(), WorkerError>;

/// What a micro-batch's activations at a pipeline boundary depend on: its samples, its
/// groups of objective rows ([`Batch::extra_rows`]) and its text length (shorter than
/// `model.max_text_len` when trimmed: [`Batch::trim_text`]).
#[derive(Debug, Clone, Copy)]
struct MicroShape {
    rows: usize,
    extra: usize,
    text_len: usize,
}

impl MicroShape {
    fn of(batch: &Batch) -> MicroShape {
        MicroShape {
            rows: batch.len(),
            extra: batch.extra_rows(),
            text_len: batch.tokens.size()[1] as usize,
        }
    }
}

/// Transfers in flight and the tensors they carry.
struct Wire<'a> {
    pp: &'a dyn Communicator,
    works: Vec<Option<Box<dyn Work>>>,
    /// Received (or arriving) tensors and the work that brings them.
    inbox: HashMap<Key, (Vec<Tensor>, usize)>,
    /// Tensors waiting for their send.
    outbox: HashMap<Key, Vec<Tensor>>,
}

impl Wire<'_> {
    /// Starts one batch of the schedule: sends from the outbox, receives into fresh buffers
    /// shaped by `shapes(transfer)`, in the schedule's order (transfers in batch order,
    /// tensors in field order).
    fn post(
        &mut self,
        transfers: &[Transfer],
        shapes: Shapes<'_>,
        device: Device,
    ) -> Result<(), WorkerError> {
        let mut ops = Vec::new();
        let mut arriving = Vec::new();
        for t in transfers {
            let key = (t.payload, t.mb, t.boundary);
            if t.send {
                let ts = self.outbox.remove(&key).ok_or_else(|| {
                    WorkerError::Comm(format!(
                        "nothing to send for {:?} of micro-batch {} at boundary {}",
                        t.payload, t.mb, t.boundary
                    ))
                })?;
                ops.extend(ts.into_iter().map(|tensor| P2POwned::Send {
                    tensor,
                    peer: t.peer,
                }));
            } else {
                let bufs = shapes(t)
                    .into_iter()
                    .map(|(shape, kind)| Tensor::f_empty(&shape, (kind, device)))
                    .collect::<Result<Vec<_>, _>>()?;
                ops.extend(bufs.iter().map(|b| P2POwned::Recv {
                    tensor: b.shallow_clone(),
                    peer: t.peer,
                }));
                arriving.push((key, bufs));
            }
        }
        let work = self.pp.batch_p2p_start(ops).map_err(comm_err)?;
        let id = self.works.len();
        self.works.push(Some(work));
        for (key, bufs) in arriving {
            self.inbox.insert(key, (bufs, id));
        }
        debug!(n = transfers.len(), "pipeline transfers posted");
        Ok(())
    }

    /// The tensors received for `key`, once their batch is complete.
    fn take(&mut self, key: Key) -> Result<Vec<Tensor>, WorkerError> {
        let (bufs, id) = self.inbox.remove(&key).ok_or_else(|| {
            WorkerError::Comm(format!(
                "no {:?} for micro-batch {} at boundary {}",
                key.0, key.1, key.2
            ))
        })?;
        if let Some(w) = self.works[id].take() {
            w.wait().map_err(comm_err)?;
        }
        Ok(bufs)
    }

    /// Waits for every batch still in flight (the last sends).
    fn finish(&mut self) -> Result<(), WorkerError> {
        for w in &mut self.works {
            if let Some(w) = w.take() {
                w.wait().map_err(comm_err)?;
            }
        }
        Ok(())
    }
}

/// Runs the backward passes through the shim (seeded, no product trick) and reports finished
/// layers to the gradient synchroniser.
struct Hooks<'a> {
    grads: &'a mut GradSync,
    failed: Option<WorkerError>,
}

impl BackwardHooks for Hooks<'_> {
    fn seed(&mut self, pairs: &[(Tensor, Tensor)]) -> Result<(), TpError> {
        Ok(shim::backward(pairs)?)
    }

    fn layer_done(&mut self, layer: usize) -> Result<(), TpError> {
        self.grads.layer_done(layer).map_err(|e| {
            let msg = e.to_string();
            self.failed = Some(e);
            TpError::Comm(msg)
        })
    }
}

/// Runs a rank's schedule over its chunks (see the module docs).
#[derive(Debug)]
pub struct ScheduleExecutor {
    cfg: ExecutorConfig,
    chunks: Vec<Chunk>,
    schedule: Schedule,
    pp: Arc<dyn Communicator>,
    tp: Arc<dyn Communicator>,
    /// (computing, whole schedule) of the last run, in seconds.
    last_times: (f64, f64),
    /// The global contrastive batch (`train.contrastive = "global"`), when the step's batch
    /// is more than one micro-batch.
    contrast: Option<GlobalContrast>,
    /// The frozen teacher of distillation (`[distill]`), on ranks of the last stage.
    teacher: Option<crate::distill::Teacher>,
    /// The last run's sums of the distillation terms (itc KL, caption KL, feature, ICL; f64 on
    /// the device; zero except on the last stage).
    distill_sums: Option<Tensor>,
}

impl ScheduleExecutor {
    /// An executor of `schedule` (the training schedule) for `chunks` (in chunk order), over
    /// the pipeline group `pp` and the tensor-parallel group `tp`.
    pub fn new(
        cfg: ExecutorConfig,
        chunks: Vec<Chunk>,
        schedule: Schedule,
        pp: Arc<dyn Communicator>,
        tp: Arc<dyn Communicator>,
    ) -> ScheduleExecutor {
        ScheduleExecutor {
            cfg,
            chunks,
            schedule,
            pp,
            tp,
            last_times: (0.0, 0.0),
            contrast: None,
            teacher: None,
            distill_sums: None,
        }
    }

    /// Distills from `teacher` (see [`crate::distill`]): on the last virtual stage, each
    /// micro-batch's loss gains the teacher's distillation terms. Only ranks that hold the
    /// last stage need one.
    pub fn set_teacher(&mut self, teacher: Option<crate::distill::Teacher>) {
        self.teacher = teacher;
    }

    /// The teacher, if this rank has one.
    pub fn teacher(&self) -> Option<&crate::distill::Teacher> {
        self.teacher.as_ref()
    }

    /// Sums over the last training run's micro-batches of the distillation terms (itc KL,
    /// caption KL, feature distance), f64 on the device: zero on ranks without the last stage; `None` before
    /// any run.
    pub fn distill_sums(&self) -> Option<&Tensor> {
        self.distill_sums.as_ref()
    }

    /// Takes the contrastive loss's negatives from the global batch through `contrast`
    /// (see [`crate::contrastive`]); `None`: from each micro-batch.
    pub fn set_contrastive(&mut self, contrast: Option<GlobalContrast>) {
        self.contrast = contrast;
    }

    /// The forward-only pass that caches every micro-batch's embeddings on the last stage
    /// for the global contrastive batch (see [`crate::contrastive`]). Collective over the
    /// pipeline and tensor-parallel groups, and the last stage's data-parallel group.
    fn cache_embeddings(&mut self, batches: &[Batch]) -> Result<(), WorkerError> {
        let Some(mut contrast) = self.contrast.take() else {
            return Ok(());
        };
        let result = (|| {
            contrast.clear();
            if !contrast.caches() {
                return Ok(());
            }
            let mut embs: Vec<Option<(Tensor, Tensor)>> =
                (0..batches.len()).map(|_| None).collect();
            self.forward_only(batches, &mut |mb, _, acts, _| {
                let take = |t: &Option<Tensor>, what: &str| {
                    t.as_ref()
                        .map(|t| t.shallow_clone())
                        .ok_or_else(|| WorkerError::Other(format!("the last stage has no {what}")))
                };
                embs[mb] = Some((
                    take(&acts.image_emb, "image embedding")?,
                    take(&acts.text_emb, "text embedding")?,
                ));
                Ok(())
            })?;
            if self.chunks.iter().any(|c| c.vs == self.last_vs()) {
                let embs = embs
                    .into_iter()
                    .map(|e| {
                        e.ok_or_else(|| WorkerError::Other("a micro-batch was not embedded".into()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                contrast.set_cache(&embs)?;
            }
            Ok(())
        })();
        self.contrast = Some(contrast);
        result
    }

    /// Seconds the last run spent computing (forwards, backwards, losses) and in all
    /// (computing plus waiting for transfers): the measured bubble is `1 − busy / total`.
    pub fn last_times(&self) -> (f64, f64) {
        self.last_times
    }

    /// The shape of a transfer without a micro-batch (none: nothing crosses).
    fn no_micro(&self) -> MicroShape {
        MicroShape {
            rows: 0,
            extra: 0,
            text_len: self.cfg.model.max_text_len,
        }
    }

    fn last_vs(&self) -> usize {
        self.cfg.stages.len() - 1
    }

    /// What crosses `boundary` (into virtual stage `boundary + 1`) for a micro-batch of
    /// shape `mb` ([`MicroShape`]). `split`: as sequence shards (the training passes under
    /// sequence parallelism).
    fn boundary(
        &self,
        boundary: usize,
        mb: MicroShape,
        itm: bool,
        split: bool,
    ) -> Vec<(ActField, Vec<i64>, Kind)> {
        let tp = if split { self.tp.size() } else { 1 };
        let MicroShape {
            rows,
            extra,
            text_len,
        } = mb;
        // A trimmed micro-batch (`Batch::trim_text`) carries shorter text streams; every
        // stage derives the same length from the same micro-batch.
        let trimmed;
        let model = if text_len == self.cfg.model.max_text_len {
            &self.cfg.model
        } else {
            trimmed = ModelConfig {
                max_text_len: text_len,
                ..self.cfg.model.clone()
            };
            &trimmed
        };
        Model::boundary_layout_split(
            model,
            self.cfg.stages[boundary + 1].start,
            rows,
            itm,
            extra,
            self.cfg.kind,
            tp,
        )
    }

    /// A tape for a training pass: over the TP group, splitting sequences under sequence
    /// parallelism.
    fn train_tape(&self) -> Tape {
        Tape::new(Some(self.tp.clone())).with_sequence_parallel(self.cfg.sequence_parallel)
    }

    /// The activations entering virtual stage `vs` for micro-batch `mb` (empty for the
    /// first stage), as leaves that require grad when `grad`.
    #[allow(clippy::too_many_arguments)]
    fn stage_input(
        &self,
        wire: &mut Wire<'_>,
        vs: usize,
        mb: usize,
        shape: MicroShape,
        itm: bool,
        grad: bool,
        split: bool,
    ) -> Result<Acts, WorkerError> {
        if vs == 0 {
            return Ok(Acts::default());
        }
        let fields: Vec<ActField> = self
            .boundary(vs - 1, shape, itm, split)
            .into_iter()
            .map(|(f, _, _)| f)
            .collect();
        let tensors = wire
            .take((Payload::Act, mb, vs - 1))?
            .into_iter()
            .map(|t| if grad { t.set_requires_grad(true) } else { t })
            .collect();
        Ok(Acts::from_fields(&fields, tensors)?)
    }

    /// Runs chunk `c`'s layers on `acts`.
    fn forward_chunk(
        &self,
        c: usize,
        tape: &mut Tape,
        acts: &mut Acts,
        batch: &Batch,
        itm: bool,
    ) -> Result<(), WorkerError> {
        for (i, model) in &self.chunks[c].layers {
            if self.cfg.cut_layers {
                tape.begin_layer(*i, &mut acts.present_mut())
                    .map_err(tp_err)?;
            }
            model.forward(tape, acts, batch, itm)?;
        }
        Ok(())
    }

    /// Full recomputation's forward of chunk `c` on `input` without a graph: the input of
    /// each layer (detached), the chunk's output, and the losses when `last` (the last
    /// virtual stage).
    fn forward_keeping_inputs(
        &self,
        c: usize,
        mb: usize,
        input: &Acts,
        batch: &Batch,
        itm: bool,
        last: bool,
    ) -> Result<KeptForward, WorkerError> {
        tch::no_grad(|| {
            let mut acts = detached(input)?;
            let mut tape = self.train_tape();
            let mut saved = Vec::with_capacity(self.chunks[c].layers.len());
            for (_, model) in &self.chunks[c].layers {
                saved.push(detached(&acts)?);
                model.forward(&mut tape, &mut acts, batch, itm)?;
            }
            let losses = if last {
                let w = self.cfg.weights;
                // The global contrastive batch: no graph here, so the gather is a plain
                // all-gather (collective over the last stage's replicas).
                let global = match &self.contrast {
                    Some(g) => g.embeddings(&mut tape, &mut acts, mb)?,
                    None => None,
                };
                Some(self.chunks[c].last()?.losses_with(
                    &mut tape,
                    &mut acts,
                    batch,
                    w,
                    global.as_ref(),
                )?)
            } else {
                None
            };
            // Distillation: the teacher runs here, once per micro-batch; the backward's
            // rerun of the loss reuses its outputs.
            let (losses, distilled) = match (losses, &self.teacher) {
                (Some(mut l), Some(teacher)) => {
                    let out = teacher.outputs(batch)?;
                    let terms = teacher.losses_against(
                        &out,
                        &mut tape,
                        self.chunks[c].last()?,
                        &acts,
                        &l,
                        batch,
                    )?;
                    l.total = l.total.f_add(&terms.weighted)?;
                    (Some(l), Some(Distilled { terms, out }))
                }
                (l, _) => (l, None),
            };
            Ok((saved, acts, losses, distilled))
        })
    }

    /// Full recomputation's backward of chunk `c`: each layer, last to first, runs again
    /// with a graph from leaves of its saved input and is seeded with its output's gradient
    /// (`out_grads`, one per present tensor of the chunk's output in [`Acts::present`]
    /// order; or, on the last virtual stage, the loss seeded with `seed`). Returns the
    /// gradients of the chunk's input (zeros where none reached it).
    #[allow(clippy::too_many_arguments)]
    fn backward_recomputing(
        &self,
        c: usize,
        mb: usize,
        saved: Vec<Acts>,
        batch: &Batch,
        itm: bool,
        out_grads: Vec<Tensor>,
        seed: &Tensor,
        itc_seed: Option<&Tensor>,
        teacher_out: Option<&crate::distill::TeacherOut>,
        hooks: &mut Hooks<'_>,
    ) -> Result<Vec<Tensor>, WorkerError> {
        let layers = &self.chunks[c].layers;
        let last = self.chunks[c].vs == self.last_vs();
        let mut grads: Vec<Option<Tensor>> = out_grads.into_iter().map(Some).collect();
        let mut input_leaves = Vec::new();
        for (j, kept) in saved.into_iter().enumerate().rev() {
            let (i, model) = &layers[j];
            let mut acts = leaves(&kept)?;
            drop(kept);
            input_leaves = acts.present();
            let mut tape = self.train_tape();
            // Names the segment's layer: its backward ends with `layer_done(i)`.
            tape.begin_layer(*i, &mut []).map_err(tp_err)?;
            model.forward(&mut tape, &mut acts, batch, itm)?;
            let seeds: Vec<(Tensor, Tensor)> = if last && j + 1 == layers.len() {
                // With global contrastive negatives the rerun gathers again, with its cut
                // (see `crate::contrastive`), as the forward without recomputation does.
                let global = match &self.contrast {
                    Some(g) => g.embeddings(&mut tape, &mut acts, mb)?,
                    None => None,
                };
                let mut l = model.losses_with(
                    &mut tape,
                    &mut acts,
                    batch,
                    self.cfg.weights,
                    global.as_ref(),
                )?;
                if let Some(teacher) = &self.teacher {
                    let out = teacher_out.ok_or_else(|| {
                        WorkerError::Other(format!(
                            "micro-batch {mb}: the distillation teacher's outputs were not kept for the recomputation"
                        ))
                    })?;
                    let d = teacher.losses_against(out, &mut tape, model, &acts, &l, batch)?;
                    l.total = l.total.f_add(&d.weighted)?;
                }
                let mut s = vec![(l.total, seed.shallow_clone())];
                if let Some(x) = itc_seed {
                    s.push((l.itc, x.shallow_clone()));
                }
                s
            } else {
                let out = acts.present();
                if out.len() != grads.len() {
                    return Err(WorkerError::Layout(format!(
                        "layer {i} recomputed {} outputs for {} gradients",
                        out.len(),
                        grads.len()
                    )));
                }
                out.into_iter()
                    .zip(grads.drain(..))
                    .filter_map(|(o, g)| g.map(|g| (o, g)))
                    .collect()
            };
            drop(acts);
            let r = tape.backward_with(seeds, hooks);
            if let Some(e) = hooks.failed.take() {
                return Err(e);
            }
            r.map_err(tp_err)?;
            grads = input_leaves
                .iter()
                .map(|x| {
                    let g = x.grad();
                    g.defined().then_some(g)
                })
                .collect();
        }
        Ok(grads
            .into_iter()
            .zip(&input_leaves)
            .map(|(g, x)| match g {
                Some(g) => Ok(g),
                None => x.f_zeros_like(),
            })
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Runs the training schedule on this rank's micro-batches `batches`: gradients of
    /// `scale ×` each micro-batch's loss accumulate in `grads` (which hears of every layer
    /// finished). Returns this rank's sums of the micro-batch losses (total, itc, caption,
    /// itm, mlm, vqa: [`LOSS_TERMS`]; f64 on the device; zero except on the last stage's TP
    /// rank 0).
    pub fn train(
        &mut self,
        batches: &[Batch],
        scale: f64,
        grads: &mut GradSync,
    ) -> Result<Tensor, WorkerError> {
        let device = self.cfg.device;
        let itm = self.cfg.weights.itm > 0.0;
        let w = self.cfg.weights;
        let last_vs = self.last_vs();
        let tp_rank0 = self.tp.rank() == 0;
        let mut inflight: HashMap<(usize, usize), InFlight> = HashMap::new();
        let pp = self.pp.clone();
        let mut wire = Wire {
            pp: pp.as_ref(),
            works: Vec::new(),
            inbox: HashMap::new(),
            outbox: HashMap::new(),
        };
        self.cache_embeddings(batches)?;
        let mut sums = Tensor::f_zeros([LOSS_TERMS], (Kind::Double, device))?;
        let mut distill_sums = Tensor::f_zeros([crate::distill::TERMS], (Kind::Double, device))?;
        let seed =
            crate::sync::to_device_async(&Tensor::f_from_slice(&[scale])?.f_reshape([])?, device)?;
        // The global contrastive term's extra weight in each pass's objective (see
        // `crate::contrastive`): `M` times in all, `total` holding it once.
        let itc_seed = match &self.contrast {
            Some(c) if c.itc_multiplier() > 1.0 => Some(crate::sync::to_device_async(
                &Tensor::f_from_slice(&[scale * (c.itc_multiplier() - 1.0) * w.itc])?
                    .f_reshape([])?,
                device,
            )?),
            _ => None,
        };
        let started = Instant::now();
        let mut busy = Duration::ZERO;
        let actions = self.schedule.actions[self.cfg.pp_rank].clone();
        for action in &actions {
            let t0 = Instant::now();
            match *action {
                Action::Forward { mb, chunk } => {
                    let vs = self.chunks[chunk].vs;
                    let batch = batches.get(mb).ok_or_else(|| {
                        WorkerError::Other(format!("no micro-batch {mb} for this step"))
                    })?;
                    let full = self.cfg.recompute == Recompute::Full;
                    // Full recomputation makes its own leaves in the backward.
                    let rows = MicroShape::of(batch);
                    let mut acts = self.stage_input(
                        &mut wire,
                        vs,
                        mb,
                        rows,
                        itm,
                        !full,
                        self.cfg.sequence_parallel,
                    )?;
                    if full {
                        let last = vs == last_vs;
                        let (saved, out, l, distilled) =
                            self.forward_keeping_inputs(chunk, mb, &acts, batch, itm, last)?;
                        let teacher_out = match distilled {
                            Some(Distilled { terms: d, out }) => {
                                if tp_rank0 {
                                    distill_sums = distill_sums.f_add(&d.stacked()?)?;
                                }
                                Some(out)
                            }
                            None => None,
                        };
                        match l {
                            Some(l) => {
                                if tp_rank0 {
                                    let terms =
                                        [&l.total, &l.itc, &l.caption, &l.itm, &l.mlm, &l.vqa];
                                    let v = Tensor::f_stack(&terms, 0)?.f_to_kind(Kind::Double)?;
                                    sums = sums.f_add(&v)?;
                                }
                            }
                            None => {
                                wire.outbox.insert((Payload::Act, mb, vs), out.present());
                            }
                        }
                        inflight.insert(
                            (mb, chunk),
                            InFlight {
                                inputs: Vec::new(),
                                outputs: Vec::new(),
                                tape: Tape::new(None),
                                loss: None,
                                saved,
                                teacher_out,
                            },
                        );
                        busy += t0.elapsed();
                        continue;
                    }
                    let inputs = acts.present();
                    let mut tape = self
                        .train_tape()
                        .with_selective_recompute(self.cfg.recompute == Recompute::Selective);
                    self.forward_chunk(chunk, &mut tape, &mut acts, batch, itm)?;
                    let (outputs, loss) = if vs == last_vs {
                        let global = match &self.contrast {
                            Some(c) => c.embeddings(&mut tape, &mut acts, mb)?,
                            None => None,
                        };
                        let mut l = self.chunks[chunk].last()?.losses_with(
                            &mut tape,
                            &mut acts,
                            batch,
                            w,
                            global.as_ref(),
                        )?;
                        if let Some(teacher) = &self.teacher {
                            let d = teacher.losses(
                                &mut tape,
                                self.chunks[chunk].last()?,
                                &acts,
                                &l,
                                batch,
                            )?;
                            l.total = l.total.f_add(&d.weighted)?;
                            if tp_rank0 {
                                distill_sums = distill_sums.f_add(&d.stacked()?)?;
                            }
                        }
                        if tp_rank0 {
                            // Kept on the device: reading a value back per micro-batch
                            // would stall a GPU pipeline on every one.
                            let terms = [&l.total, &l.itc, &l.caption, &l.itm, &l.mlm, &l.vqa];
                            let v = Tensor::f_stack(&terms, 0)?
                                .f_detach()?
                                .f_to_kind(Kind::Double)?;
                            sums = sums.f_add(&v)?;
                        }
                        // The caption logits (for distillation) are not kept until the
                        // backward: `[B, T − 1, V]` is large.
                        l.caption_logits = None;
                        (Vec::new(), Some(l))
                    } else {
                        let out = acts.present();
                        let sent = out
                            .iter()
                            .map(|t| t.f_detach())
                            .collect::<Result<Vec<_>, _>>()?;
                        wire.outbox.insert((Payload::Act, mb, vs), sent);
                        (out, None)
                    };
                    inflight.insert(
                        (mb, chunk),
                        InFlight {
                            inputs,
                            outputs,
                            tape,
                            loss,
                            saved: Vec::new(),
                            teacher_out: None,
                        },
                    );
                }
                Action::Backward { mb, chunk } => {
                    let vs = self.chunks[chunk].vs;
                    let mut f = inflight.remove(&(mb, chunk)).ok_or_else(|| {
                        WorkerError::Comm(format!(
                            "backward of micro-batch {mb} before its forward"
                        ))
                    })?;
                    if self.cfg.recompute == Recompute::Full {
                        let batch = batches.get(mb).ok_or_else(|| {
                            WorkerError::Other(format!("no micro-batch {mb} for this step"))
                        })?;
                        let out_grads = if vs == last_vs {
                            Vec::new()
                        } else {
                            wire.take((Payload::Grad, mb, vs))?
                        };
                        let mut hooks = Hooks {
                            grads,
                            failed: None,
                        };
                        let saved = std::mem::take(&mut f.saved);
                        let teacher_out = f.teacher_out.take();
                        let g = self.backward_recomputing(
                            chunk,
                            mb,
                            saved,
                            batch,
                            itm,
                            out_grads,
                            &seed,
                            itc_seed.as_ref(),
                            teacher_out.as_ref(),
                            &mut hooks,
                        )?;
                        if vs > 0 {
                            wire.outbox.insert((Payload::Grad, mb, vs - 1), g);
                        }
                        busy += t0.elapsed();
                        continue;
                    }
                    let seeds: Vec<(Tensor, Tensor)> = match &f.loss {
                        Some(l) => {
                            let mut s = vec![(l.total.shallow_clone(), seed.shallow_clone())];
                            if let Some(x) = &itc_seed {
                                s.push((l.itc.shallow_clone(), x.shallow_clone()));
                            }
                            s
                        }
                        None => {
                            let g = wire.take((Payload::Grad, mb, vs))?;
                            f.outputs.iter().map(|o| o.shallow_clone()).zip(g).collect()
                        }
                    };
                    let mut hooks = Hooks {
                        grads,
                        failed: None,
                    };
                    let r = f.tape.backward_with(seeds, &mut hooks);
                    if let Some(e) = hooks.failed.take() {
                        return Err(e);
                    }
                    r.map_err(tp_err)?;
                    if !self.cfg.cut_layers {
                        // One segment per chunk: all its layers finish together.
                        for (i, _) in self.chunks[chunk].layers.iter().rev() {
                            grads.layer_done(*i)?;
                        }
                    }
                    if vs > 0 {
                        let g = f
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
                        wire.outbox.insert((Payload::Grad, mb, vs - 1), g);
                    }
                }
                Action::Comm(ref transfers) => {
                    let shapes = |t: &Transfer| -> Vec<(Vec<i64>, Kind)> {
                        let mb = batches.get(t.mb).map_or(self.no_micro(), MicroShape::of);
                        self.boundary(t.boundary, mb, itm, self.cfg.sequence_parallel)
                            .into_iter()
                            .map(|(_, s, k)| (s, k))
                            .collect()
                    };
                    wire.post(transfers, &shapes, device)?;
                }
            }
            if !matches!(action, Action::Comm(_)) {
                busy += t0.elapsed();
            }
        }
        wire.finish()?;
        if let Some(c) = &mut self.contrast {
            c.clear();
        }
        self.last_times = (busy.as_secs_f64(), started.elapsed().as_secs_f64());
        self.distill_sums = Some(distill_sums);
        Ok(sums)
    }

    /// Runs `batches` forward through the pipeline without gradients (matching negatives
    /// off) and calls `sink(mb, last layer's model, activations, batch)` on the last virtual
    /// stage for each. Collective over the pipeline and tensor-parallel groups.
    pub fn forward_only(&mut self, batches: &[Batch], sink: Sink<'_>) -> Result<(), WorkerError> {
        if batches.is_empty() {
            return Ok(());
        }
        let device = self.cfg.device;
        let schedule = Schedule::forward_only(self.cfg.pp_size, batches.len(), self.chunks.len())
            .map_err(|e| WorkerError::Layout(e.to_string()))?;
        let last_vs = self.last_vs();
        let pp = self.pp.clone();
        let mut wire = Wire {
            pp: pp.as_ref(),
            works: Vec::new(),
            inbox: HashMap::new(),
            outbox: HashMap::new(),
        };
        tch::no_grad(|| -> Result<(), WorkerError> {
            for action in &schedule.actions[self.cfg.pp_rank] {
                match *action {
                    Action::Forward { mb, chunk } => {
                        let vs = self.chunks[chunk].vs;
                        let batch = &batches[mb];
                        let rows = MicroShape::of(batch);
                        let mut acts =
                            self.stage_input(&mut wire, vs, mb, rows, false, false, false)?;
                        let mut tape = Tape::new(Some(self.tp.clone()));
                        for (_, model) in &self.chunks[chunk].layers {
                            model.forward(&mut tape, &mut acts, batch, false)?;
                        }
                        if vs == last_vs {
                            sink(mb, self.chunks[chunk].last()?, &mut acts, batch)?;
                        } else {
                            wire.outbox.insert((Payload::Act, mb, vs), acts.present());
                        }
                    }
                    Action::Backward { .. } => {
                        return Err(WorkerError::Layout(
                            "a backward in a forward-only schedule".into(),
                        ))
                    }
                    Action::Comm(ref transfers) => {
                        let shapes = |t: &Transfer| -> Vec<(Vec<i64>, Kind)> {
                            let mb = batches.get(t.mb).map_or(self.no_micro(), MicroShape::of);
                            self.boundary(t.boundary, mb, false, false)
                                .into_iter()
                                .map(|(_, s, k)| (s, k))
                                .collect()
                        };
                        wire.post(transfers, &shapes, device)?;
                    }
                }
            }
            wire.finish()
        })
    }
}
