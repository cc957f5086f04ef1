//! AdamW with f32 master weights, the warmup + cosine learning-rate schedule, and
//! gradient-norm clipping — in two forms:
//!
//! - [`AdamW`], per parameter: the reference the tests hold the parallel trainer to (the
//!   one-process [`crate::train::Trainer`] uses it). It follows PyTorch's single-tensor AdamW
//!   step for step (decoupled decay, `lerp` for the first moment, bias corrections as in
//!   `torch.optim.AdamW`); it matches PyTorch up to rounding, since tch's
//!   `addcmul_`/`addcdiv_` take no scalar and the scale is folded into an operand.
//! - [`FlatAdamW`], what every rank trains with: parameters, master weights and moments are
//!   views into one contiguous buffer per gradient bucket ([`crate::buckets`]), and a step is
//!   two calls of ATen's fused AdamW (parameters with and without weight decay), plus one
//!   copy per bucket refreshing the bf16 parameters from their f32 masters. The gradient
//!   norm and the clip never leave the device ([`clip_scale`]).
//!
//! The two agree up to rounding: on CPU the fused kernel computes the moments bit for bit as
//! the reference does, but its square root is the correctly rounded one (the reference's
//! `sqrt` kernel may differ in the last bit) and it forms the update as
//! `p + (−lr/bc1 · m) / denom` instead of `p + m / (denom · −bc1/lr)`: each parameter moves
//! by its update ± about one ulp of the update per step. The clip is applied inside the
//! kernel as a division of the gradient by `(norm + 1e-6) / clip` (how torch.amp unscales),
//! where the reference multiplies by its reciprocal: again one rounding apart.
//!
//! When parameters compute in bf16, the optimizer keeps an f32 master copy of each, updates
//! it, and writes it back rounded (Micikevicius et al. 2018).
//!
//! **The distributed optimizer** ([`FlatAdamW::new_sharded`], `parallel.shard_optimizer`,
//! ZeRO-1 / Megatron's distributed optimizer): each data-parallel replica keeps the f32
//! masters and both moments of its shard of every bucket only ([`BucketLayout::shard`];
//! buckets padded to a multiple of dp), updates that shard from the reduce-scattered
//! gradients ([`GradSync::new_sharded`]), refreshes its part of the compute-dtype parameters
//! from it, and all-gathers the parameters over the data-parallel group
//! ([`Communicator::all_gather_start`], in place). The buckets are updated in reverse order —
//! the last holds the first layers, which the next forward needs first — and each bucket's
//! all-gather starts as soon as its update is done, overlapping the updates of the
//! remaining buckets; [`FlatAdamW::finish_gathers`] waits for them. The update is element
//! by element, so a shard's new values are the bits the unsharded optimizer computes from
//! the same gradients; weight decay applies per element through the decay ranges clipped
//! to the shard.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use tch::{Kind, Tensor};
use weaver_models::nn::{Param, ParamStore};
use weaver_parallel::comm::{Communicator, Work};

use crate::buckets::{clip, BucketLayout, Segment};
use crate::error::WorkerError;
use crate::grads::GradSync;
use crate::shim::{self, AdamWArgs};

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay (applied to parameters marked `decay`).
    pub weight_decay: f64,
}

/// Per-parameter state.
#[derive(Debug)]
pub struct ParamState {
    /// f32 master copy when the parameter itself is not f32.
    pub master: Option<Tensor>,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of parameters (the order of the store).
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    /// State of each parameter, in the store's order.
    pub states: Vec<ParamState>,
}

impl AdamW {
    /// Fresh state for `params`.
    pub fn new(cfg: AdamWConfig, params: &[Param]) -> Result<AdamW, tch::TchError> {
        let states = params
            .iter()
            .map(|p| {
                let t = &p.tensor;
                let master = if t.kind() == Kind::Float {
                    None
                } else {
                    Some(t.f_detach()?.f_to_kind(Kind::Float)?)
                };
                Ok(ParamState {
                    master,
                    exp_avg: t.f_zeros_like()?.f_to_kind(Kind::Float)?,
                    exp_avg_sq: t.f_zeros_like()?.f_to_kind(Kind::Float)?,
                })
            })
            .collect::<Result<Vec<_>, tch::TchError>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            states,
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone
    /// (as PyTorch does).
    pub fn step(&mut self, params: &[Param], lr: f64) -> Result<(), tch::TchError> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for (p, s) in params.iter().zip(self.states.iter_mut()) {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.f_to_kind(Kind::Float)?;
                let mut master = match &s.master {
                    Some(m) => m.shallow_clone(),
                    None => p.tensor.shallow_clone(),
                };
                if p.decay && c.weight_decay != 0.0 {
                    let _ = master.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                // In place, one temporary (the denominator): these passes over every
                // parameter are memory-bound, and each temporary costs a full pass more.
                let _ = s.exp_avg.f_lerp_(&grad, 1.0 - c.beta1)?;
                let _ = s.exp_avg_sq.f_mul_scalar_(c.beta2)?;
                let _ = s
                    .exp_avg_sq
                    .f_addcmul_(&grad, &grad.f_mul_scalar(1.0 - c.beta2)?)?;
                if lr != 0.0 {
                    let mut denom = s.exp_avg_sq.f_sqrt()?;
                    let _ = denom.f_div_scalar_(bc2_sqrt)?;
                    let _ = denom.f_add_scalar_(c.eps)?;
                    // p − (lr / bc1) · m / denom  =  p + m / (denom · (−bc1 / lr))
                    let _ = denom.f_mul_scalar_(-bc1 / lr)?;
                    let _ = master.f_addcdiv_(&s.exp_avg, &denom)?;
                }
                if s.master.is_some() {
                    let mut dst = p.tensor.shallow_clone();
                    dst.f_copy_(&master)?;
                }
            }
            Ok(())
        })
    }
}

/// Where one parameter's state lives in the flat buffers.
#[derive(Debug, Clone)]
struct Place {
    bucket: usize,
    offset: i64,
    numel: i64,
    shape: Vec<i64>,
}

/// The flat buffers of one bucket.
#[derive(Debug)]
struct FlatBucket {
    /// The parameters (their storage), in the compute dtype: the whole bucket (padded when
    /// the optimizer is sharded).
    params: Tensor,
    /// The range of `params` this rank updates (its shard; the whole bucket unsharded).
    shard: Range<i64>,
    /// The parameters' part in `shard`, in the compute dtype (a view of `params`).
    params_shard: Tensor,
    /// f32 master weights of the shard when the compute dtype is not f32.
    master: Option<Tensor>,
    /// Moments of the shard.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// The (decay, lr group) segments of the shard (shard coordinates; see
    /// [`crate::buckets`]).
    segments: Vec<Segment>,
}

impl FlatBucket {
    /// The f32 values the update applies to: the masters, or the f32 parameters (the
    /// shard's).
    fn values(&self) -> &Tensor {
        self.master.as_ref().unwrap_or(&self.params_shard)
    }
}

/// The part of one parameter's optimizer state a rank holds ([`FlatAdamW::state_part`]):
/// elements `range` of the parameter (flattened, row-major), as flat f32 views.
#[derive(Debug)]
pub struct StatePart {
    /// Which elements of the parameter's (local) flattened tensor.
    pub range: Range<i64>,
    /// The f32 values (masters, or the f32 parameters themselves).
    pub value: Tensor,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

/// One parameter's optimizer state: views into the flat buffers (f32).
#[derive(Debug)]
pub struct StateView {
    /// The f32 value (the master weight, or the parameter itself when it is f32).
    pub value: Tensor,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

/// AdamW over flat buffers laid out like the gradient buckets (see the module docs).
#[derive(Debug)]
pub struct FlatAdamW {
    cfg: AdamWConfig,
    step: u64,
    /// The step count as the fused kernel reads it (f32, on the device).
    step_t: Tensor,
    buckets: Vec<FlatBucket>,
    /// Each parameter's place; `None` for a frozen one (in no bucket: no state).
    places: Vec<Option<Place>>,
    /// The learning-rate multiplier of each lr group (`train.lr_mult`).
    lr_mults: Vec<f64>,
    /// The data-parallel group the state is sharded over (the distributed optimizer).
    dp: Option<Arc<dyn Communicator>>,
    /// Parameter all-gathers in flight (the distributed optimizer's last step).
    gathers: Vec<Box<dyn Work>>,
}

impl FlatAdamW {
    /// Moves every parameter of `store` that `layout` (the gradient buckets' layout) holds
    /// into its flat buffers and creates zero moments and, for non-f32 parameters, f32
    /// masters. Parameters in no bucket are frozen: they keep their own storage and get no
    /// state. Every lr group's multiplier is 1 until [`FlatAdamW::set_lr_mults`].
    pub fn new(
        cfg: AdamWConfig,
        store: &ParamStore,
        layout: &[BucketLayout],
    ) -> Result<FlatAdamW, WorkerError> {
        FlatAdamW::build(cfg, store, layout, None)
    }

    /// The distributed optimizer (see the module docs): like [`FlatAdamW::new`], but the
    /// parameter buffers are padded to a multiple of `dp`'s size and this replica keeps the
    /// masters and moments of its shard of each bucket only. Pair it with
    /// [`GradSync::new_sharded`] over the same `dp`.
    pub fn new_sharded(
        cfg: AdamWConfig,
        store: &ParamStore,
        layout: &[BucketLayout],
        dp: Arc<dyn Communicator>,
    ) -> Result<FlatAdamW, WorkerError> {
        FlatAdamW::build(cfg, store, layout, Some(dp))
    }

    fn build(
        cfg: AdamWConfig,
        store: &ParamStore,
        layout: &[BucketLayout],
        dp: Option<Arc<dyn Communicator>>,
    ) -> Result<FlatAdamW, WorkerError> {
        let (parts, index) = dp.as_ref().map_or((1, 0), |d| (d.size(), d.rank()));
        let device = store.device;
        let n = store.params().len();
        let mut places: Vec<Option<Place>> = vec![None; n];
        let mut buckets = Vec::with_capacity(layout.len());
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (b, l) in layout.iter().enumerate() {
                let params = Tensor::f_zeros([l.padded(parts)], (store.kind, device))?;
                for s in &l.slots {
                    let p = &store.params()[s.param];
                    let shape = p.tensor.size();
                    let view = params
                        .f_narrow(0, s.offset, s.numel)?
                        .f_view(shape.as_slice())?;
                    view.shallow_clone().f_copy_(&p.tensor)?;
                    shim::set_data(&p.tensor, &view)?;
                    places[s.param] = Some(Place {
                        bucket: b,
                        offset: s.offset,
                        numel: s.numel,
                        shape,
                    });
                }
                let shard = if parts > 1 {
                    l.shard(parts, index)
                } else {
                    0..l.numel
                };
                let len = shard.end - shard.start;
                let params_shard = params.f_narrow(0, shard.start, len)?;
                let master = if store.kind == Kind::Float {
                    None
                } else {
                    Some(params_shard.f_to_kind(Kind::Float)?)
                };
                buckets.push(FlatBucket {
                    exp_avg: Tensor::f_zeros([len], (Kind::Float, device))?,
                    exp_avg_sq: Tensor::f_zeros([len], (Kind::Float, device))?,
                    segments: clip_segments(&l.segments, &shard),
                    params,
                    shard,
                    params_shard,
                    master,
                });
            }
            Ok(())
        })?;
        Ok(FlatAdamW {
            cfg,
            step: 0,
            step_t: Tensor::f_zeros([1], (Kind::Float, device))?,
            buckets,
            places,
            lr_mults: vec![1.0],
            dp,
            gathers: Vec::new(),
        })
    }

    /// Sets the learning-rate multiplier of each lr group (`mults[g]` for the parameters
    /// whose `ParamInfo::lr_group` is `g`).
    pub fn set_lr_mults(&mut self, mults: Vec<f64>) -> Result<(), WorkerError> {
        let needed = self
            .buckets
            .iter()
            .flat_map(|b| b.segments.iter().map(|s| s.lr_group + 1))
            .max()
            .unwrap_or(0);
        if mults.len() < needed {
            return Err(WorkerError::Other(format!(
                "{} learning-rate multipliers for {needed} lr groups",
                mults.len()
            )));
        }
        self.lr_mults = mults;
        Ok(())
    }

    /// Whether parameter `i` trains (has optimizer state; frozen parameters do not).
    pub fn trains(&self, i: usize) -> bool {
        matches!(self.places.get(i), Some(Some(_)))
    }

    /// Whether the state is sharded over the data-parallel group (the distributed
    /// optimizer).
    pub fn is_sharded(&self) -> bool {
        self.dp.is_some()
    }

    /// Bytes of optimizer state this rank holds: both moments and, when the parameters
    /// compute in another dtype, the f32 masters (f32 parameters are their own masters and
    /// are not counted). With the distributed optimizer, about `1/dp` of the unsharded
    /// figure (plus at most `dp − 1` padding elements per bucket).
    pub fn state_bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        self.buckets
            .iter()
            .map(|b| bytes(&b.exp_avg) + bytes(&b.exp_avg_sq) + b.master.as_ref().map_or(0, bytes))
            .sum()
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Sets the update count (resuming from a checkpoint).
    pub fn set_steps(&mut self, step: u64) -> Result<(), WorkerError> {
        self.step = step;
        let _ = self.step_t.f_fill_(step as f64)?;
        Ok(())
    }

    /// One update of every parameter with learning rate `lr` from the gradients of `grads`
    /// (laid out as this optimizer), each divided first by `grad_scale` when given (the
    /// clip, see [`clip_scale`]). No host read.
    pub fn step(
        &mut self,
        grads: &GradSync,
        lr: f64,
        grad_scale: Option<&Tensor>,
    ) -> Result<(), WorkerError> {
        let agree = grads.layout().len() == self.buckets.len()
            && self
                .buckets
                .iter()
                .enumerate()
                .all(|(b, fb)| grads.shard(b) == fb.shard);
        if !agree || grads.is_sharded() != self.is_sharded() {
            return Err(WorkerError::Other(
                "the optimizer and the gradient buckets disagree on the layout".into(),
            ));
        }
        // The parameters are written below: the last step's gathers must be done.
        self.finish_gathers()?;
        self.set_steps(self.step + 1)?;
        let c = self.cfg;
        let args = AdamWArgs {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            weight_decay: c.weight_decay,
            eps: c.eps,
        };
        let all: Vec<usize> = (0..self.buckets.len()).collect();
        let Some(dp) = self.dp.clone() else {
            // Unsharded: two kernel calls over every bucket.
            return self.update(&all, grads, args, grad_scale);
        };
        // Sharded: bucket by bucket from the last (the first layers), each bucket's
        // parameters gathered while the next is updated.
        for b in all.into_iter().rev() {
            self.update(&[b], grads, args, grad_scale)?;
            if dp.size() > 1 {
                let fb = &self.buckets[b];
                let work = dp
                    .all_gather_start(fb.params_shard.shallow_clone(), fb.params.shallow_clone())
                    .map_err(|e| WorkerError::Comm(e.to_string()))?;
                self.gathers.push(work);
            }
        }
        Ok(())
    }

    /// The fused AdamW over the shards of `buckets` (one call per (weight decay, lr group)),
    /// then the compute-dtype parameters refreshed from their masters.
    fn update(
        &self,
        buckets: &[usize],
        grads: &GradSync,
        args: AdamWArgs,
        grad_scale: Option<&Tensor>,
    ) -> Result<(), WorkerError> {
        // One fused call per (decay, lr group): key (0 with decay / 1 without, group).
        let mut lists: BTreeMap<(usize, usize), [Vec<Tensor>; 4]> = BTreeMap::new();
        for &b in buckets {
            let fb = &self.buckets[b];
            let g = grads.grad(b);
            for seg in &fb.segments {
                // Without weight decay every range of a group goes into one call.
                let k = usize::from(args.weight_decay == 0.0 || !seg.decay);
                let (start, len) = (seg.range.start, seg.range.end - seg.range.start);
                let l = lists.entry((k, seg.lr_group)).or_default();
                l[0].push(fb.values().f_narrow(0, start, len)?);
                l[1].push(g.f_narrow(0, fb.shard.start + start, len)?);
                l[2].push(fb.exp_avg.f_narrow(0, start, len)?);
                l[3].push(fb.exp_avg_sq.f_narrow(0, start, len)?);
            }
        }
        tch::no_grad(|| -> Result<(), WorkerError> {
            for (&(k, group), l) in &lists {
                let mult = self.lr_mults.get(group).copied().ok_or_else(|| {
                    WorkerError::Other(format!("no learning-rate multiplier for lr group {group}"))
                })?;
                let a = AdamWArgs {
                    // A multiplier of 1 leaves `lr` the same bits.
                    lr: args.lr * mult,
                    weight_decay: if k == 0 { args.weight_decay } else { 0.0 },
                    ..args
                };
                shim::fused_adamw(&l[0], &l[1], &l[2], &l[3], &self.step_t, a, grad_scale)?;
            }
            for &b in buckets {
                let fb = &self.buckets[b];
                if let Some(m) = &fb.master {
                    fb.params_shard.shallow_clone().f_copy_(m)?;
                }
            }
            Ok(())
        })
    }

    /// Waits for the parameter all-gathers of the last step (the distributed optimizer):
    /// on return every rank holds the whole updated parameters. Nothing to do otherwise.
    pub fn finish_gathers(&mut self) -> Result<(), WorkerError> {
        for w in self.gathers.drain(..) {
            w.wait().map_err(|e| WorkerError::Comm(e.to_string()))?;
        }
        Ok(())
    }

    /// The part of parameter `i`'s state this rank holds, as flat views of the buffers
    /// (`None` when it holds none of it: the distributed optimizer gave the parameter to
    /// other replicas). Unsharded, the whole parameter.
    pub fn state_part(&self, i: usize) -> Result<Option<StatePart>, WorkerError> {
        let p = self
            .places
            .get(i)
            .ok_or_else(|| WorkerError::Other(format!("no optimizer state for parameter {i}")))?;
        // Frozen: no state anywhere.
        let Some(p) = p else {
            return Ok(None);
        };
        let fb = &self.buckets[p.bucket];
        let start = p.offset.max(fb.shard.start);
        let end = (p.offset + p.numel).min(fb.shard.end);
        if start >= end {
            return Ok(None);
        }
        let view = |t: &Tensor| t.f_narrow(0, start - fb.shard.start, end - start);
        Ok(Some(StatePart {
            range: start - p.offset..end - p.offset,
            value: view(fb.values())?,
            exp_avg: view(&fb.exp_avg)?,
            exp_avg_sq: view(&fb.exp_avg_sq)?,
        }))
    }

    /// Sets the f32 values this rank holds of parameter `i` from `value` (the whole
    /// parameter, this rank's tensor-parallel part, f32): its masters, or its f32 values.
    /// The compute-dtype parameter itself is the caller's to set.
    pub fn load_value(&self, i: usize, value: &Tensor) -> Result<(), WorkerError> {
        if let Some(part) = self.state_part(i)? {
            let len = part.range.end - part.range.start;
            let src = value.f_reshape([-1])?.f_narrow(0, part.range.start, len)?;
            tch::no_grad(|| part.value.shallow_clone().f_copy_(&src))?;
        }
        Ok(())
    }

    /// Parameter `i`'s state, as views of the flat buffers. Unsharded only: with the
    /// distributed optimizer a rank holds a part ([`FlatAdamW::state_part`]).
    pub fn state(&self, i: usize) -> Result<StateView, WorkerError> {
        if self.is_sharded() {
            return Err(WorkerError::Other(format!(
                "parameter {i}: the sharded optimizer holds a part of each parameter's state (state_part)"
            )));
        }
        let p = self.places.get(i).and_then(Option::as_ref).ok_or_else(|| {
            WorkerError::Other(format!(
                "no optimizer state for parameter {i} (frozen, or not in this store)"
            ))
        })?;
        let fb = &self.buckets[p.bucket];
        let view = |t: &Tensor| -> Result<Tensor, WorkerError> {
            Ok(t.f_narrow(0, p.offset, p.numel)?
                .f_view(p.shape.as_slice())?)
        };
        Ok(StateView {
            value: view(fb.values())?,
            exp_avg: view(&fb.exp_avg)?,
            exp_avg_sq: view(&fb.exp_avg_sq)?,
        })
    }

    /// Whether parameters have f32 masters (they compute in another dtype).
    pub fn has_masters(&self) -> bool {
        self.buckets.iter().any(|b| b.master.is_some())
    }

    /// Writes the bf16 (compute-dtype) parameters from their masters, after the masters were
    /// loaded (resuming). With the distributed optimizer, this rank's shard of them only
    /// (the others come with the next step's all-gather).
    pub fn refresh_params(&self) -> Result<(), WorkerError> {
        tch::no_grad(|| -> Result<(), WorkerError> {
            for fb in &self.buckets {
                if let Some(m) = &fb.master {
                    fb.params_shard.shallow_clone().f_copy_(m)?;
                }
            }
            Ok(())
        })
    }
}

/// The parts of `segments` inside `within`, in the coordinates of `within` (as [`clip`]).
fn clip_segments(segments: &[Segment], within: &Range<i64>) -> Vec<Segment> {
    segments
        .iter()
        .flat_map(|seg| {
            clip(std::slice::from_ref(&seg.range), within)
                .into_iter()
                .map(|range| Segment {
                    range,
                    decay: seg.decay,
                    lr_group: seg.lr_group,
                })
        })
        .collect()
}

/// What the fused AdamW divides every gradient by to clip the global norm to `clip`
/// (PyTorch's `clip_grad_norm_`: scale by `clip / (norm + 1e-6)` when that is below 1):
/// `max(1, (norm + 1e-6) / clip)` as a one-element f32 device tensor, computed from the
/// device scalar `norm` without a host read. `None` when clipping is off.
pub fn clip_scale(norm: &Tensor, clip: f64) -> Result<Option<Tensor>, tch::TchError> {
    if clip <= 0.0 {
        return Ok(None);
    }
    Ok(Some(
        norm.f_to_kind(Kind::Float)?
            .f_add_scalar(1e-6)?
            .f_div_scalar(clip)?
            .f_clamp_min(1.0)?
            .f_reshape([1])?,
    ))
}

/// Warmup then cosine decay: `lr·(s+1)/warmup` for the first `warmup` steps, then from `lr`
/// down to `lr·min_ratio` at the last step.
pub fn lr_at(step: u64, total: u64, warmup: u64, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min = lr * min_ratio;
    min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of squared gradient entries of `params` (f64 accumulation of f32 partial sums), for
/// the global norm; parameters without a gradient count as zero.
pub fn grad_sq_sum<'a>(params: impl Iterator<Item = &'a Param>) -> Result<f64, tch::TchError> {
    let mut total = 0.0;
    for p in params {
        let g = p.tensor.grad();
        if g.defined() {
            let n = g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Float)?;
            total += n.f_double_value(&[])?;
        }
    }
    Ok(total)
}

/// Scales every gradient by `clip / (norm + 1e-6)` when the global norm exceeds `clip`
/// (PyTorch's `clip_grad_norm_`); returns the factor applied.
pub fn clip_grads(params: &[Param], norm: f64, clip: f64) -> Result<f64, tch::TchError> {
    if clip <= 0.0 {
        return Ok(1.0);
    }
    let coef = clip / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok(1.0);
    }
    tch::no_grad(|| -> Result<(), tch::TchError> {
        for p in params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(coef)?;
            }
        }
        Ok(())
    })?;
    Ok(coef)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weaver_models::nn::{Init, Shard};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(50, 100, 10, 1.0, 0.1) < 1.0);
    }

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float, 0);
        let w = store
            .root()
            .param("w", &[2], Shard::FULL, Init::Const(1.0), true)
            .unwrap();
        (&w * Tensor::from_slice(&[2.0f32, -4.0]))
            .sum(Kind::Float)
            .backward();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, store.params()).unwrap();
        opt.step(store.params(), 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr·g/|g| = ±lr; decay first: 1 − lr·wd.
        let expect = [1.0 - 0.01 * 0.1 - 0.01, 1.0 - 0.01 * 0.1 + 0.01];
        let got: Vec<f32> = Vec::try_from(&w).unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float, 0);
        let w = store
            .root()
            .param("w", &[2], Shard::FULL, Init::Const(1.0), true)
            .unwrap();
        (&w * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let norm = grad_sq_sum(store.params().iter()).unwrap().sqrt();
        assert!((norm - 5.0).abs() < 1e-9);
        clip_grads(store.params(), norm, 1.0).unwrap();
        let n2 = grad_sq_sum(store.params().iter()).unwrap().sqrt();
        assert!((n2 - 1.0).abs() < 1e-5);
    }

    /// A store with parameters of both decay kinds and a few sizes, with gradients in f32
    /// buckets (as the trainer lays them out).
    fn flat_setup(kind: Kind) -> (ParamStore, GradSync) {
        use crate::buckets::ParamInfo;
        use weaver_parallel::comm::SoloComm;
        let mut store = ParamStore::new(tch::Device::Cpu, kind, 3);
        let mut info = Vec::new();
        for (i, (shape, decay)) in [
            (vec![7i64, 5], true),
            (vec![5], false),
            (vec![33], true),
            (vec![3, 3], false),
        ]
        .into_iter()
        .enumerate()
        {
            let _ = store
                .root()
                .param(
                    &format!("p{i}"),
                    &shape,
                    Shard::FULL,
                    Init::Normal(0.5),
                    decay,
                )
                .unwrap();
            info.push(ParamInfo {
                layer: i / 2,
                numel: shape.iter().product(),
                sharded: false,
                decay,
                lr_group: 0,
                frozen: false,
            });
        }
        // Two buckets (64 bytes = 16 f32 per bucket, rounded up by parameter).
        let g = GradSync::new(
            &store,
            &info,
            std::sync::Arc::new(SoloComm::new()),
            64,
            false,
            1,
        )
        .unwrap();
        (store, g)
    }

    fn fill_grads(store: &ParamStore, seed: i64) {
        tch::manual_seed(seed);
        tch::no_grad(|| {
            for p in store.params() {
                let mut g = p.tensor.grad();
                g.copy_(&Tensor::randn(g.size(), (Kind::Float, tch::Device::Cpu)));
            }
        });
    }

    const CFG: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-8,
        weight_decay: 0.05,
    };

    #[test]
    fn flat_adamw_matches_a_hand_computed_step() {
        let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float, 0);
        let _ = store
            .root()
            .param("w", &[2], Shard::FULL, Init::Const(1.0), true)
            .unwrap();
        let info = [crate::buckets::ParamInfo {
            layer: 0,
            numel: 2,
            sharded: false,
            decay: true,
            lr_group: 0,
            frozen: false,
        }];
        let g = GradSync::new(
            &store,
            &info,
            std::sync::Arc::new(weaver_parallel::comm::SoloComm::new()),
            1 << 20,
            false,
            1,
        )
        .unwrap();
        let mut opt = FlatAdamW::new(
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            &store,
            g.layout(),
        )
        .unwrap();
        let w = &store.params()[0].tensor;
        (w * Tensor::from_slice(&[2.0f32, -4.0]))
            .sum(Kind::Float)
            .backward();
        opt.step(&g, 0.01, None).unwrap();
        let expect = [1.0 - 0.01 * 0.1 - 0.01, 1.0 - 0.01 * 0.1 + 0.01];
        let got: Vec<f32> = Vec::try_from(w).unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn flat_adamw_tracks_the_reference_within_rounding() {
        let (store, grads) = flat_setup(Kind::Float);
        // The reference on copies of the same parameters.
        let mut ref_store = ParamStore::new(tch::Device::Cpu, Kind::Float, 3);
        for p in store.params() {
            let _ = ref_store
                .root()
                .param(
                    &p.name,
                    &p.tensor.size(),
                    Shard::FULL,
                    Init::Normal(0.5),
                    p.decay,
                )
                .unwrap();
        }
        let mut flat = FlatAdamW::new(CFG, &store, grads.layout()).unwrap();
        let mut reference = AdamW::new(CFG, ref_store.params()).unwrap();
        for step in 0..6 {
            fill_grads(&store, step);
            fill_grads_like(&store, &ref_store);
            let lr = 1e-2 * (step + 1) as f64;
            // Clip at a bound the gradients exceed: both sides scale them.
            let norm = grad_sq_sum(ref_store.params().iter()).unwrap().sqrt();
            clip_grads(ref_store.params(), norm, 1.0).unwrap();
            let device_norm = grads.norm_sq(true).unwrap().sqrt();
            assert!((device_norm.double_value(&[]) - norm).abs() < 1e-5 * norm);
            let scale = clip_scale(&device_norm, 1.0).unwrap();
            flat.step(&grads, lr, scale.as_ref()).unwrap();
            reference.step(ref_store.params(), lr).unwrap();
        }
        // Documented in the module: each step moves a parameter by its update ± about one
        // ulp of the update (≤ lr ≈ 6e-2 here, so ~1e-8), and the clip's scale differs by
        // one rounding; over 6 steps that stays far below 1e-6 on values of magnitude ~1,
        // while a wrong decay mask, bias correction or missed clip moves them by ≥ 1e-4.
        for (a, b) in store.params().iter().zip(ref_store.params()) {
            let d = (&a.tensor - &b.tensor).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{}: {d:e}", a.name);
        }
    }

    fn fill_grads_like(src: &ParamStore, dst: &ParamStore) {
        for (a, b) in src.params().iter().zip(dst.params()) {
            if !b.tensor.grad().defined() {
                (&b.tensor * 0.0).sum(Kind::Float).backward();
            }
            tch::no_grad(|| b.tensor.grad().copy_(&a.tensor.grad()));
        }
    }

    #[test]
    fn flat_adamw_equals_fused_adamw_per_tensor_bit_for_bit() {
        // Bucketing only changes which elements one kernel call covers: the element-wise
        // update is the same bits.
        let (store, grads) = flat_setup(Kind::Float);
        let mut flat = FlatAdamW::new(CFG, &store, grads.layout()).unwrap();
        let copies: Vec<Tensor> = store
            .params()
            .iter()
            .map(|p| p.tensor.detach().copy())
            .collect();
        let m: Vec<Tensor> = copies.iter().map(|c| c.zeros_like()).collect();
        let v: Vec<Tensor> = copies.iter().map(|c| c.zeros_like()).collect();
        let step = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
        for s in 0..3 {
            fill_grads(&store, 10 + s);
            let g: Vec<Tensor> = store
                .params()
                .iter()
                .map(|p| p.tensor.grad().copy())
                .collect();
            flat.step(&grads, 3e-3, None).unwrap();
            let _ = step.shallow_clone().fill_((s + 1) as f64);
            for (i, p) in store.params().iter().enumerate() {
                let args = AdamWArgs {
                    lr: 3e-3,
                    beta1: CFG.beta1,
                    beta2: CFG.beta2,
                    weight_decay: if p.decay { CFG.weight_decay } else { 0.0 },
                    eps: CFG.eps,
                };
                let one = |t: &Tensor| vec![t.shallow_clone()];
                shim::fused_adamw(
                    &one(&copies[i]),
                    &one(&g[i]),
                    &one(&m[i]),
                    &one(&v[i]),
                    &step,
                    args,
                    None,
                )
                .unwrap();
            }
        }
        for (p, c) in store.params().iter().zip(&copies) {
            assert!(p.tensor.equal(c), "{}", p.name);
        }
    }

    #[test]
    fn bf16_parameters_are_their_rounded_f32_masters() {
        let (store, grads) = flat_setup(Kind::BFloat16);
        let mut flat = FlatAdamW::new(CFG, &store, grads.layout()).unwrap();
        assert!(flat.has_masters());
        fill_grads(&store, 1);
        flat.step(&grads, 1e-2, None).unwrap();
        for (i, p) in store.params().iter().enumerate() {
            let st = flat.state(i).unwrap();
            assert_eq!(st.value.kind(), Kind::Float);
            assert!(
                p.tensor.equal(&st.value.to_kind(Kind::BFloat16)),
                "{}",
                p.name
            );
        }
    }
}
