//! The reference trainer: the whole model in one process with plain autograd, micro-batches
//! accumulated into one optimizer step per global batch. The tests hold the 3-D parallel
//! trainer ([`crate::parallel`], which `weaver train` and every worker run) to it.
//!
//! A step draws the global batch from the sampler, cuts it into `dp × microbatches`
//! micro-batches (the same micro-batches a parallel layout with that product would see, so
//! the two compute the same function), accumulates the gradient of the mean micro-batch
//! loss, clips the global norm, and takes one AdamW step at the scheduled learning rate.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tracing::{info, info_span};
use weaver_models::config::Contrastive;
use weaver_models::data::{Dataset, Sampler, SamplerState, Split};
use weaver_models::device::{check_device, compute_kind, parse_device};
use weaver_models::model::{Acts, GlobalEmbeddings, LossWeights};
use weaver_models::nn::ParamStore;
use weaver_models::objectives::{MlmSpec, Objectives};
use weaver_models::{tokenizer, JobConfig, Model};
use weaver_parallel::tp::{NoTp, TpPos};

use crate::error::WorkerError;
use crate::eval::{evaluate, evaluate_vqa};
use crate::metrics::{EvalMetrics, StepMetrics};
use crate::optim::{clip_grads, grad_sq_sum, lr_at, AdamW, AdamWConfig};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Steps completed.
    pub steps: u64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// The last evaluation.
    pub eval: Option<EvalMetrics>,
    /// Wall time of the whole run in seconds.
    pub wall_s: f64,
    /// Whether the run stopped early on request (after checkpointing).
    pub preempted: bool,
}

/// Loss values of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLosses {
    /// Weighted total.
    pub total: f64,
    /// Contrastive.
    pub itc: f64,
    /// Captioning.
    pub caption: f64,
    /// Matching.
    pub itm: f64,
    /// Masked language modelling.
    pub mlm: f64,
    /// Visual question answering.
    pub vqa: f64,
}

/// Sets libtorch's intra-op threads: `threads`, or the cores divided among `local_procs`
/// processes (eight processes on two cores would otherwise thrash).
pub fn configure_threads(threads: usize, local_procs: usize) -> usize {
    let n = if threads > 0 {
        threads
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / local_procs.max(1)).max(1)
    };
    tch::set_num_threads(n as i32);
    // libtorch accepts the inter-op pool size once per process, before any parallel work
    // (tch panics on a second call).
    static INTEROP: std::sync::Once = std::sync::Once::new();
    INTEROP.call_once(|| tch::set_num_interop_threads(1));
    n
}

/// Builds the dataset a job describes.
pub fn dataset(job: &JobConfig) -> Result<Dataset, WorkerError> {
    let tok = tokenizer::load(&job.data.tokenizer, job.model.vocab_size)?;
    Ok(Dataset {
        seed: job.data.seed,
        image_size: job.model.image_size,
        max_objects: job.data.max_objects,
        text_len: job.model.max_text_len,
        tokenizer: Arc::from(tok),
    })
}

/// The objective rows (MLM, VQA) a job's batches carry ([`Objectives::attach`]).
pub fn objectives(job: &JobConfig, data: &Dataset) -> Result<Objectives, WorkerError> {
    let t = &job.train;
    Ok(Objectives {
        mlm: if t.mlm_weight > 0.0 {
            Some(MlmSpec::new(
                data.tokenizer.as_ref(),
                job.data.seed,
                t.mlm_rate,
            )?)
        } else {
            None
        },
        vqa: t.vqa_weight > 0.0,
    })
}

/// A whole model on one device, with its data.
#[derive(Debug)]
pub struct Built {
    /// Parameters.
    pub store: ParamStore,
    /// The model.
    pub model: Model,
    /// Data.
    pub data: Dataset,
    /// Where it runs.
    pub device: Device,
}

/// Builds the whole model a job describes on its device (initial values from
/// `train.seed`).
pub fn build(job: &JobConfig) -> Result<Built, WorkerError> {
    let device = parse_device(&job.train.device)?;
    check_device(device)?;
    let kind = compute_kind(&job.train.dtype, device)?;
    let data = dataset(job)?;
    let mut store = ParamStore::new(device, kind, job.train.seed);
    // A LoRA job's model has its adapters (evaluating a LoRA checkpoint needs them).
    store.set_lora(weaver_models::lora::LoraSpec::of(&job.train));
    let model = Model::new(
        &mut store,
        &job.model,
        0..Model::num_layers(&job.model),
        TpPos::SINGLE,
        data.tokenizer.pad_id(),
    )?;
    Ok(Built {
        store,
        model,
        data,
        device,
    })
}

/// One process training the whole model.
#[derive(Debug)]
pub struct Trainer {
    /// The job.
    pub job: JobConfig,
    /// Parameters.
    pub store: ParamStore,
    /// The model.
    pub model: Model,
    /// Optimizer state.
    pub opt: AdamW,
    /// Data order.
    pub sampler: Sampler,
    /// Data.
    pub data: Dataset,
    /// Steps completed.
    pub step: u64,
    /// The MLM and VQA rows the batches carry.
    pub objectives: Objectives,
    device: Device,
}

impl Trainer {
    /// Builds the model and optimizer from scratch (initial values from `train.seed`).
    pub fn new(job: JobConfig) -> Result<Trainer, WorkerError> {
        let t = &job.train;
        if !t.freeze.is_empty() || !t.lr_mult.is_empty() || t.lora_rank > 0 {
            return Err(WorkerError::Finetune {
                key: "freeze",
                message: "the per-parameter reference trainer does not fine-tune (train.freeze, train.lr_mult, train.lora_rank): `weaver train` and `weaver launch` do".into(),
            });
        }
        if job.distill.enabled() {
            return Err(WorkerError::Other(
                "the per-parameter reference trainer does not distill (distill.teacher): `weaver train` and `weaver launch` do".into(),
            ));
        }
        let threads = configure_threads(job.train.threads, 1);
        let Built {
            store,
            model,
            data,
            device,
        } = build(&job)?;
        let mut opt = AdamW::new(
            AdamWConfig {
                beta1: job.train.beta1,
                beta2: job.train.beta2,
                eps: job.train.eps,
                weight_decay: job.train.weight_decay,
            },
            store.params(),
        )?;
        crate::init::load_init_from(&job.model, &store, crate::init::Values::PerParam(&mut opt))?;
        let sampler = Sampler::new(job.data.seed, job.data.train_size, SamplerState::default());
        info!(
            flavor = %job.model.flavor,
            fusion = job.model.fusion.name(),
            params = job.model.num_params(),
            ?device,
            kind = ?store.kind,
            threads,
            "model built"
        );
        let objectives = objectives(&job, &data)?;
        Ok(Trainer {
            job,
            store,
            model,
            opt,
            sampler,
            data,
            step: 0,
            objectives,
            device,
        })
    }

    /// The loss weights of the job.
    pub fn loss_weights(&self) -> LossWeights {
        LossWeights {
            itc: self.job.train.itc_weight,
            caption: self.job.train.caption_weight,
            itm: self.job.train.itm_weight,
            mlm: self.job.train.mlm_weight,
            vqa: self.job.train.vqa_weight,
        }
    }

    /// Micro-batches per step (over every data-parallel rank of the layout).
    pub fn micro_batches(&self) -> usize {
        self.job.parallel.dp * self.job.parallel.microbatches
    }

    /// Forward and backward of one step's micro-batches, leaving the accumulated gradient
    /// of the mean micro-batch loss in the parameters; returns the mean losses.
    pub fn accumulate(&mut self, indices: &[u64]) -> Result<StepLosses, WorkerError> {
        let k = self.micro_batches();
        let mbs = indices.len() / k;
        let w = self.loss_weights();
        let itm = w.itm > 0.0;
        if self.job.train.contrastive == Contrastive::Global && w.itc > 0.0 && k > 1 {
            return self.accumulate_global(indices, k, mbs, w);
        }
        let mut sum = StepLosses::default();
        for part in indices.chunks(mbs) {
            let mut batch = self.data.batch(Split::Train, part, self.device)?;
            self.objectives
                .attach(&mut batch, &self.data, Split::Train, true)?;
            let mut acts = Acts::default();
            self.model.forward(&mut NoTp, &mut acts, &batch, itm)?;
            let l = self.model.losses(&mut NoTp, &mut acts, &batch, w)?;
            l.total.f_div_scalar(k as f64)?.f_backward()?;
            sum.total += l.total.f_double_value(&[])?;
            sum.itc += l.itc.f_double_value(&[])?;
            sum.caption += l.caption.f_double_value(&[])?;
            sum.itm += l.itm.f_double_value(&[])?;
            sum.mlm += l.mlm.f_double_value(&[])?;
            sum.vqa += l.vqa.f_double_value(&[])?;
        }
        let k = k as f64;
        Ok(StepLosses {
            total: sum.total / k,
            itc: sum.itc / k,
            caption: sum.caption / k,
            itm: sum.itm / k,
            mlm: sum.mlm / k,
            vqa: sum.vqa / k,
        })
    }

    /// [`Trainer::accumulate`] with `train.contrastive = "global"`, the plain way: every
    /// micro-batch's graph is kept, the contrastive loss is taken once over all their
    /// embeddings (CLIP's loss over the global batch), the captioning and matching losses
    /// per micro-batch (their mean; MLM and VQA too), and one backward runs over the sum. What the layout's
    /// gathers, caches and recomputations must reproduce.
    fn accumulate_global(
        &mut self,
        indices: &[u64],
        k: usize,
        mbs: usize,
        w: LossWeights,
    ) -> Result<StepLosses, WorkerError> {
        let itm = w.itm > 0.0;
        let (mut images, mut texts) = (Vec::new(), Vec::new());
        let mut rest: Option<Tensor> = None;
        let (mut caption, mut matching, mut mlm, mut vqa) = (0.0, 0.0, 0.0, 0.0);
        for part in indices.chunks(mbs) {
            let mut batch = self.data.batch(Split::Train, part, self.device)?;
            self.objectives
                .attach(&mut batch, &self.data, Split::Train, true)?;
            let mut acts = Acts::default();
            self.model.forward(&mut NoTp, &mut acts, &batch, itm)?;
            let take = |t: &Option<Tensor>| {
                t.as_ref()
                    .map(|t| t.shallow_clone())
                    .ok_or_else(|| WorkerError::Other("the model produced no embeddings".into()))
            };
            images.push(take(&acts.image_emb)?);
            texts.push(take(&acts.text_emb)?);
            let l = self.model.losses(&mut NoTp, &mut acts, &batch, w)?;
            let term = l
                .caption
                .f_mul_scalar(w.caption)?
                .f_add(&l.itm.f_mul_scalar(w.itm)?)?
                .f_add(&l.mlm.f_mul_scalar(w.mlm)?)?
                .f_add(&l.vqa.f_mul_scalar(w.vqa)?)?
                .f_div_scalar(k as f64)?;
            rest = Some(match rest {
                None => term,
                Some(r) => r.f_add(&term)?,
            });
            caption += l.caption.f_double_value(&[])?;
            matching += l.itm.f_double_value(&[])?;
            mlm += l.mlm.f_double_value(&[])?;
            vqa += l.vqa.f_double_value(&[])?;
        }
        let image = Tensor::f_cat(&images, 0)?;
        let text = Tensor::f_cat(&texts, 0)?;
        let n = image.size()[0];
        let itc = self.model.contrastive_loss(&GlobalEmbeddings {
            image,
            text,
            rows: (0, n),
            scale_grad: true,
        })?;
        let objective = itc.f_mul_scalar(w.itc)?;
        let objective = match rest {
            Some(r) => objective.f_add(&r)?,
            None => objective,
        };
        objective.f_backward()?;
        let k = k as f64;
        Ok(StepLosses {
            total: objective.f_double_value(&[])?,
            itc: itc.f_double_value(&[])?,
            caption: caption / k,
            itm: matching / k,
            mlm: mlm / k,
            vqa: vqa / k,
        })
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepMetrics, WorkerError> {
        let _span = info_span!("step", step = self.step + 1).entered();
        let started = Instant::now();
        let t = &self.job.train;
        let lr = lr_at(self.step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
        let (clip, global_batch) = (t.grad_clip, t.global_batch);
        let indices = self.sampler.next_indices(global_batch);
        self.store.zero_grad();
        let losses = self.accumulate(&indices)?;
        if !losses.total.is_finite() {
            return Err(WorkerError::Diverged {
                step: self.step + 1,
                loss: losses.total,
            });
        }
        let grad_norm = grad_sq_sum(self.store.params().iter())?.sqrt();
        clip_grads(self.store.params(), grad_norm, clip)?;
        self.opt.step(self.store.params(), lr)?;
        self.step += 1;
        if self.device != Device::Cpu {
            // Timing must include the queued kernels.
            tch::Cuda::synchronize(self.device_index());
        }
        let secs = started.elapsed().as_secs_f64();
        Ok(StepMetrics::of_step(
            &self.job, self.step, &losses, lr, grad_norm, secs, 1,
        ))
    }

    fn device_index(&self) -> i64 {
        match self.device {
            Device::Cuda(k) => k as i64,
            _ => 0,
        }
    }

    /// Held-out evaluation of the current weights.
    pub fn evaluate(&self) -> Result<EvalMetrics, WorkerError> {
        let _span = info_span!("eval", step = self.step).entered();
        let chunk = self.job.micro_batch_size();
        let mut m = evaluate(
            &self.model,
            &self.data,
            self.job.eval.pool,
            chunk,
            self.device,
            self.step,
        )?;
        if self.job.train.vqa_weight > 0.0 {
            let (acc, majority) = evaluate_vqa(
                &self.model,
                &self.data,
                self.job.eval.pool,
                chunk,
                self.device,
            )?;
            m.vqa_acc = Some(acc);
            m.vqa_majority = Some(majority);
        }
        Ok(m)
    }
}

/// Writes a store's parameters (f32 on the CPU) to a safetensors file.
pub fn save_params(store: &ParamStore, path: &Path) -> Result<(), WorkerError> {
    let named: Vec<(String, Tensor)> = store
        .params()
        .iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                p.tensor
                    .f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_to_device(Device::Cpu)?
                    .f_contiguous()?,
            ))
        })
        .collect::<Result<_, tch::TchError>>()?;
    Tensor::write_safetensors(&named, path).map_err(WorkerError::from)
}
