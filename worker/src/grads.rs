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
//! number of micro-batches. A ZeRO-1 optimizer (issue 12) replaces the all-reduce with a
//! `reduce_scatter_start` of the same buckets; nothing else here changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use weaver_models::nn::ParamStore;
use weaver_parallel::comm::{Communicator, ReduceOp, Work};

use crate::buckets::{plan, BucketLayout, ParamInfo};
use crate::error::WorkerError;
use crate::shim;

/// The f32 gradient buckets of one rank and their data-parallel reduction.
#[derive(Debug)]
pub struct GradSync {
    layout: Vec<BucketLayout>,
    grads: Vec<Tensor>,
    /// Where the buckets live (also when there are none: every parameter frozen).
    device: tch::Device,
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
        if info.len() != store.params().len() {
            return Err(WorkerError::Other(format!(
                "gradient buckets: {} parameter descriptions for {} parameters",
                info.len(),
                store.params().len()
            )));
        }
        let layout = plan(info, bucket_bytes);
        let mut grads = Vec::with_capacity(layout.len());
        for b in &layout {
            let flat = Tensor::f_zeros([b.numel], (Kind::Float, store.device))?;
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
        Ok(GradSync {
            layout,
            grads,
            device: store.device,
            dp,
            overlap,
            passes,
            done: HashMap::new(),
            started: vec![false; n],
            works: (0..n).map(|_| None).collect(),
            last_wait: Duration::ZERO,
        })
    }

    /// The bucket layout.
    pub fn layout(&self) -> &[BucketLayout] {
        &self.layout
    }

    /// Bucket `b`'s flat f32 gradient.
    pub fn grad(&self, b: usize) -> &Tensor {
        &self.grads[b]
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
            let work = self
                .dp
                .all_reduce_start(self.grads[b].shallow_clone(), ReduceOp::Sum)
                .map_err(comm_err)?;
            self.works[b] = Some(work);
        }
        Ok(())
    }

    /// Starts the buckets not started yet (in bucket order) and waits for every bucket's
    /// reduction: on return the gradients are summed over the data-parallel group.
    pub fn finish(&mut self) -> Result<(), WorkerError> {
        let t0 = Instant::now();
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
    /// for the group).
    pub fn norm_sq(&self, replicated: bool) -> Result<Tensor, WorkerError> {
        let mut views = Vec::new();
        for (l, g) in self.layout.iter().zip(&self.grads) {
            let r = if replicated {
                0..l.numel
            } else {
                l.sharded.clone()
            };
            if !r.is_empty() {
                views.push(g.f_narrow(0, r.start, r.end - r.start)?);
            }
        }
        if views.is_empty() {
            return Ok(Tensor::f_zeros([], (Kind::Float, self.device))?);
        }
        let norms = shim::foreach_norm(&views)?;
        Ok(Tensor::f_stack(&norms, 0)?.f_square()?.f_sum(Kind::Float)?)
    }
}
