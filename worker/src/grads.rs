//! The gradient synchroniser: every parameter's gradient is a view of an f32 bucket
//! ([`crate::buckets`]), so micro-batches accumulate into f32 main gradients in place (also
//! for bf16 parameters: autograd adds each bf16 gradient into the f32 view), and a bucket is
//! summed over the data-parallel group with one collective.
//!
//! Overlap (`parallel.overlap`): the schedule executor reports each layer whose backward
//! finished ([`GradSync::layer_done`]); once the last micro-batch's backward has passed every
//! layer of a bucket, the bucket's all-reduce starts ([`Communicator::all_reduce_start`]) while
//! the backward of earlier layers goes on. [`GradSync::finish`] starts whatever has not
//! started (all buckets, without overlap) and waits for all of them. Every replica of a
//! (pp, tp) cell runs the same schedule, so the buckets start in the same order everywhere,
//! as the communicator requires.
//!
//! The sum (not the mean) is taken: the backward seeds are already scaled by the global
//! number of micro-batches.
//!
//! With the distributed optimizer ([`GradSync::new_sharded`], `parallel.shard_optimizer`)
//! each bucket is padded to a multiple of the data-parallel size and reduce-scattered
//! instead ([`Communicator::reduce_scatter_start`], started at the same moments): replica
//! `d` receives the sum of its shard ([`GradSync::shard`]) in place, at the shard's offsets
//! of the same flat buffer, and the rest of its buffer keeps its own partial gradients,
//! which nothing reads. The sums are the all-reduce's: at dp = 2 bit for bit (`a + b` is
//! `b + a`); at larger dp the ring may add the replicas' values in another order (each
//! element is still one sum of dp terms, rounded at each hop).
//!
//! Sequence parallelism ([`GradSync::with_tp_sum`]): the replicated parameters a layer
//! applies to sequence shards (norms, row-parallel biases, gates) get from each TP rank the
//! gradient of its shard only; once the last micro-batch's backward has passed their layer
//! (or, for layers not reported, at [`GradSync::finish`]) their gradients are summed over the
//! TP group (one all-reduce per layer, of the flagged gradients packed together), before
//! their bucket's data-parallel reduction starts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use weaver_models::nn::ParamStore;
use weaver_parallel::comm::{Communicator, ReduceOp, Work};

use crate::buckets::{clip, plan, BucketLayout, ParamInfo};
use crate::error::WorkerError;
use crate::shim;

/// The f32 gradient buckets of one rank and their data-parallel reduction.
#[derive(Debug)]
pub struct GradSync {
    layout: Vec<BucketLayout>,
    grads: Vec<Tensor>,
    /// Where the buckets live (also when there are none: every parameter frozen).
    device: tch::Device,
    /// This replica's shard of each (padded) bucket when the optimizer is sharded.
    shards: Option<Vec<Range<i64>>>,
    dp: Arc<dyn Communicator>,
    overlap: bool,
    /// Backward passes each layer runs per step (the rank's micro-batches).
    passes: usize,
    /// Backward passes finished this step, per layer.
    done: HashMap<usize, usize>,
    started: Vec<bool>,
    works: Vec<Option<Box<dyn Work>>>,
    /// How long the last [`GradSync::finish`] waited for reductions (communication the
    /// backward did not hide).
    last_wait: Duration,
    /// Sequence parallelism: the TP group and, per layer, the gradient views summed over it.
    tp_sum: Option<TpSum>,
}

/// The gradients summed over the TP group under sequence parallelism.
#[derive(Debug)]
struct TpSum {
    tp: Arc<dyn Communicator>,
    /// Per layer, the views of its flagged parameters' gradients (in their buckets).
    views: BTreeMap<usize, Vec<Tensor>>,
    /// Layers summed this step.
    done: HashSet<usize>,
}

fn comm_err(e: weaver_parallel::comm::CommError) -> WorkerError {
    WorkerError::Comm(e.to_string())
}

impl GradSync {
    /// Buckets of at most `bucket_bytes` for the parameters of `store` (`info[i]` describes
    /// parameter `i`; frozen ones get no bucket and no gradient), each parameter's gradient
    /// set to its view; reduced over `dp`, with
    /// `passes` backward passes per layer and step.
    pub fn new(
        store: &ParamStore,
        info: &[ParamInfo],
        dp: Arc<dyn Communicator>,
        bucket_bytes: usize,
        overlap: bool,
        passes: usize,
    ) -> Result<GradSync, WorkerError> {
        GradSync::build(store, info, dp, bucket_bytes, overlap, passes, false)
    }

    /// Like [`GradSync::new`], for the distributed optimizer: every bucket is padded to a
    /// multiple of `dp`'s size and reduce-scattered, each replica receiving the sum of its
    /// shard ([`GradSync::shard`]).
    pub fn new_sharded(
        store: &ParamStore,
        info: &[ParamInfo],
        dp: Arc<dyn Communicator>,
        bucket_bytes: usize,
        overlap: bool,
        passes: usize,
    ) -> Result<GradSync, WorkerError> {
        GradSync::build(store, info, dp, bucket_bytes, overlap, passes, true)
    }

    fn build(
        store: &ParamStore,
        info: &[ParamInfo],
        dp: Arc<dyn Communicator>,
        bucket_bytes: usize,
        overlap: bool,
        passes: usize,
        sharded: bool,
    ) -> Result<GradSync, WorkerError> {
        if info.len() != store.params().len() {
            return Err(WorkerError::Other(format!(
                "gradient buckets: {} parameter descriptions for {} parameters",
                info.len(),
                store.params().len()
            )));
        }
        let layout = plan(info, bucket_bytes);
        let parts = if sharded { dp.size() } else { 1 };
        let mut grads = Vec::with_capacity(layout.len());
        for b in &layout {
            let flat = Tensor::f_zeros([b.padded(parts)], (Kind::Float, store.device))?;
            for s in &b.slots {
                let p = &store.params()[s.param];
                let view = flat
                    .f_narrow(0, s.offset, s.numel)?
                    .f_view(p.tensor.size().as_slice())?;
                shim::set_grad(&p.tensor, &view)?;
            }
            grads.push(flat);
        }
        let n = layout.len();
        let shards = sharded.then(|| layout.iter().map(|b| b.shard(parts, dp.rank())).collect());
        Ok(GradSync {
            layout,
            grads,
            device: store.device,
            shards,
            dp,
            overlap,
            passes,
            done: HashMap::new(),
            started: vec![false; n],
            works: (0..n).map(|_| None).collect(),
            last_wait: Duration::ZERO,
            tp_sum: None,
        })
    }

    /// Sums the gradients of `params` (`(parameter index, layer)`; replicated parameters
    /// applied to sequence shards) over the TP group `tp` each step, before their
    /// data-parallel reduction (see the module docs). A frozen parameter (no bucket) is
    /// skipped.
    pub fn with_tp_sum(
        mut self,
        tp: Arc<dyn Communicator>,
        params: &[(usize, usize)],
    ) -> Result<GradSync, WorkerError> {
        let layer_of: HashMap<usize, usize> = params.iter().copied().collect();
        let mut views: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
        for (b, layout) in self.layout.iter().enumerate() {
            for s in &layout.slots {
                if let Some(&layer) = layer_of.get(&s.param) {
                    views
                        .entry(layer)
                        .or_default()
                        .push(self.grads[b].f_narrow(0, s.offset, s.numel)?);
                }
            }
        }
        self.tp_sum = (tp.size() > 1).then_some(TpSum {
            tp,
            views,
            done: HashSet::new(),
        });
        Ok(self)
    }

    /// Sums layer `layer`'s flagged gradients over the TP group, once per step.
    fn sum_over_tp(&mut self, layer: usize) -> Result<(), WorkerError> {
        let Some(t) = &mut self.tp_sum else {
            return Ok(());
        };
        let Some(views) = t.views.get(&layer) else {
            return Ok(());
        };
        if !t.done.insert(layer) {
            return Ok(());
        }
        let mut packed = Tensor::f_cat(views, 0)?;
        t.tp.all_reduce(&mut packed, ReduceOp::Sum)
            .map_err(comm_err)?;
        let mut at = 0;
        for v in views {
            let n = v.numel() as i64;
            let mut v = v.shallow_clone();
            v.f_copy_(&packed.f_narrow(0, at, n)?)?;
            at += n;
        }
        Ok(())
    }

    /// The bucket layout.
    pub fn layout(&self) -> &[BucketLayout] {
        &self.layout
    }

    /// Bucket `b`'s flat f32 gradient (padded when sharded: see [`GradSync::shard`]).
    pub fn grad(&self, b: usize) -> &Tensor {
        &self.grads[b]
    }

    /// Whether the buckets are reduce-scattered for the distributed optimizer.
    pub fn is_sharded(&self) -> bool {
        self.shards.is_some()
    }

    /// The range of bucket `b`'s (padded) buffer whose gradients this replica holds summed
    /// after [`GradSync::finish`]: its shard, or the whole bucket when not sharded.
    pub fn shard(&self, b: usize) -> Range<i64> {
        match &self.shards {
            Some(s) => s[b].clone(),
            None => 0..self.layout[b].numel,
        }
    }

    /// Whether buckets are reduced while the backward runs.
    pub fn overlaps(&self) -> bool {
        self.overlap && self.dp.size() > 1
    }

    /// Zeroes every gradient (one fill per bucket) and starts a new step.
    pub fn zero(&mut self) -> Result<(), WorkerError> {
        if self.works.iter().any(Option::is_some) {
            return Err(WorkerError::Other(
                "gradient buckets zeroed while their reduction is in flight".into(),
            ));
        }
        for g in &mut self.grads {
            let _ = g.f_zero_()?;
        }
        self.done.clear();
        self.started.iter_mut().for_each(|s| *s = false);
        if let Some(t) = &mut self.tp_sum {
            t.done.clear();
        }
        Ok(())
    }

    /// One backward pass finished with layer `layer`: its parameters' gradients of that
    /// pass are accumulated. With overlap, starts every bucket that is now complete.
    pub fn layer_done(&mut self, layer: usize) -> Result<(), WorkerError> {
        let n = self.done.entry(layer).or_insert(0);
        *n += 1;
        if *n > self.passes {
            return Err(WorkerError::Other(format!(
                "layer {layer} finished {} backward passes in a step of {}",
                *n, self.passes
            )));
        }
        if *n == self.passes {
            self.sum_over_tp(layer)?;
        }
        if self.overlaps() {
            for b in 0..self.layout.len() {
                let complete = self.layout[b]
                    .layers
                    .iter()
                    .all(|l| self.done.get(l).copied().unwrap_or(0) == self.passes);
                if !self.started[b] && complete {
                    self.start(b)?;
                }
            }
        }
        Ok(())
    }

    fn start(&mut self, b: usize) -> Result<(), WorkerError> {
        self.started[b] = true;
        if self.dp.size() > 1 {
            let work = match &self.shards {
                // In place: the output is the input's rows of this replica (the backends
                // allow it, NCCL's in-place form).
                Some(s) => {
                    let out = self.grads[b].f_narrow(0, s[b].start, s[b].end - s[b].start)?;
                    self.dp
                        .reduce_scatter_start(self.grads[b].shallow_clone(), out, ReduceOp::Sum)
                }
                None => self
                    .dp
                    .all_reduce_start(self.grads[b].shallow_clone(), ReduceOp::Sum),
            }
            .map_err(comm_err)?;
            self.works[b] = Some(work);
        }
        Ok(())
    }

    /// Starts the buckets not started yet (in bucket order) and waits for every bucket's
    /// reduction: on return the gradients are summed over the data-parallel group.
    pub fn finish(&mut self) -> Result<(), WorkerError> {
        let t0 = Instant::now();
        // Layers whose backward was not reported (no layer cuts), in layer order on every
        // TP rank.
        let pending: Vec<usize> = match &self.tp_sum {
            Some(t) => t
                .views
                .keys()
                .copied()
                .filter(|l| !t.done.contains(l))
                .collect(),
            None => Vec::new(),
        };
        for layer in pending {
            self.sum_over_tp(layer)?;
        }
        for b in 0..self.layout.len() {
            if !self.started[b] {
                self.start(b)?;
            }
        }
        for w in &mut self.works {
            if let Some(w) = w.take() {
                w.wait().map_err(comm_err)?;
            }
        }
        self.last_wait = t0.elapsed();
        Ok(())
    }

    /// How long the last [`GradSync::finish`] took: the data-parallel communication the
    /// backward did not hide (on the host: a device backend's wait only orders streams).
    pub fn last_wait(&self) -> Duration {
        self.last_wait
    }

    /// Sum of squared gradient entries on this rank, as a device scalar (no host read):
    /// sharded parameters always, replicated ones when `replicated` (TP rank 0 counts them
    /// for the group). With the distributed optimizer, only this replica's shards: the
    /// caller sums the result over the data-parallel group too.
    pub fn norm_sq(&self, replicated: bool) -> Result<Tensor, WorkerError> {
        let mut views = Vec::new();
        for (b, (l, g)) in self.layout.iter().zip(&self.grads).enumerate() {
            let r = if replicated {
                0..l.numel
            } else {
                l.sharded.clone()
            };
            let shard = self.shard(b);
            for part in clip(&[r], &shard) {
                let start = shard.start + part.start;
                views.push(g.f_narrow(0, start, part.end - part.start)?);
            }
        }
        if views.is_empty() {
            return Ok(Tensor::f_zeros([], (Kind::Float, self.device))?);
        }
        let norms = shim::foreach_norm(&views)?;
        Ok(Tensor::f_stack(&norms, 0)?.f_square()?.f_sum(Kind::Float)?)
    }
}
