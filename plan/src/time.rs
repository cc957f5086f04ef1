//! The time of one training step of a layout, from FLOPs, communication volumes and the
//! pipeline's bubble. Every assumption is stated here and printed with a plan.
//!
//! - **Compute**: each rank's layers' forward FLOPs ([`ModelConfig::layer_flops`], the same
//!   count as the MFU metric) × 3 (forward and a backward of twice the work) ÷ tp, at
//!   `peak_tflops × mfu`. Full recomputation adds one forward, selective the attention cores'
//!   ([`ModelConfig::attention_core_flops`]).
//! - **The objectives' rows** (MLM, VQA: `train.mlm_weight`, `train.vqa_weight` > 0): one
//!   more row per sample each through the text and multimodal layers and the LM head
//!   ([`objective_flops`]), with their all-reduces and pipeline boundaries grown alike.
//! - **Tensor parallelism**: per sub-block (attention, cross-attention, MLP) one all-reduce
//!   of its output in the forward and one of its input's gradient in the backward (one more
//!   forward's worth with full recomputation), ring cost `2(t−1)/t · bytes` over the
//!   intra-node link (TP stays inside a node); sequence parallelism moves the same volume
//!   as an all-gather and a reduce-scatter. Not overlapped with compute. The vocabulary-split
//!   embedding's and LM head's collectives are left out (small next to the blocks').
//! - **Pipeline**: each chunk boundary sends its activations forward and their gradient
//!   back once per micro-batch (bytes ÷ link + latency; the inter-node link when a pipeline
//!   group spans nodes), on the critical path. The bubble is `(pp − 1)` micro-batch times
//!   for GPipe and 1F1B, `(pp − 1)/v` for the interleaved schedule with `v` chunks.
//! - **Data parallelism**: the rank's f32 gradients all-reduced (ring `2(d−1)/d`), or with
//!   the sharded optimizer reduce-scattered in f32 and the updated parameters all-gathered
//!   in the compute dtype (`(d−1)/d` each), over the inter-node link when the job spans
//!   nodes. The gradient reduction overlaps the last micro-batch's backward (buckets start as
//!   their layers finish); what exceeds it is exposed. The all-gather is not overlapped.
//! - **Optimizer**: AdamW on the rank's (shard of the) parameters, bound by memory
//!   bandwidth: the gradient, master, two moments read and the master, moments and
//!   parameter written, `28 + c` bytes per element (`c` the compute dtype's size).
//! - **Distillation teacher** (`[distill]`): its forward on every micro-batch, on the
//!   pipeline rank holding the student's last layer only — its layers' forward FLOPs (the
//!   encoders only without the caption KL; positive pairs only) on the `r · B` rows of the
//!   `r` replicas sharing its group, ÷ its tp `k = distill.teacher_tp` (by default the
//!   student's), and with a split teacher one all-reduce per sub-block (forward only) over
//!   its group, in its dtype (bf16 on a GPU), plus the all-gather of the replicas' inputs.
//!   It counts in that rank's micro-batch time, so it lengthens the bubble of a pipeline too.

use weaver_config::config::{JobConfig, ModelConfig, Recompute};
use weaver_config::layers::{ActField, LayerKind};
use weaver_config::layout::ParallelLayout;
use weaver_config::pp::ScheduleKind;

use crate::hardware::Hardware;
use crate::memory::{
    dtype_bytes, gathered_input_bytes, objective_rows, teacher_forward, tp_reduced_elements,
    ActSpec, TeacherForward,
};

/// One step's time, seconds, by where it goes (they add up to [`StepTime::total`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTime {
    /// Forward and backward FLOPs of the slowest pipeline rank, all micro-batches.
    pub compute: f64,
    /// Recomputation's extra forward work.
    pub recompute: f64,
    /// Tensor-parallel collectives.
    pub tp_comm: f64,
    /// Pipeline transfers on the critical path.
    pub pp_comm: f64,
    /// The pipeline's fill and drain.
    pub bubble: f64,
    /// Data-parallel gradient (and parameter) collectives not hidden by the backward.
    pub dp_comm: f64,
    /// The optimizer step.
    pub optimizer: f64,
    /// The distillation teacher's forward (compute and tensor-parallel collectives) on the
    /// slowest pipeline rank, all micro-batches (0 without `[distill]` or off that rank).
    pub teacher: f64,
}

impl StepTime {
    /// The step.
    pub fn total(&self) -> f64 {
        self.compute
            + self.recompute
            + self.tp_comm
            + self.pp_comm
            + self.bubble
            + self.dp_comm
            + self.optimizer
            + self.teacher
    }

    /// The components with their names, in printing order.
    pub fn parts(&self) -> [(&'static str, f64); 8] {
        [
            ("compute", self.compute),
            ("recompute", self.recompute),
            ("tp comm", self.tp_comm),
            ("pp comm", self.pp_comm),
            ("bubble", self.bubble),
            ("dp comm", self.dp_comm),
            ("optimizer", self.optimizer),
            ("teacher", self.teacher),
        ]
    }
}

/// Ring all-reduce of `bytes` over `n` ranks on a link of `bw` bytes/s with `latency` per
/// step.
pub fn all_reduce_s(bytes: f64, n: usize, bw: f64, latency: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n_f = n as f64;
    2.0 * (n_f - 1.0) / n_f * bytes / bw + 2.0 * (n_f - 1.0) * latency
}

/// Ring reduce-scatter or all-gather of `bytes` (the whole tensor) over `n` ranks.
pub fn gather_s(bytes: f64, n: usize, bw: f64, latency: f64) -> f64 {
    if n <= 1 {
        return 0.0;
    }
    let n_f = n as f64;
    (n_f - 1.0) / n_f * bytes / bw + (n_f - 1.0) * latency
}

/// Forward FLOPs per sample that `extra` groups of objective rows (MLM, VQA) add to layer
/// `i`, and the part of them in attention cores: each row costs what a caption row costs
/// in the text and multimodal layers (one copy of the pair, not the matching negative's),
/// and the LM head runs over all its positions.
pub fn objective_flops(cfg: &ModelConfig, i: usize, extra: usize) -> (f64, f64) {
    if extra == 0 || cfg.layer_kind(i) == LayerKind::Vision {
        return (0.0, 0.0);
    }
    let x = extra as f64;
    let mut f = cfg.layer_costs(false, 1.0)[i];
    if i + 1 == cfg.num_layers() && cfg.multimodal_layers > 0 {
        f += 2.0 * cfg.max_text_len as f64 * cfg.text_width as f64 * cfg.vocab_size as f64;
    }
    (x * f, x * cfg.attention_core_flops(i, false))
}

/// The step time of `job` on `layout` (from `ParallelLayout::new(job, hw.devices)`) and
/// `hw`; `rank_params(pp)` gives the parameter elements one rank of pipeline rank `pp`
/// holds (the memory model's count).
pub fn step_time(
    job: &JobConfig,
    layout: &ParallelLayout,
    hw: &Hardware,
    rank_params: impl Fn(usize) -> u64,
) -> StepTime {
    let p = &job.parallel;
    let cfg = &job.model;
    let itm = job.train.itm_weight > 0.0;
    let c = dtype_bytes(&job.train.dtype, hw.kind) as f64;
    let spec = ActSpec {
        mbs: job.micro_batch_size(),
        itm,
        extra: objective_rows(job),
        dtype_bytes: c as u64,
        tp: p.tp,
        sp: p.sequence_parallel && p.tp > 1,
        recompute: p.recompute,
    };
    let b = spec.mbs as f64;
    let m = p.microbatches as f64;
    let (dp, pp, tp) = (layout.dims.dp, layout.dims.pp, layout.dims.tp);
    let flops_per_s = hw.peak_tflops * 1e12 * hw.mfu;
    let node = hw.node_size();
    let intra = hw.link_bytes_per_s(false);
    let pp_link = hw.link_bytes_per_s(pp * tp > node);
    let dp_link = hw.link_bytes_per_s(dp * pp * tp > node);
    let lat = hw.latency_s;

    let teacher = teacher_forward_s(job, hw, flops_per_s, intra, lat);
    let last_layer = cfg.num_layers() - 1;
    // Per micro-batch, per pipeline rank: compute, recompute, TP and PP communication.
    let mut slowest = StepTime::default();
    let mut slowest_mb = -1.0f64;
    let mut slowest_rank = 0;
    for r in 0..pp {
        let mut mb = StepTime::default();
        if layout
            .rank_stages(r)
            .iter()
            .any(|g| g.contains(&last_layer))
        {
            mb.teacher = teacher;
        }
        for range in layout.rank_stages(r) {
            for i in range.clone() {
                let (extra, extra_core) = objective_flops(cfg, i, spec.extra);
                let f = b * (cfg.layer_flops(i, itm) + extra) / tp as f64;
                mb.compute += 3.0 * f / flops_per_s;
                mb.recompute += match p.recompute {
                    Recompute::None => 0.0,
                    Recompute::Selective => {
                        b * (cfg.attention_core_flops(i, itm) + extra_core)
                            / tp as f64
                            / flops_per_s
                    }
                    Recompute::Full => f / flops_per_s,
                };
                let per_sub = if p.recompute == Recompute::Full {
                    3.0
                } else {
                    2.0
                };
                for el in tp_reduced_elements(cfg, i, &spec) {
                    mb.tp_comm += per_sub * all_reduce_s(el as f64 * c, tp, intra, lat);
                }
            }
            // The chunk's output forward and its gradient back (the last virtual stage has
            // no successor).
            if range.end < cfg.num_layers() {
                let bytes: f64 = cfg
                    .boundary_rows(range.end, spec.mbs, itm, spec.extra)
                    .iter()
                    .map(|(f, shape, f32)| {
                        let n: i64 = shape.iter().product();
                        let el = if *f32 || matches!(f, ActField::ImageEmb | ActField::TextEmb) {
                            4.0
                        } else {
                            c
                        };
                        n.max(0) as f64 * el
                    })
                    .sum();
                mb.pp_comm += 2.0 * (bytes / pp_link + lat);
            }
        }
        let t = mb.total();
        if t > slowest_mb {
            slowest_mb = t;
            slowest = mb;
            slowest_rank = r;
        }
    }
    let bubble_mbs = match layout.kind {
        ScheduleKind::Interleaved => (pp as f64 - 1.0) / layout.chunks as f64,
        _ => pp as f64 - 1.0,
    };

    // Data parallelism and the optimizer, on the slowest rank.
    let n = rank_params(slowest_rank) as f64;
    let (dp_total, overlappable) = if p.shard_optimizer {
        (
            gather_s(4.0 * n, dp, dp_link, lat) + gather_s(c * n, dp, dp_link, lat),
            gather_s(4.0 * n, dp, dp_link, lat),
        )
    } else {
        let t = all_reduce_s(4.0 * n, dp, dp_link, lat);
        (t, t)
    };
    let window = slowest.compute * 2.0 / 3.0;
    let hidden = overlappable.min(window);
    let shard = if p.shard_optimizer { n / dp as f64 } else { n };
    StepTime {
        compute: m * slowest.compute,
        recompute: m * slowest.recompute,
        tp_comm: m * slowest.tp_comm,
        pp_comm: m * slowest.pp_comm,
        bubble: bubble_mbs * slowest_mb,
        dp_comm: dp_total - hidden,
        optimizer: shard * (28.0 + c) / (hw.memory_gbps * 1e9),
        teacher: m * slowest.teacher,
    }
}

/// Seconds of the distillation teacher's forward on one micro-batch (see the module docs);
/// 0 without `[distill]` (or a teacher the planner cannot count, which [`crate::plan`] and
/// the memory model report).
fn teacher_forward_s(
    job: &JobConfig,
    hw: &Hardware,
    flops_per_s: f64,
    intra: f64,
    lat: f64,
) -> f64 {
    let Ok(Some(TeacherForward {
        cfg: t,
        tp,
        replicas,
        bytes,
        spec,
    })) = teacher_forward(job, hw.kind)
    else {
        return 0.0;
    };
    let d = &job.distill;
    let p = &job.parallel;
    let rows = spec.mbs;
    // The group's ranks are `r` replicas' last-stage tensor-parallel groups: they share a
    // node while `r` replicas' pipelines do.
    let link = hw.link_bytes_per_s(replicas * p.pp * p.tp > hw.node_size());
    let end = if d.caption_kl_weight > 0.0 {
        t.num_layers()
    } else {
        t.vision_layers + t.unimodal_layers
    };
    let mut s = 0.0;
    if replicas > 1 {
        let input = gathered_input_bytes(&t, bytes) as f64;
        s += gather_s(rows as f64 * input, replicas, link, lat);
    }
    let link = if replicas > 1 { link } else { intra };
    for i in 0..end {
        s += rows as f64 * t.layer_flops(i, false) / tp as f64 / flops_per_s;
        for el in tp_reduced_elements(&t, i, &spec) {
            s += all_reduce_s(el as f64 * bytes as f64, tp, link, lat);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(sets: &[&str]) -> JobConfig {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        JobConfig::parse_with(
            "[train]\nglobal_batch = 64\n",
            &sets,
            weaver_config::config::Features::ALL,
        )
        .unwrap()
    }

    #[test]
    fn the_objectives_rows_cost_what_caption_rows_cost() {
        let base = job(&["model.flavor=\"small\"", "train.dtype=\"f32\""]);
        let on = job(&[
            "model.flavor=\"small\"",
            "train.dtype=\"f32\"",
            "train.mlm_weight=0.5",
            "train.vqa_weight=0.5",
        ]);
        let cfg = &base.model;
        let l = ParallelLayout::new(&base, 1).unwrap();
        let hw = Hardware::h200(1, 8);
        let n = cfg.num_params();
        let (t0, t1) = (
            step_time(&base, &l, &hw, |_| n),
            step_time(&on, &l, &hw, |_| n),
        );
        // Two more text rows per sample: twice the unimodal layers' and (without matching
        // negatives doubling them) the multimodal layers' caption work, and the LM head at
        // every position of each.
        let (lv, lu) = (cfg.vision_layers, cfg.unimodal_layers);
        let text: f64 = (lv..cfg.num_layers())
            .map(|i| cfg.layer_costs(false, 1.0)[i])
            .sum();
        let head = 2.0 * (cfg.max_text_len * cfg.text_width * cfg.vocab_size) as f64;
        let added = 3.0 * 64.0 * 2.0 * (text + head) / (989e12 * 0.45);
        assert!(
            (t1.compute - t0.compute - added).abs() < 1e-9 * added,
            "{} vs {added}",
            t1.compute - t0.compute
        );
        assert!(lu > 0 && objective_flops(cfg, 0, 2) == (0.0, 0.0));
        assert_eq!(objective_flops(cfg, lv, 0), (0.0, 0.0));
    }

    /// The teacher's forward counts on the pipeline rank holding the last layer, every
    /// micro-batch: its layers' forward FLOPs (encoders only without the caption KL), ÷ tp
    /// when split over the student's group (plus its all-reduces), whole when replicated.
    #[test]
    fn a_distillation_teacher_adds_its_forward_to_the_last_stage() {
        let student = ["model.flavor=\"debug\"", "train.dtype=\"f32\""];
        let teacher = ["distill.teacher=\"/nowhere\"", "distill.flavor=\"small\""];
        let with = |extra: &[&str]| job(&[&student[..], &teacher[..], extra].concat());
        let hw = Hardware::h200(4, 8);
        let flops_per_s = 989e12 * 0.45;
        let t = crate::memory::teacher_model(&with(&[])).unwrap().unwrap();
        let sum = |end: usize| (0..end).map(|i| t.layer_flops(i, false)).sum::<f64>();
        let encoders = sum(t.vision_layers + t.unimodal_layers);
        // pp 2, 4 micro-batches of 256 (large enough for compute to outweigh the links'
        // latency): the teacher runs on pipeline rank 1 only, which makes it the slowest.
        let pp2 = [
            "parallel.pp=2",
            "parallel.microbatches=4",
            "train.global_batch=1024",
        ];
        let j = with(&pp2);
        let l = ParallelLayout::new(&j, 2).unwrap();
        let n = j.model.num_params();
        let st = step_time(&j, &l, &hw, |_| n);
        let want = 4.0 * 256.0 * encoders / flops_per_s;
        assert!(
            (st.teacher - want).abs() < 1e-9 * want,
            "{} vs {want}",
            st.teacher
        );
        let alone = job(&[&student[..], &pp2[..]].concat());
        let st0 = step_time(&alone, &l, &hw, |_| n);
        assert_eq!(st0.teacher, 0.0);
        assert!(
            st.total() > st0.total() + st.teacher,
            "the teacher also lengthens the bubble: {st:?} vs {st0:?}"
        );
        // The caption KL runs the whole teacher.
        let c = with(&[&pp2[..], &["distill.caption_kl_weight=0.5"]].concat());
        let whole = 4.0 * 256.0 * sum(t.num_layers()) / flops_per_s;
        assert!((step_time(&c, &l, &hw, |_| n).teacher - whole).abs() < 1e-9 * whole);
        // tp 2: split, half the compute plus one all-reduce per sub-block; replicated, all
        // of the compute. (On links without latency and near-infinite bandwidth the
        // all-reduces cost nothing, leaving the compute.)
        let tp2 = with(&["parallel.tp=2", "parallel.microbatches=1"]);
        let l2 = ParallelLayout::new(&tp2, 2).unwrap();
        let one = 64.0 * encoders / flops_per_s;
        let split = step_time(&tp2, &l2, &hw, |_| n).teacher;
        let free_links = Hardware {
            latency_s: 0.0,
            intra_node_gbps: 1e12,
            ..hw.clone()
        };
        let compute = step_time(&tp2, &l2, &free_links, |_| n).teacher;
        assert!(
            (compute - one / 2.0).abs() < 1e-6 * one,
            "{compute} vs {one} / 2"
        );
        assert!(
            split > compute,
            "the split teacher's all-reduces: {split} vs {compute}"
        );
        let rep = with(&[
            "parallel.tp=2",
            "parallel.microbatches=1",
            "distill.teacher_tp=1",
        ]);
        let replicated = step_time(&rep, &l2, &hw, |_| n).teacher;
        assert!(
            (replicated - one).abs() < 1e-9 * one,
            "{replicated} vs {one}"
        );
    }

    #[test]
    fn collectives_follow_the_ring_formulas() {
        // 1 GB over 8 ranks at 1 GB/s, no latency: 2·7/8 s and 7/8 s.
        assert!((all_reduce_s(1e9, 8, 1e9, 0.0) - 1.75).abs() < 1e-12);
        assert!((gather_s(1e9, 8, 1e9, 0.0) - 0.875).abs() < 1e-12);
        assert_eq!(all_reduce_s(1e9, 1, 1e9, 1.0), 0.0);
        assert!((all_reduce_s(0.0, 4, 1e9, 1e-5) - 6e-5).abs() < 1e-15);
    }

    #[test]
    fn one_device_is_compute_and_optimizer_only() {
        let j = job(&["model.flavor=\"small\"", "train.dtype=\"f32\""]);
        let l = ParallelLayout::new(&j, 1).unwrap();
        let hw = Hardware::h200(1, 8);
        let n = j.model.num_params();
        let t = step_time(&j, &l, &hw, |_| n);
        let flops = 3.0 * 64.0 * j.model.forward_flops_per_sample(true);
        let want = flops / (989e12 * 0.45);
        assert!(
            (t.compute - want).abs() < 1e-9 * want,
            "{} vs {want}",
            t.compute
        );
        assert_eq!(
            (t.recompute, t.tp_comm, t.pp_comm, t.bubble, t.dp_comm),
            (0.0, 0.0, 0.0, 0.0, 0.0)
        );
        // f32: 32 bytes per parameter through HBM.
        assert!((t.optimizer - n as f64 * 32.0 / 4.8e12).abs() < 1e-15);
    }

    #[test]
    fn the_bubble_and_recompute_follow_the_schedule() {
        let base = [
            "model.flavor=\"small\"",
            "parallel.pp=2",
            "parallel.microbatches=4",
        ];
        let hw = Hardware::h200(2, 8);
        let run = |extra: &[&str]| {
            let mut s: Vec<&str> = base.to_vec();
            s.extend_from_slice(extra);
            let j = job(&s);
            let l = ParallelLayout::new(&j, 2).unwrap();
            step_time(&j, &l, &hw, |_| 1_000_000)
        };
        let f1b = run(&[]);
        // 1F1B: one micro-batch time of bubble per extra stage (4 micro-batches in the
        // steady part).
        let per_mb = (f1b.compute + f1b.pp_comm) / 4.0;
        assert!((f1b.bubble - per_mb).abs() < 1e-9 * per_mb);
        let inter = run(&[
            "parallel.schedule=\"interleaved\"",
            "parallel.virtual_stages=2",
        ]);
        assert!(inter.bubble < 0.75 * f1b.bubble, "{inter:?} vs {f1b:?}");
        let full = run(&["parallel.recompute=\"full\""]);
        assert!((full.recompute - f1b.compute / 3.0).abs() < 1e-9 * f1b.compute);
        let sel = run(&["parallel.recompute=\"selective\""]);
        assert!(sel.recompute > 0.0 && sel.recompute < full.recompute);
    }

    #[test]
    fn data_parallel_traffic_crosses_nodes_only_when_the_job_does() {
        let j = job(&["model.flavor=\"small\"", "parallel.dp=16"]);
        let l = ParallelLayout::new(&j, 16).unwrap();
        let one_node = step_time(&j, &l, &Hardware::h200(16, 16), |_| 1 << 30);
        let two_nodes = step_time(&j, &l, &Hardware::h200(16, 8), |_| 1 << 30);
        assert!(two_nodes.dp_comm > one_node.dp_comm);
        // 4 GiB of f32 gradients, ring over 16 at 45 GB/s, less the backward's window.
        let ring = all_reduce_s(4.0 * (1u64 << 30) as f64, 16, 360e9 / 8.0, 10e-6);
        assert!((two_nodes.dp_comm - (ring - two_nodes.compute * 2.0 / 3.0)).abs() < 1e-9);
        let sharded = job(&[
            "model.flavor=\"small\"",
            "parallel.dp=16",
            "parallel.shard_optimizer=true",
        ]);
        let t = step_time(&sharded, &l, &Hardware::h200(16, 8), |_| 1 << 30);
        assert!((t.optimizer - two_nodes.optimizer / 16.0).abs() < 1e-12);
    }
}
