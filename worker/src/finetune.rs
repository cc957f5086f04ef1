//! The trainer's side of fine-tuning (`train.freeze`, `train.lr_mult`, LoRA): which of a
//! rank's parameters train and at what learning-rate multiple, checked over the whole job.
//!
//! - Frozen parameters (a `train.freeze` entry selects them, or LoRA is on and they are not
//!   adapter factors) stop requiring grad, so the backward computes no gradient for them;
//!   [`crate::buckets`] leaves them out of every gradient bucket, so they get no gradient
//!   buffer, no data-parallel reduction and no optimizer state, and their values never
//!   change. Checkpoints still hold their values ([`crate::ckpt`]).
//! - Each distinct multiplier of `train.lr_mult` is an lr group: the buckets keep each
//!   group's elements together and the optimizer runs one fused call per group.
//! - LoRA factors held whole under a split layer have partial gradients on each TP rank
//!   (see `weaver_models::lora`): [`Finetune::sum_partial_grads`] adds them up over the TP
//!   group, in one collective, before the gradient norm and the update.
//!
//! Part names and prefixes are matched by `weaver_config::finetune`. A rank holds only its
//! stages, so whether every entry selects something is decided over the world
//! ([`Finetune::check_over`]): an entry (or LoRA target) that selects no parameter anywhere
//! is a typo, and the job stops with the key to fix.

use tch::{Kind, Tensor};
use tracing::info;
use weaver_config::finetune::{frozen_by, is_lora, lr_mult_of, selects, LORA_A};
use weaver_models::lora::tp_partial_grad;
use weaver_models::nn::ParamStore;
use weaver_models::JobConfig;
use weaver_parallel::comm::{Communicator, ReduceOp};

use crate::error::WorkerError;

/// What fine-tuning makes of one rank's parameters.
#[derive(Debug, Clone)]
pub struct Finetune {
    /// Per parameter (store order): frozen.
    pub frozen: Vec<bool>,
    /// Per parameter: its lr group (an index into [`Finetune::mults`]).
    pub lr_group: Vec<usize>,
    /// The distinct multipliers, ascending (`[1.0]` when none is set).
    pub mults: Vec<f64>,
    /// Parameters whose gradients are partial sums over the TP group.
    partial: Vec<usize>,
    /// How many of this rank's parameters each `freeze` entry, `lr_mult` key and LoRA
    /// target selects (in that order).
    counts: Vec<f64>,
}

impl Finetune {
    /// The plan for `store` (this rank's parameters) under `job`, with `tp` ranks per TP
    /// group.
    pub fn new(job: &JobConfig, store: &ParamStore, tp: usize) -> Finetune {
        let t = &job.train;
        let lora = t.lora_rank > 0;
        let params = store.params();
        let frozen: Vec<bool> = params
            .iter()
            .map(|p| frozen_by(&t.freeze, &p.name) || (lora && !is_lora(&p.name)))
            .collect();
        let per_param: Vec<f64> = params
            .iter()
            .map(|p| lr_mult_of(&t.lr_mult, &p.name))
            .collect();
        let mut mults: Vec<f64> = per_param.clone();
        mults.push(1.0);
        mults.sort_by(f64::total_cmp);
        mults.dedup();
        // Without any multiplier other than 1 there is one group, 0.
        if mults.len() == 1 {
            mults = vec![1.0];
        }
        let lr_group = per_param
            .iter()
            .map(|m| mults.iter().position(|x| x == m).unwrap_or(0))
            .collect();
        let partial = (0..params.len())
            .filter(|&i| !frozen[i] && tp_partial_grad(&params[i], tp))
            .collect();
        let count = |f: &dyn Fn(&str) -> bool| params.iter().filter(|p| f(&p.name)).count() as f64;
        let mut counts = Vec::new();
        for e in &t.freeze {
            counts.push(count(&|n| selects(e, n)));
        }
        for k in t.lr_mult.keys() {
            counts.push(count(&|n| selects(k, n)));
        }
        if lora {
            for target in &t.lora_targets {
                let suffix = format!(".{target}.{LORA_A}");
                counts.push(count(&|n| n.ends_with(&suffix)));
            }
        }
        Finetune {
            frozen,
            lr_group,
            mults,
            partial,
            counts,
        }
    }

    /// Whether anything is frozen, multiplied or adapted (else the plan changes nothing).
    pub fn active(&self) -> bool {
        self.frozen.iter().any(|&f| f) || self.mults.len() > 1 || !self.counts.is_empty()
    }

    /// Checks over `world` (collective: every rank calls it) that every `freeze` entry,
    /// `lr_mult` key and LoRA target selects at least one parameter of the model and that
    /// something trains; `trainable` is this rank's count of trainable parameters.
    pub fn check_over(&self, job: &JobConfig, world: &dyn Communicator) -> Result<(), WorkerError> {
        let tr = &job.train;
        if tr.freeze.is_empty() && tr.lr_mult.is_empty() && tr.lora_rank == 0 {
            // Nothing selects anything and everything trains (every rank decides alike).
            return Ok(());
        }
        let trainable = self.frozen.iter().filter(|&&f| !f).count() as f64;
        let mut v = self.counts.clone();
        v.push(trainable);
        let mut t = Tensor::f_from_slice(&v)?.f_to_device(world.device())?;
        if world.size() > 1 {
            world
                .all_reduce(&mut t, ReduceOp::Sum)
                .map_err(|e| WorkerError::Comm(e.to_string()))?;
        }
        let sums = crate::sync::read_f64s(&t)?;
        let names = tr
            .freeze
            .iter()
            .map(|e| ("freeze", e.as_str()))
            .chain(tr.lr_mult.keys().map(|k| ("lr_mult", k.as_str())))
            .chain(
                tr.lora_targets
                    .iter()
                    .filter(|_| tr.lora_rank > 0)
                    .map(|t| ("lora_targets", t.as_str())),
            );
        for ((key, entry), &n) in names.zip(&sums) {
            if n == 0.0 {
                let message = if key == "lora_targets" {
                    format!("target {entry:?} names no linear layer of this model (flavor {}, fusion {})", job.model.flavor, job.model.fusion.name())
                } else {
                    format!("{entry:?} selects no parameter: use a part (vision, text, multimodal, heads) or a prefix of parameter names (`weaver ckpt inspect` lists them)")
                };
                return Err(WorkerError::Finetune { key, message });
            }
        }
        if sums.last().copied() == Some(0.0) {
            return Err(WorkerError::Finetune {
                key: "freeze",
                message: "every parameter is frozen: nothing would train".into(),
            });
        }
        Ok(())
    }

    /// Freezes this rank's frozen parameters: they no longer require grad, so no backward
    /// computes their gradients.
    pub fn freeze(&self, store: &ParamStore) {
        for (p, &f) in store.params().iter().zip(&self.frozen) {
            if f {
                // Changes the tensor itself: the model's handles share it.
                let _ = p.tensor.set_requires_grad(false);
            }
        }
        if self.active() {
            let n = |frozen: bool| {
                store
                    .params()
                    .iter()
                    .zip(&self.frozen)
                    .filter(|(_, &f)| f == frozen)
                    .map(|(p, _)| p.tensor.numel())
                    .sum::<usize>()
            };
            info!(
                trainable = n(false),
                frozen = n(true),
                lr_mults = ?self.mults,
                tp_partial = self.partial.len(),
                "fine-tuning: parameters of this rank"
            );
        }
    }

    /// Sums over `tp` the gradients that are partial there (LoRA factors held whole under
    /// a split layer), in one collective. Collective over the TP group when there are any.
    pub fn sum_partial_grads(
        &self,
        store: &ParamStore,
        tp: &dyn Communicator,
    ) -> Result<(), WorkerError> {
        if self.partial.is_empty() || tp.size() < 2 {
            return Ok(());
        }
        let grads: Vec<Tensor> = self
            .partial
            .iter()
            .map(|&i| store.params()[i].tensor.grad())
            .collect();
        let flat: Vec<Tensor> = grads
            .iter()
            .map(|g| g.f_reshape([-1]))
            .collect::<Result<_, _>>()?;
        let mut sum = Tensor::f_cat(&flat, 0)?.f_to_kind(Kind::Float)?;
        tp.all_reduce(&mut sum, ReduceOp::Sum)
            .map_err(|e| WorkerError::Comm(e.to_string()))?;
        let mut offset = 0;
        tch::no_grad(|| -> Result<(), WorkerError> {
            for g in &grads {
                let n = g.numel() as i64;
                g.shallow_clone()
                    .f_copy_(&sum.f_narrow(0, offset, n)?.f_view(g.size().as_slice())?)?;
                offset += n;
            }
            Ok(())
        })
    }
}
