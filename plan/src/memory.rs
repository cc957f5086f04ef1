//! The memory of one rank, counted from the model's tensors.
//!
//! **State** (held from start to end): parameters in the compute dtype, f32 main gradients
//! (the trainer's flat gradient buckets: every parameter's gradient is a view of an f32
//! bucket, persistent, also for bf16 parameters), f32 master weights when the compute dtype
//! is not f32, and AdamW's two f32 moments. With `shard_optimizer` each data-parallel rank
//! keeps `1/dp` of the masters and moments (Megatron's distributed optimizer; the gradient
//! buffer stays whole, reduce-scattered in place).
//!
//! **Activations** are what autograd keeps from a micro-batch's forward until its backward,
//! counted tensor by tensor from `weaver_models::model` (what each op saves for its
//! backward, and every residual-stream tensor), per sub-block of a layer:
//!
//! | sub-block | kept (elements; `R` rows, `S` tokens, `d` width, `t` = tp) |
//! |---|---|
//! | self-attention | its input (the residual, saved by the norm), the norm's mean and rstd (f32), the norm's output `R·S·d` (saved by q, k, v), q, k, v and the attention output `4·R·S·d/t` (saved by the fused attention, the output also by the out-projection), the log-sum-exp `R·(h/t)·S` (f32), a float copy of an explicit mask (prefix fusion, padding masks) |
//! | cross-attention | the same with q and the output over the text and k, v over the memory `2·M·n·d/t` (`M` its rows: `R`, or `R/2` when the matching negatives roll their queries onto the pairs' memory); open_clip's memory norm adds `M·n·dm` per layer; the gate saves its input |
//! | MLP | its input, the norm's statistics and output, the first linear's output and the activation's output `2·R·S·r·d/t` (QuickGELU keeps its sigmoid too: `3·…`) |
//!
//! With sequence parallelism the residuals and the norms' statistics are split `1/t` over
//! the sequence; the all-gathered norm outputs that the column-parallel linears save stay
//! whole (what autograd keeps when the gather sits before the linear). The tape's cuts
//! keep no values of their own (`weaver_parallel::tp`: a shard is seeded through its
//! autograd node). Each cross-attention gathers the memory for its k and v projections,
//! which save that whole copy (without SP they share the one memory); the pooling and the
//! heads gather their stream whole (their norms keep it); pipeline boundaries carry the
//! shards. Selective
//! recomputation drops what the attention core keeps beyond its inputs and output (the
//! log-sum-exp and the mask copy: with fused attention there are no `S²` scores to drop).
//! Full recomputation keeps only each layer's input (and the memory the decoder attends to,
//! once) and recomputes one layer at a time before its backward.
//!
//! The pieces between towers (patch embedding, pooling, the LM head's logits and its
//! cross-entropy, the matching negatives) are counted the same way. The `weaver-models`
//! test `activation_memory` measures these counts on a CPU (every tensor libtorch
//! allocates, through `weaver_prof::cpu_memory`): what a stage keeps within 1% (measured
//! within 0.1% on every stage of `debug` and `small`), forward peaks and a whole rank's
//! steady-state peak within 15%.
//!
//! **Pipeline**: a rank's chunks run its micro-batches as its schedule says (the same
//! `weaver_config::pp::Schedule` the trainer executes); the peak is found by replaying the
//! rank's actions: each forward adds its chunk's kept activations, each backward frees them,
//! with the forward's and backward's working memory on top at their worst moments.
//!
//! **Working memory** is what a step allocates above the kept activations at its worst
//! moment: a sub-block's temporaries in the forward, the logits and their softmax on the
//! last stage, a layer's gradients in flight in the backward (with full recomputation, the
//! layer recomputed), the received gradient of a stage's output. The optimizer's step runs
//! in place over the flat buffers (ATen's fused AdamW) and adds nothing that outlasts it.
//!
//! **Data** is the input batches resident on the rank: the step's micro-batches (images in
//! f32, tokens and the EOS position in int64), and on a CPU the `data.prefetch` steps the
//! loader prepares ahead (on a GPU those wait in pinned host memory, outside the device).
//!
//! **Reserve** is what the device holds outside the tensor allocator (CUDA context, NCCL
//! buffers, the allocator's fragmentation), a stated figure, 0 on a CPU:
//! [`MemoryBreakdown::allocated`] is the figure a rank reports as `peak_mem_bytes`.
//!
//! **Measured on the trainer**: `bench/memory` runs the `small` flavor with `weaver
//! launch` for layouts (dp, tp, pp under 1F1B, GPipe and interleaved, and their
//! combinations) and holds every rank's reported peak against
//! `MemoryModel::rank(pp).allocated()`: all within 1.3%, full and selective recomputation
//! and the sharded optimizer (dp = 2, 4) included (README, "Memory, measured").
//! Sequence parallelism's rows (tp = 2, pp = 2 × tp = 2, and dp = 2 × tp = 2 with the
//! sharded optimizer and selective recomputation) too.

use std::ops::Range;

use weaver_config::config::{
    Activation, Fusion, JobConfig, ModelConfig, MultimodalBlock, PadMask, Recompute, VisionPool,
};
use weaver_config::layers::{ActField, LayerKind};
use weaver_config::layout::ParallelLayout;
use weaver_config::pp::{Action, Schedule};

use crate::error::PlanError;
use crate::hardware::DeviceKind;

/// What the activations depend on besides the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActSpec {
    /// Samples per micro-batch.
    pub mbs: usize,
    /// Whether the matching loss doubles the multimodal layers' pairs.
    pub itm: bool,
    /// Groups of extra text rows the objectives add (MLM, VQA: [`objective_rows`]), each one
    /// more row per sample in the text and multimodal layers and through the LM head.
    pub extra: usize,
    /// Bytes per element of the compute dtype (4 for f32, 2 for bf16).
    pub dtype_bytes: u64,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// Sequence parallelism.
    pub sp: bool,
    /// Recomputation.
    pub recompute: Recompute,
}

/// One micro-batch's activations in one chunk (a contiguous range of layers) of a rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkActivations {
    /// Bytes kept from the micro-batch's forward until its backward (the chunk's received
    /// inputs included).
    pub kept: u64,
    /// Bytes above `kept` at the worst moment of the forward (temporaries of the largest
    /// sub-block, the logits and their softmax on the last stage).
    pub forward_working: u64,
    /// Bytes above everything live at the worst moment of the backward (gradients in
    /// flight, a recomputed layer).
    pub backward_working: u64,
}

/// The memory of one rank, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBreakdown {
    /// Parameters in the compute dtype.
    pub params: u64,
    /// f32 main gradients.
    pub grads: u64,
    /// f32 master weights (compute dtype not f32) and AdamW's moments.
    pub optimizer: u64,
    /// One micro-batch's kept activations (of the rank's largest chunk).
    pub activations: u64,
    /// The other micro-batches the schedule holds at the peak.
    pub in_flight: u64,
    /// Temporaries at the peak (a layer's backward, logits, a recomputed layer).
    pub working: u64,
    /// The step's input batches (on a CPU also the ones prepared ahead).
    pub data: u64,
    /// Outside the tensor allocator (CUDA context, NCCL buffers); 0 on a CPU.
    pub reserve: u64,
    /// The distillation teacher on the ranks of the last stage ([`teacher_bytes`]): its
    /// weights and one micro-batch's forward without a tape; 0 elsewhere and without
    /// `[distill]`.
    pub teacher: u64,
}

impl MemoryBreakdown {
    /// What the tensor allocator holds at the peak (CUDA's `max_memory_allocated`; on a CPU
    /// the counted live tensor bytes).
    pub fn allocated(&self) -> u64 {
        self.params
            + self.grads
            + self.optimizer
            + self.activations
            + self.in_flight
            + self.working
            + self.data
            + self.teacher
    }

    /// The device memory the rank needs.
    pub fn total(&self) -> u64 {
        self.allocated() + self.reserve
    }
}

/// Everything the memory model needs to know about a job on a layout.
#[derive(Debug, Clone)]
pub struct MemoryModel<'a> {
    job: &'a JobConfig,
    layout: &'a ParallelLayout,
    schedule: Schedule,
    spec: ActSpec,
    kind: DeviceKind,
    reserve: u64,
    /// The teacher's bytes on a last-stage rank (0 without `[distill]`).
    teacher: u64,
}

impl<'a> MemoryModel<'a> {
    /// The model of `job` on `layout` (which must come from `ParallelLayout::new(job, ..)`),
    /// on devices of `kind` with `reserve` bytes outside the allocator.
    pub fn new(
        job: &'a JobConfig,
        layout: &'a ParallelLayout,
        kind: DeviceKind,
        reserve: u64,
    ) -> Result<MemoryModel<'a>, PlanError> {
        let p = &job.parallel;
        let schedule = Schedule::new(layout.kind, p.pp, p.microbatches, layout.chunks)
            .map_err(|e| PlanError::BadLayout(e.to_string()))?;
        let spec = ActSpec {
            mbs: job.micro_batch_size(),
            itm: job.train.itm_weight > 0.0,
            extra: objective_rows(job),
            dtype_bytes: dtype_bytes(&job.train.dtype, kind),
            tp: p.tp,
            sp: p.sequence_parallel && p.tp > 1,
            recompute: p.recompute,
        };
        let teacher = teacher_bytes(job, kind)?;
        Ok(MemoryModel {
            job,
            layout,
            schedule,
            spec,
            kind,
            reserve,
            teacher,
        })
    }

    /// The activation spec in use.
    pub fn spec(&self) -> ActSpec {
        self.spec
    }

    /// Parameter elements pipeline rank `pp` holds (one tensor-parallel rank's part).
    pub fn rank_params(&self, pp: usize) -> u64 {
        let cfg = &self.job.model;
        self.layout
            .rank_stages(pp)
            .into_iter()
            .flatten()
            .map(|i| cfg.layer_params(i).local(self.spec.tp))
            .sum()
    }

    /// The memory of pipeline rank `pp` (every tensor- and data-parallel rank of it holds
    /// the same).
    pub fn rank(&self, pp: usize) -> MemoryBreakdown {
        let p = &self.job.parallel;
        let n = self.rank_params(pp);
        let c = self.spec.dtype_bytes;
        let shard = |x: u64| {
            if p.shard_optimizer {
                x.div_ceil(p.dp as u64)
            } else {
                x
            }
        };
        let masters = if c == 4 { 0 } else { shard(n) * 4 };
        let moments = 2 * shard(n) * 4;
        let chunks: Vec<ChunkActivations> = self
            .layout
            .rank_stages(pp)
            .into_iter()
            .map(|r| chunk_activations(&self.job.model, r, &self.spec))
            .collect();
        let peak = replay(&self.schedule, pp, &chunks);
        let one = chunks.iter().map(|a| a.kept).max().unwrap_or(0);
        let activations = one.min(peak.live);
        MemoryBreakdown {
            params: n * c,
            grads: n * 4,
            optimizer: masters + moments,
            activations,
            in_flight: peak.live - activations,
            working: peak.working,
            data: self.data_bytes(),
            reserve: self.reserve,
            teacher: if self.holds_last_layer(pp) {
                self.teacher
            } else {
                0
            },
        }
    }

    /// Whether pipeline rank `pp` holds the model's last layer (where the losses, and a
    /// distillation teacher, are).
    fn holds_last_layer(&self, pp: usize) -> bool {
        let last = self.job.model.num_layers() - 1;
        self.layout
            .rank_stages(pp)
            .into_iter()
            .any(|r| r.contains(&last))
    }

    /// The rank with the most memory, and its breakdown.
    pub fn worst(&self) -> (usize, MemoryBreakdown) {
        (0..self.job.parallel.pp)
            .map(|r| (r, self.rank(r)))
            .max_by_key(|(_, m)| m.total())
            .unwrap_or((0, MemoryBreakdown::default()))
    }

    /// Input batches resident on a rank: the step's micro-batches, and on a CPU the
    /// `data.prefetch` steps prepared ahead (on a GPU those wait in pinned host memory).
    fn data_bytes(&self) -> u64 {
        let cfg = &self.job.model;
        let per_rank = (self.job.train.global_batch / self.job.parallel.dp) as u64;
        let image = 3 * (cfg.image_size * cfg.image_size) as u64 * 4;
        // Tokens and the EOS position, int64; each objective's input and target rows.
        let text = (cfg.max_text_len as u64 * (1 + 2 * self.spec.extra as u64) + 1) * 8;
        let steps = match self.kind {
            DeviceKind::Gpu => 1,
            DeviceKind::Cpu => 1 + self.job.data.prefetch as u64,
        };
        steps * per_rank * (image + text)
    }
}

/// The distillation teacher's model as the planner counts it: `distill.flavor`'s defaults
/// with the student's input shapes (image size, channels, text length, vocabulary), which
/// the teacher must share (checked when it is loaded). None without `[distill]`.
pub fn teacher_model(job: &JobConfig) -> Result<Option<ModelConfig>, PlanError> {
    let d = &job.distill;
    if !d.enabled() {
        return Ok(None);
    }
    let flavor = d.flavor.trim();
    if flavor.is_empty() {
        return Err(PlanError::Config(weaver_config::ConfigError::BadConfig {
            key: "distill.flavor".into(),
            message: format!(
                "the planner counts the teacher's memory on the last-stage ranks but cannot open its checkpoint {}: set distill.flavor to the teacher's flavor (it must agree with the checkpoint's)",
                d.teacher
            ),
        }));
    }
    let s = &job.model;
    Ok(Some(ModelConfig {
        image_size: s.image_size,
        channels: s.channels,
        max_text_len: s.max_text_len,
        vocab_size: s.vocab_size,
        ..ModelConfig::flavor(flavor)?
    }))
}

/// The distillation teacher's forward on a rank of the student's last stage, as the memory
/// and time models count it: its model ([`teacher_model`]), its tensor-parallel size `tp`
/// and the data-parallel `replicas` sharing its group
/// ([`DistillSection::teacher_group`]), its dtype's bytes (bf16 on a GPU, the run's dtype
/// on a CPU: `weaver_worker::distill`), and the activation spec of its forward: the
/// positive pairs only (no matching negatives, no objective rows) of the replicas' `r · B`
/// rows, not sequence-parallel.
///
/// [`DistillSection::teacher_group`]: weaver_config::distill::DistillSection::teacher_group
#[derive(Debug, Clone)]
pub(crate) struct TeacherForward {
    pub(crate) cfg: ModelConfig,
    pub(crate) tp: usize,
    pub(crate) replicas: usize,
    pub(crate) bytes: u64,
    pub(crate) spec: ActSpec,
}

/// [`TeacherForward`] of `job` on devices of `kind` (`None` without `[distill]`); a
/// `teacher_tp` the layout does not fit, or that cannot split the teacher, is a layout
/// error, as the worker's is.
pub(crate) fn teacher_forward(
    job: &JobConfig,
    kind: DeviceKind,
) -> Result<Option<TeacherForward>, PlanError> {
    let Some(cfg) = teacher_model(job)? else {
        return Ok(None);
    };
    let (tp, replicas) = job
        .distill
        .teacher_group(job.parallel.tp, job.parallel.dp)
        .map_err(PlanError::BadLayout)?;
    if let Some((name, n)) = cfg.limits().undivided(tp) {
        return Err(PlanError::BadLayout(format!(
            "{tp} ranks cannot split the distillation teacher (flavor {}): {tp} does not divide its {name} = {n}; set distill.teacher_tp to 1 (whole on every rank) or to a size that divides it",
            cfg.flavor
        )));
    }
    let bytes = match kind {
        DeviceKind::Gpu => 2,
        DeviceKind::Cpu => dtype_bytes(&job.train.dtype, kind),
    };
    let spec = ActSpec {
        mbs: job.micro_batch_size() * replicas,
        itm: false,
        extra: 0,
        dtype_bytes: bytes,
        tp,
        sp: false,
        recompute: Recompute::None,
    };
    Ok(Some(TeacherForward {
        cfg,
        tp,
        replicas,
        bytes,
        spec,
    }))
}

/// Bytes per row of the inputs that replicas sharing a teacher gather: the image (in the
/// compute dtype of `bytes` per element), the tokens and the EOS position (int64).
pub(crate) fn gathered_input_bytes(cfg: &ModelConfig, bytes: u64) -> u64 {
    (cfg.channels * cfg.image_size * cfg.image_size) as u64 * bytes
        + 8 * (cfg.max_text_len as u64 + 1)
}

/// Bytes of the distillation teacher on a rank of the student's last stage (0 without
/// `[distill]`): its weights in its dtype (bf16 on a GPU, the run's dtype on a CPU:
/// `weaver_worker::distill`) — this rank's `1/k` of them when it is split over `k =
/// distill.teacher_tp` ranks ([`DistillSection::teacher_group`]: by default the student's
/// tensor-parallel group), all of them when whole — plus one forward without a tape, split
/// the same way, of the micro-batches of the `r` replicas sharing its group (`r · B` rows,
/// their inputs gathered) — the worst layer's input and everything that layer makes (an
/// upper bound: without a tape the forward frees most of it as it goes) — plus its outputs
/// held for the student's losses (f32: the `B × B` similarities, the caption
/// log-probabilities `B × (T − 1) × V / tp` with the caption KL, the embeddings with
/// feature matching). A `teacher_tp` that cannot split the teacher, or that the layout
/// does not fit, is a layout error, as the worker's is.
///
/// [`DistillSection::teacher_group`]: weaver_config::distill::DistillSection::teacher_group
pub fn teacher_bytes(job: &JobConfig, kind: DeviceKind) -> Result<u64, PlanError> {
    let Some(TeacherForward {
        cfg,
        tp,
        replicas,
        bytes,
        spec,
    }) = teacher_forward(job, kind)?
    else {
        return Ok(0);
    };
    let d = &job.distill;
    let student_tp = job.parallel.tp.max(1);
    let forward = (0..cfg.num_layers())
        .map(|i| {
            let a = chunk_activations(&cfg, i..i + 1, &spec);
            a.kept + a.forward_working
        })
        .max()
        .unwrap_or(0);
    let b = job.micro_batch_size() as u64;
    let mut outputs = b * b * 4;
    if replicas > 1 {
        outputs += spec.mbs as u64 * gathered_input_bytes(&cfg, bytes);
    }
    if d.caption_kl_weight > 0.0 {
        // This rank's slice of the student's vocabulary (both ways).
        outputs += b * (cfg.max_text_len as u64 - 1) * (cfg.vocab_size / student_tp) as u64 * 4;
    }
    if d.projects() {
        outputs += 2 * b * cfg.embed_dim as u64 * 4;
    }
    let weights: u64 = if tp == 1 {
        cfg.num_params()
    } else {
        (0..cfg.num_layers())
            .map(|i| cfg.layer_params(i).local(tp))
            .sum()
    };
    Ok(weights * bytes + forward + outputs)
}

/// Groups of extra text rows a job's micro-batches carry: one for MLM (`train.mlm_weight >
/// 0`) and one for VQA (`train.vqa_weight > 0`), as `weaver_models::objectives` adds them.
pub fn objective_rows(job: &JobConfig) -> usize {
    usize::from(job.train.mlm_weight > 0.0) + usize::from(job.train.vqa_weight > 0.0)
}

/// Bytes per element of the compute dtype: `auto` is bf16 on GPUs, f32 on CPUs.
pub fn dtype_bytes(dtype: &str, kind: DeviceKind) -> u64 {
    match (dtype, kind) {
        ("f32", _) | ("auto", DeviceKind::Cpu) => 4,
        _ => 2,
    }
}

/// The peak of one rank's actions: bytes live at that moment and the working memory on top.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Peak {
    live: u64,
    working: u64,
}

/// Replays `rank`'s actions: a forward keeps its chunk's activations until the backward of
/// the same micro-batch and chunk.
fn replay(schedule: &Schedule, rank: usize, chunks: &[ChunkActivations]) -> Peak {
    let mut live = 0u64;
    let mut best = Peak::default();
    let mut consider = |live: u64, working: u64| {
        if live + working > best.live + best.working {
            best = Peak { live, working };
        }
    };
    for a in &schedule.actions[rank] {
        match *a {
            Action::Forward { chunk, .. } => {
                let c = chunks[chunk];
                live += c.kept;
                consider(live, c.forward_working);
            }
            Action::Backward { chunk, .. } => {
                let c = chunks[chunk];
                consider(live, c.backward_working);
                live = live.saturating_sub(c.kept);
            }
            Action::Comm(_) => {}
        }
    }
    best
}

/// The three kinds of sub-block a layer is made of.
#[derive(Debug, Clone, Copy)]
enum Sub {
    /// Self-attention over `s` tokens of width `d`, `h` heads `a` wide in all
    /// (`model.*_head_dim`); `mask` elements of an explicit mask (0: none, or causal by
    /// flag).
    SelfAttn {
        s: u64,
        d: u64,
        h: u64,
        a: u64,
        mask: u64,
    },
    /// Cross-attention of `s` text tokens (width `d`, `h` heads `a` wide in all) over `n`
    /// memory tokens of width `dm`; open_clip's memory norm; Flamingo's gate.
    Cross {
        s: u64,
        d: u64,
        h: u64,
        a: u64,
        n: u64,
        dm: u64,
        /// The memory's rows: the stream's, or half of them when the matching negatives
        /// roll their queries onto the pairs' memory instead of doubling it.
        memory_rows: u64,
        ln_kv: bool,
        gated: bool,
    },
    /// MLP of width `d` over `s` tokens.
    Mlp { s: u64, d: u64 },
}

/// Counts bytes of one micro-batch's tensors.
#[derive(Debug, Clone, Copy)]
struct Counter<'c> {
    cfg: &'c ModelConfig,
    spec: &'c ActSpec,
}

impl Counter<'_> {
    /// Compute-dtype bytes of `elements`.
    fn el(&self, elements: u64) -> u64 {
        elements * self.spec.dtype_bytes
    }

    fn tp(&self) -> u64 {
        self.spec.tp as u64
    }

    /// Rows of the objectives' extra text (MLM, VQA) in a micro-batch.
    fn extra_rows(&self) -> u64 {
        self.spec.extra as u64 * self.spec.mbs as u64
    }

    /// Rows of the multimodal layers: the pairs (doubled by the matching negatives) and the
    /// objectives' rows.
    fn mm_rows(&self) -> u64 {
        let b = self.spec.mbs as u64;
        (if self.spec.itm { 2 * b } else { b }) + self.extra_rows()
    }

    /// Whether the multimodal layers' memory is a concatenation made for their extra rows
    /// (objective rows, or the matching negatives under prefix fusion) rather than the
    /// image encoder's output itself (`weaver_models::model`'s `enter_multimodal`).
    fn memory_joined(&self) -> bool {
        self.spec.extra > 0 || (self.spec.itm && self.cfg.fusion == Fusion::Prefix)
    }

    /// Elements of a residual `rows × s × d`, split over the sequence with SP.
    fn residual(&self, rows: u64, s: u64, d: u64) -> u64 {
        if self.spec.sp {
            rows * s.div_ceil(self.tp()) * d
        } else {
            rows * s * d
        }
    }

    /// A layer norm's mean and rstd (f32) over `rows × s` positions (split with SP).
    fn ln_stats(&self, rows: u64, s: u64) -> u64 {
        let positions = if self.spec.sp {
            rows * s.div_ceil(self.tp())
        } else {
            rows * s
        };
        2 * positions * 4
    }

    /// What a sub-block keeps besides its input (the residual before it), in bytes; and
    /// the part of it selective recomputation drops.
    fn sub_kept(&self, rows: u64, sub: Sub) -> (u64, u64) {
        let t = self.tp();
        let r = self.cfg.mlp_ratio as u64;
        match sub {
            Sub::SelfAttn { s, d, h, a, mask } => {
                let core = rows * (h / t) * s * 4 + self.el(mask);
                // The normed input (saved by q, k, v), then q, k, v and the heads' output.
                let kept = self.ln_stats(rows, s)
                    + self.el(rows * s * d)
                    + self.el(4 * rows * s * a / t)
                    + core;
                (kept, core)
            }
            Sub::Cross {
                s,
                d,
                h,
                a,
                n,
                dm,
                memory_rows: m,
                ln_kv,
                gated,
            } => {
                let core = rows * (h / t) * s * 4;
                let mut kept = self.ln_stats(rows, s)
                    + self.el(rows * s * d)
                    + self.el(2 * rows * s * a / t + 2 * m * n * a / t)
                    + core;
                if ln_kv {
                    // The memory norm works on the memory's shard with SP.
                    kept += self.el(self.residual(m, n, dm)) + self.ln_stats(m, n);
                }
                if self.spec.sp {
                    // Each layer gathers the memory for its k and v projections (they save
                    // the gathered copy; without SP they share the one memory).
                    kept += self.el(m * n.div_ceil(t) * t * dm);
                }
                if gated {
                    kept += self.el(self.residual(rows, s, d));
                }
                (kept, core)
            }
            Sub::Mlp { s, d } => {
                let hidden = match self.cfg.activation {
                    Activation::Gelu => 2,
                    Activation::QuickGelu => 3,
                };
                let kept = self.ln_stats(rows, s)
                    + self.el(rows * s * d)
                    + self.el(hidden * rows * s * r * d / t);
                (kept, 0)
            }
        }
    }

    /// The sub-blocks of layer `i`, its stream's rows, tokens and width.
    fn layer_shape(&self, i: usize) -> (Vec<Sub>, u64, u64, u64) {
        let c = self.cfg;
        let b = self.spec.mbs as u64;
        let (dv, dt) = (c.vision_width as u64, c.text_width as u64);
        match c.layer_kind(i) {
            LayerKind::Vision => {
                let s = c.vision_seq_len() as u64;
                let h = c.vision_heads as u64;
                (
                    vec![
                        Sub::SelfAttn {
                            s,
                            d: dv,
                            h,
                            a: c.vision_attn_width() as u64,
                            mask: 0,
                        },
                        Sub::Mlp { s, d: dv },
                    ],
                    b,
                    s,
                    dv,
                )
            }
            LayerKind::Unimodal => {
                let s = c.text_seq_len() as u64;
                let h = c.text_heads as u64;
                let a = c.text_attn_width() as u64;
                // The captions and the objectives' rows. A padding mask (or the objectives'
                // mixed causal and bidirectional one) is an explicit `[B, 1, S, S]` mask,
                // converted to the compute dtype by every attention call.
                let rows = b + self.extra_rows();
                let mask = if c.text_pad_mask == PadMask::None && self.spec.extra == 0 {
                    0
                } else {
                    rows * s * s
                };
                (
                    vec![
                        Sub::SelfAttn {
                            s,
                            d: dt,
                            h,
                            a,
                            mask,
                        },
                        Sub::Mlp { s, d: dt },
                    ],
                    rows,
                    s,
                    dt,
                )
            }
            LayerKind::Multimodal => {
                let rows = self.mm_rows();
                let t = c.max_text_len as u64;
                let h = c.text_heads as u64;
                let a = c.text_attn_width() as u64;
                let (n, dm) = (c.memory_len() as u64, c.memory_width() as u64);
                if c.fusion == Fusion::Prefix {
                    let s = n + t;
                    return (
                        vec![
                            Sub::SelfAttn {
                                s,
                                d: dt,
                                h,
                                a,
                                mask: s * s,
                            },
                            Sub::Mlp { s, d: dt },
                        ],
                        rows,
                        s,
                        dt,
                    );
                }
                let cross = Sub::Cross {
                    s: t,
                    d: dt,
                    h,
                    a,
                    n,
                    dm,
                    memory_rows: if self.spec.extra == 0 { b } else { rows },
                    ln_kv: c.multimodal_block == MultimodalBlock::OpenClip,
                    gated: c.fusion == Fusion::GatedCrossAttention,
                };
                // With the objectives' rows the causal mask is an explicit one.
                let attn = Sub::SelfAttn {
                    s: t,
                    d: dt,
                    h,
                    a,
                    mask: if self.spec.extra > 0 { rows * t * t } else { 0 },
                };
                let mlp = Sub::Mlp { s: t, d: dt };
                let subs = match c.multimodal_block {
                    MultimodalBlock::Compact => vec![attn, cross, mlp],
                    MultimodalBlock::OpenClip => vec![attn, mlp, cross, mlp],
                };
                (subs, rows, t, dt)
            }
        }
    }

    /// Layer `i`'s block: (kept besides its input and output, of which selective drops,
    /// its output, forward working memory, backward working memory).
    fn block(&self, i: usize) -> (u64, u64, u64, u64, u64) {
        let (subs, rows, s, d) = self.layer_shape(i);
        let residual = self.el(self.residual(rows, s, d));
        let (mut kept, mut core) = (0, 0);
        for (k, sub) in subs.iter().enumerate() {
            let (kk, cc) = self.sub_kept(rows, *sub);
            kept += kk;
            core += cc;
            if k + 1 < subs.len() {
                // The residual this sub-block writes, saved by the next one's norm.
                kept += residual;
            }
        }
        let full = self.el(rows * s * d);
        // Forward: the out-projection's partial sum and its biased result (two residuals);
        // with TP the group's sum and its straight-through form add two more.
        let forward = if self.spec.tp > 1 { 4 * full } else { 2 * full };
        // Backward, at the MLP's start: the output's gradient, the first linear's and the
        // activation's gradients.
        let r = self.cfg.mlp_ratio as u64;
        let backward = full + 2 * self.el(rows * s * r * d / self.tp());
        (kept, core, residual, forward, backward)
    }

    /// Bytes of the tensors of `boundary(layer)` (the activations entering `layer`).
    fn boundary_bytes(&self, layer: usize, fields: &[ActField]) -> u64 {
        // With SP the streams cross as sequence shards.
        let split = if self.spec.sp { self.spec.tp } else { 1 };
        self.cfg
            .boundary_rows_split(layer, self.spec.mbs, self.spec.itm, self.spec.extra, split)
            .into_iter()
            .filter(|(f, _, _)| fields.contains(f))
            .map(|(_, shape, f32)| {
                let n: i64 = shape.iter().product();
                n.max(0) as u64 * if f32 { 4 } else { self.spec.dtype_bytes }
            })
            .sum()
    }

    /// Tensors made before layer `i`'s block (embeddings, the multimodal entry) that stay
    /// until the backward, including the stream tensor the block takes as input.
    fn before(&self, i: usize) -> (u64, u64) {
        let c = self.cfg;
        let b = self.spec.mbs as u64;
        let (lv, lu) = (c.vision_layers, c.unimodal_layers);
        let mut kept = 0;
        let mut forward = 0;
        if i == 0 {
            let (np, nv, dv) = (
                c.num_patches() as u64,
                c.vision_seq_len() as u64,
                c.vision_width as u64,
            );
            // The patches (saved by the patch embedding) and the stream with positions;
            // `ln_pre` keeps its input too.
            // With SP the stream enters the split region as this rank's shard.
            kept += self.el(b * np * c.patch_dim() as u64) + self.el(self.residual(b, nv, dv));
            if c.vision_ln_pre {
                kept += self.el(b * nv * dv) + 2 * b * nv * 4;
            }
            forward += self.el(b * nv * dv);
        }
        if i == lv {
            let rows = b + self.extra_rows();
            kept += self.el(self.residual(rows, c.text_seq_len() as u64, c.text_width as u64));
            forward += self.el(rows * c.text_seq_len() as u64 * c.text_width as u64);
        }
        if i == lv + lu && c.multimodal_layers > 0 {
            let (n, dm) = (c.memory_len() as u64, c.memory_width() as u64);
            let (t, dt) = (c.max_text_len as u64, c.text_width as u64);
            let rows = self.mm_rows();
            if self.spec.itm || self.spec.extra > 0 {
                // Each caption with the next image, each objective row with its own: the
                // text concatenated with its negatives and the objectives' rows; the
                // memory too, unless the negatives alone roll onto the pairs' memory in
                // the cross-attention (prefix fusion always joins the images).
                kept += self.el(self.residual(rows, t, dt));
                if self.memory_joined() {
                    kept += self.el(self.residual(rows, n, dm));
                    forward += self.el(b * n * dm);
                }
            }
            if c.fusion == Fusion::Prefix {
                // The projected image tokens prepended to the text.
                kept += self.el(rows * (n + t) * dt);
                forward += self.el(rows * n * dt);
            }
        }
        (kept, forward)
    }

    /// Tensors made after layer `i`'s block (pooling, the heads and losses) that stay until
    /// the backward, and the forward's working memory there.
    fn after(&self, i: usize, chunk_end: usize) -> (u64, u64) {
        let c = self.cfg;
        let b = self.spec.mbs as u64;
        let t = self.tp();
        let e = c.embed_dim as u64;
        let (lv, lu) = (c.vision_layers, c.unimodal_layers);
        let mut kept = 0;
        let mut forward = 0;
        // An embedding: the projection, its f32 copy for a bf16 model, the normalised rows.
        let emb = |x: &Self| {
            x.el(b * e)
                + if x.spec.dtype_bytes == 4 {
                    0
                } else {
                    b * e * 4
                }
                + b * e * 4
        };
        if i + 1 == lv {
            let (nv, dv) = (c.vision_seq_len() as u64, c.vision_width as u64);
            if self.spec.sp {
                // The image stream gathered whole for the pooling (its norm keeps it).
                kept += self.el(b * nv * dv);
            }
            match c.vision_pool {
                VisionPool::Attentional => {
                    let q = c.attn_pool_queries as u64;
                    let h = c.attn_pool_heads as u64;
                    let ap = c.attn_pool_width() as u64;
                    // ln_k's statistics and output (saved by k and v), the expanded queries
                    // copied for the q projection, q / k / v / output, log-sum-exp, the
                    // pooled queries (saved by the final norm) and the norm's output (the
                    // embedding's row and the decoder's memory).
                    kept += 2 * b * nv * 4
                        + self.el(b * nv * dv)
                        + self.el(b * q * e)
                        + self.el((2 * b * q * ap + 2 * b * nv * ap) / t)
                        + b * (h / t) * q * 4
                        + self.el(b * q * e)
                        + 2 * b * q * 4
                        + self.el(b * q * e);
                    forward += self.el(2 * b * q * e);
                }
                pool => {
                    // ln_post's statistics and output: the memory (unless the matching
                    // negatives replace it with their concatenation in this chunk), and
                    // whenever the class token's row (a view of it) is the embedding.
                    let first_mm = lv + lu;
                    let replaced = self.spec.itm && self.memory_joined() && first_mm < chunk_end;
                    let keep_output =
                        (c.multimodal_layers > 0 && !replaced) || pool == VisionPool::ClassToken;
                    kept += 2 * b * nv * 4;
                    if keep_output {
                        // With SP the memory is kept as this rank's shard.
                        kept += self.el(self.residual(b, nv, dv));
                    }
                    if pool == VisionPool::Mean {
                        kept += self.el(b * dv);
                    }
                    forward += self.el(b * nv * dv);
                }
            }
            kept += emb(self);
        }
        if i + 1 == lv + lu {
            let dt = c.text_width as u64;
            // The pooled row (saved by the norm), its statistics and output.
            kept += self.el(b * dt) + 2 * b * 4 + self.el(b * dt) + emb(self);
        }
        if i + 1 == c.num_layers() && c.multimodal_layers > 0 {
            let rows = self.mm_rows();
            let tt = c.max_text_len as u64;
            let s = if c.fusion == Fusion::Prefix {
                c.memory_len() as u64 + tt
            } else {
                tt
            };
            let (dt, v) = (c.text_width as u64, c.vocab_size as u64);
            // The final norm's statistics and output; the positive pairs' first t − 1
            // positions copied for the LM head; the f32 log-softmax (TP: the exponentials)
            // of the logits.
            let logits = b * (tt - 1) * (v / t);
            kept += 2 * rows * s * 4 + self.el(rows * s * dt) + self.el(b * (tt - 1) * dt);
            if self.spec.sp {
                // The text stream gathered whole for the heads (the final norm keeps it).
                kept += self.el(rows * s * dt);
            }
            kept += logits * 4;
            // Each objective's rows through the LM head at every position: the f32
            // log-softmax of their logits (the rows themselves are views of the norm's
            // output).
            let objective_logits = self.extra_rows() * tt * (v / t);
            kept += objective_logits * 4;
            // The logits in the compute dtype and in f32 while the softmax is formed (TP:
            // the shifted logits too).
            let f32_copy = if self.spec.dtype_bytes == 4 {
                0
            } else {
                logits * 4
            };
            forward += self.el(logits) + f32_copy + if t > 1 { logits * 4 } else { 0 };
            if self.spec.itm && c.itm_head {
                // The EOS rows of every pair, saved by the matching head.
                kept += self.el(rows * dt) + rows * 2 * 4;
            }
            // Contrastive similarities and their log-softmax, both directions.
            kept += 2 * b * b * 4;
        }
        (kept, forward)
    }
}

/// One micro-batch through `layers` (a chunk).
pub fn chunk_activations(
    cfg: &ModelConfig,
    layers: Range<usize>,
    spec: &ActSpec,
) -> ChunkActivations {
    let k = Counter { cfg, spec };
    let (a, e) = (layers.start, layers.end);
    let all = [
        ActField::Image,
        ActField::Text,
        ActField::ImageEmb,
        ActField::TextEmb,
    ];
    // The received inputs (the first stage's are the data batch, counted apart).
    let received = if a > 0 { k.boundary_bytes(a, &all) } else { 0 };
    let mut out = ChunkActivations::default();
    match spec.recompute {
        Recompute::None | Recompute::Selective => {
            let mut kept = received;
            let mut forward = 0u64;
            let mut backward = 0u64;
            for i in a..e {
                let (bk, bf) = k.before(i);
                let (block, core, output, f, bw) = k.block(i);
                let (ak, af) = k.after(i, e);
                let block = if spec.recompute == Recompute::Selective {
                    block - core
                } else {
                    block
                };
                kept += bk + block + output + ak;
                forward = forward.max(f).max(bf).max(af);
                backward = backward.max(bw);
            }
            out.kept = kept;
            out.forward_working = forward;
            out.backward_working = backward;
        }
        Recompute::Full => {
            // Each layer's input stream; the memory and the embeddings once; one layer at a
            // time recomputed whole before its backward.
            let mut kept = received;
            let mut seen: Vec<(ActField, Vec<i64>)> = if a > 0 {
                cfg.boundary_rows(a, spec.mbs, spec.itm, spec.extra)
                    .into_iter()
                    .map(|(f, s, _)| (f, s))
                    .collect()
            } else {
                Vec::new()
            };
            for i in a + 1..=e.min(cfg.num_layers() - 1) {
                for (f, shape, f32) in cfg.boundary_rows(i, spec.mbs, spec.itm, spec.extra) {
                    let n: i64 = shape.iter().product();
                    let bytes = n.max(0) as u64 * if f32 { 4 } else { spec.dtype_bytes };
                    let stream =
                        f == ActField::Text || (f == ActField::Image && i < cfg.vision_layers);
                    if stream {
                        kept += bytes;
                    } else if !seen.contains(&(f, shape.clone())) {
                        kept += bytes;
                        seen.push((f, shape));
                    }
                }
            }
            let mut recomputed = 0u64;
            for i in a..e {
                let (bk, _) = k.before(i);
                let (block, _, output, _, bw) = k.block(i);
                let (ak, af) = k.after(i, e);
                recomputed = recomputed.max(bk + block + output + ak + bw.max(af));
            }
            out.kept = kept;
            out.forward_working = k.block(a).3;
            out.backward_working = recomputed;
        }
    }
    // A pipeline stage receives the gradient of its output before its backward.
    if e < cfg.num_layers() {
        out.backward_working += k.boundary_bytes(e, &all);
    }
    out
}

/// The tensors tensor parallelism reduces in layer `i` for one micro-batch, in elements:
/// one per sub-block (self-attention, cross-attention, MLP), the sub-block's output over
/// its stream (`rows × tokens × width`). The forward all-reduces each once (the
/// row-parallel output), the backward once more (the column-parallel input's gradient);
/// with sequence parallelism an all-gather and a reduce-scatter of the same size replace
/// each all-reduce.
pub fn tp_reduced_elements(cfg: &ModelConfig, i: usize, spec: &ActSpec) -> Vec<u64> {
    let k = Counter { cfg, spec };
    let (subs, rows, s, d) = k.layer_shape(i);
    subs.iter().map(|_| rows * s * d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weaver_config::config::Features;

    fn job(sets: &[&str]) -> JobConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        JobConfig::parse_with(
            "[model]\nflavor = \"small\"\n[train]\nglobal_batch = 16\n",
            &sets,
            Features::ALL,
        )
        .unwrap()
    }

    fn spec(recompute: Recompute) -> ActSpec {
        ActSpec {
            mbs: 2,
            itm: true,
            extra: 0,
            dtype_bytes: 4,
            tp: 1,
            sp: false,
            recompute,
        }
    }

    /// A vision block in the middle of the small model's tower (width 256, MLP 1024, 8
    /// heads), counted by hand in units of one `b × s × d` f32 tensor: the norm's output
    /// (saved by q, k, v), q, k, v and the attention output, the residual after attention,
    /// the MLP norm's output, the first linear's and GELU's outputs (4 wide each), the
    /// block's output: 1 + 4 + 1 + 1 + 8 + 1 = 16; plus the two norms' mean and rstd and
    /// the attention's log-sum-exp per head; plus the received input.
    #[test]
    fn a_vision_block_by_hand() {
        let cfg = ModelConfig::flavor("small").unwrap();
        let (b, s, d, h) = (2u64, cfg.vision_seq_len() as u64, 256u64, 8u64);
        let unit = b * s * d * 4;
        let stats = 2 * 2 * b * s * 4;
        let lse = b * h * s * 4;
        let none = chunk_activations(&cfg, 1..2, &spec(Recompute::None));
        assert_eq!(none.kept, unit + 16 * unit + stats + lse);
        // Selective drops the attention core's log-sum-exp (fused attention keeps no S²
        // scores).
        let sel = chunk_activations(&cfg, 1..2, &spec(Recompute::Selective));
        assert_eq!(sel.kept, none.kept - lse);
        // Full keeps each layer's input and the chunk's output: three streams for two
        // layers, and recomputes one layer at a time before its backward.
        let full = chunk_activations(&cfg, 1..3, &spec(Recompute::Full));
        assert_eq!(full.kept, 3 * unit);
        assert!(full.backward_working >= 16 * unit);
        // Tensor parallelism splits q, k, v, the attention output and the MLP's hidden
        // activations (12 of the 16 units) and the heads; sequence parallelism also the
        // residuals and the norms' statistics.
        let tp2 = ActSpec {
            tp: 2,
            ..spec(Recompute::None)
        };
        let t = chunk_activations(&cfg, 1..2, &tp2);
        assert_eq!(t.kept, unit + 4 * unit + 6 * unit + stats + lse / 2);
        // The received input crosses the pipeline boundary as a shard too.
        let sp = chunk_activations(&cfg, 1..2, &ActSpec { sp: true, ..tp2 });
        let half = |x: u64| x * s.div_ceil(2) / s;
        assert_eq!(
            sp.kept,
            half(unit) + 2 * unit + 2 * half(unit) + 6 * unit + half(stats) + lse / 2
        );
    }

    /// The distillation teacher counts on the last stage's ranks only: its weights in its
    /// dtype and one tape-free forward; a memory that fits the student alone on one device
    /// does not fit it with its teacher, and the planner says so instead of choosing it.
    #[test]
    fn a_distillation_teacher_counts_on_the_last_stage() {
        let student = [
            "model.flavor=debug",
            "parallel.pp=2",
            "parallel.microbatches=2",
        ];
        let distill = [
            "distill.teacher=/nowhere/teacher",
            "distill.flavor=small",
            "distill.caption_kl_weight=1",
        ];
        let alone = job(&student);
        let with = job(&[&student[..], &distill[..]].concat());
        let teacher = ModelConfig::flavor("small").unwrap().num_params();
        for (kind, bytes) in [(DeviceKind::Cpu, 4), (DeviceKind::Gpu, 2)] {
            let t = teacher_bytes(&with, kind).unwrap();
            assert!(
                t > teacher * bytes,
                "{t}: weights alone are {}",
                teacher * bytes
            );
            // Weights plus one micro-batch: far below what training the teacher would take.
            assert!(t < teacher * (bytes + 4 + 8) / 2, "{t}");
            assert_eq!(teacher_bytes(&alone, kind).unwrap(), 0);
        }
        let l = ParallelLayout::new(&with, 2).unwrap();
        let m = MemoryModel::new(&with, &l, DeviceKind::Cpu, 0).unwrap();
        let m0 = MemoryModel::new(&alone, &l, DeviceKind::Cpu, 0).unwrap();
        let t = teacher_bytes(&with, DeviceKind::Cpu).unwrap();
        assert_eq!(
            m.rank(0),
            m0.rank(0),
            "the first stage never sees the teacher"
        );
        assert_eq!(m.rank(1).teacher, t);
        assert_eq!(m.rank(1).allocated(), m0.rank(1).allocated() + t);
        // Without the teacher's flavor the planner cannot count it: a clear error.
        let blind = job(&[&student[..], &distill[..1]].concat());
        let e = MemoryModel::new(&blind, &l, DeviceKind::Cpu, 0).unwrap_err();
        assert!(e.to_string().contains("distill.flavor"), "{e}");
        // One CPU device whose memory holds the student alone with room to spare, but not
        // the student and its teacher.
        let one = |j: &JobConfig| {
            let mut j = j.clone();
            j.file.parallel.pp = 1;
            j.file.parallel.microbatches = 1;
            JobConfig::from_file_config_with(j.file, Features::ALL).unwrap()
        };
        let (alone1, with1) = (one(&alone), one(&with));
        let l1 = ParallelLayout::new(&alone1, 1).unwrap();
        let need = MemoryModel::new(&alone1, &l1, DeviceKind::Cpu, 0)
            .unwrap()
            .worst()
            .1
            .total();
        let mut hw = crate::Hardware::cpu(1, 1, 0);
        // Usable is 90 % of the memory (the headroom).
        hw.memory_bytes = ((need + t / 2) as f64 / (1.0 - hw.headroom)) as u64;
        let hw = hw;
        let usable = hw.usable_bytes();
        assert!(usable >= need && usable < need + t, "{usable} {need} {t}");
        assert!(crate::plan(&alone1, &hw, Features::ALL).is_ok());
        match crate::plan(&with1, &hw, Features::ALL) {
            Err(PlanError::NothingFits { .. }) => {}
            other => panic!("a layout that cannot hold the teacher was planned: {other:?}"),
        }
    }

    /// Split over the student's tp group (the default), each rank holds about `1/tp` of the
    /// teacher: under tp 2 more than half of its weights' bytes (the norms, positions and
    /// the temperature stay whole) and under 60 % of what the whole teacher counts;
    /// replicated, a rank holds it whole, as without tensor parallelism.
    #[test]
    fn a_teacher_split_over_tp_counts_its_share() {
        let base = [
            "model.flavor=debug",
            "distill.teacher=/nowhere/teacher",
            "distill.flavor=small",
            "distill.feature_weight=1",
        ];
        let t1 = teacher_bytes(&job(&base), DeviceKind::Gpu).unwrap();
        let tp2 = job(&[&base[..], &["parallel.tp=2"]].concat());
        let split = teacher_bytes(&tp2, DeviceKind::Gpu).unwrap();
        let rep = teacher_bytes(
            &job(&[&base[..], &["parallel.tp=2", "distill.teacher_tp=1"]].concat()),
            DeviceKind::Gpu,
        )
        .unwrap();
        assert_eq!(rep, t1, "replicated, a tp rank holds the whole teacher");
        let w = ModelConfig::flavor("small").unwrap().num_params() * 2;
        assert!(
            2 * split > w && 10 * split < 6 * t1,
            "split {split} of {t1} (weights {w})"
        );
        // Over 2 ranks of 2 replicas (tp 1, dp 2): the weights of the split over tp 2, the
        // forward of both replicas' micro-batches on those ranks, and their gathered inputs.
        let across = job(&[&base[..], &["parallel.dp=2", "distill.teacher_tp=2"]].concat());
        let a = teacher_bytes(&across, DeviceKind::Gpu).unwrap();
        assert!(a < t1 && 2 * a > w, "across replicas {a} of {t1}");
        // A group the layout cannot form is the layout's error (a written layout is refused
        // by the config already; a planned candidate gets here).
        let mut odd = job(&[&base[..], &["parallel.dp=2"]].concat());
        odd.distill.teacher_tp = 3;
        let e = teacher_bytes(&odd, DeviceKind::Gpu).unwrap_err();
        assert!(e.to_string().contains("teacher_tp"), "{e}");
    }

    #[test]
    fn state_memory_per_dtype_and_sharding() {
        let j = job(&[]);
        let l = ParallelLayout::new(&j, 1).unwrap();
        let n = j.model.num_params();
        let cpu = MemoryModel::new(&j, &l, DeviceKind::Cpu, 0)
            .unwrap()
            .rank(0);
        // f32: parameters, f32 gradients, two moments; no masters.
        assert_eq!(
            (cpu.params, cpu.grads, cpu.optimizer),
            (4 * n, 4 * n, 8 * n)
        );
        let gpu = MemoryModel::new(&j, &l, DeviceKind::Gpu, 7)
            .unwrap()
            .rank(0);
        // bf16 (auto on a GPU): bf16 parameters, f32 gradients, f32 masters and moments.
        assert_eq!(
            (gpu.params, gpu.grads, gpu.optimizer),
            (2 * n, 4 * n, 12 * n)
        );
        assert_eq!(gpu.total(), gpu.allocated() + 7);
        let j = job(&["parallel.dp=8", "parallel.shard_optimizer=true"]);
        let l = ParallelLayout::new(&j, 8).unwrap();
        let m = MemoryModel::new(&j, &l, DeviceKind::Gpu, 0)
            .unwrap()
            .rank(0);
        assert_eq!(m.optimizer, 12 * n.div_ceil(8));
        assert_eq!(m.grads, 4 * n);
    }

    #[test]
    fn the_objectives_rows_are_counted_in_the_text_layers_and_the_head() {
        let base = job(&[]);
        let on = job(&["train.mlm_weight=0.5", "train.vqa_weight=0.5"]);
        assert_eq!((objective_rows(&base), objective_rows(&on)), (0, 2));
        let l = ParallelLayout::new(&base, 1).unwrap();
        let m0 = MemoryModel::new(&base, &l, DeviceKind::Cpu, 0).unwrap();
        let m1 = MemoryModel::new(&on, &l, DeviceKind::Cpu, 0).unwrap();
        assert_eq!(m1.spec().extra, 2);
        let cfg = &base.model;
        let lv = cfg.vision_layers;
        let act =
            |m: &MemoryModel, r: std::ops::Range<usize>| chunk_activations(cfg, r, &m.spec()).kept;
        // What a chunk starting at `layer` receives (f32 everywhere on a CPU).
        let received = |layer: usize, extra: usize| -> u64 {
            cfg.boundary_rows(layer, m0.spec().mbs, true, extra)
                .iter()
                .map(|(_, shape, _)| shape.iter().product::<i64>() as u64 * 4)
                .sum()
        };
        // The vision tower does not see them; a text layer's own tensors are at least three
        // times as many (three rows a sample instead of one, and their explicit mask).
        assert_eq!(act(&m0, 1..2), act(&m1, 1..2));
        let (t0, t1) = (
            act(&m0, lv + 1..lv + 2) - received(lv + 1, 0),
            act(&m1, lv + 1..lv + 2) - received(lv + 1, 2),
        );
        assert!(t1 >= 3 * t0, "{t1} vs {t0}");
        let n = cfg.num_layers();
        assert!(act(&m1, n - 1..n) > act(&m0, n - 1..n));
        assert!(m1.rank(0).allocated() > m0.rank(0).allocated());
    }

    #[test]
    fn pipeline_ranks_hold_what_their_schedule_keeps_in_flight() {
        let run = |schedule: &str| {
            let j = job(&[
                "parallel.pp=2",
                "parallel.microbatches=4",
                &format!("parallel.schedule=\"{schedule}\""),
            ]);
            let l = ParallelLayout::new(&j, 2).unwrap();
            let one = chunk_activations(
                &j.model,
                l.stages[0].clone(),
                &MemoryModel::new(&j, &l, DeviceKind::Cpu, 0).unwrap().spec(),
            );
            let m = MemoryModel::new(&j, &l, DeviceKind::Cpu, 0)
                .unwrap()
                .rank(0);
            (one.kept, m)
        };
        // 1F1B: the first of two stages holds pp − 0 = 2 micro-batches at its peak.
        let (one, m) = run("1f1b");
        assert_eq!(m.activations, one);
        assert_eq!(m.in_flight, one);
        // GPipe: all four.
        let (one, m) = run("gpipe");
        assert_eq!(m.activations + m.in_flight, 4 * one);
    }
}
