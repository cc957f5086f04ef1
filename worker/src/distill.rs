//! Knowledge distillation from a frozen teacher (`[distill]`, Hinton et al. 2015): the
//! student's loss gains KL divergences between the teacher's softened distributions and its
//! own, next to the hard losses of `[train]`.
//!
//! - **Similarity KL** (`distill.itc_kl_weight`): each model's contrastive logits over the
//!   micro-batch — cosine similarities of its normalised embeddings times a learned scale
//!   (clamped at 100, as in the contrastive loss): the teacher's for both models, or with
//!   `distill.itc_scale = "own"` each its own — softened by `T`; the KL from the
//!   teacher's row distributions to the student's (image→text), and the same over columns
//!   (text→image), the mean of the two over the micro-batch's rows. The embedding widths
//!   of the two models may differ: only the `B × B` similarities are compared.
//! - **Caption KL** (`distill.caption_kl_weight`): at every caption target position of the
//!   positive pairs (the positions the captioning cross-entropy scores), the KL from the
//!   teacher's next-token distribution to the student's, softened by `T`, the mean over
//!   non-padding targets. Both models must share the vocabulary.
//!
//! - **Feature matching** (`distill.feature_weight`): the student's normalised image and
//!   text embeddings, mapped to the teacher's embedding width by a learned projection
//!   [`PROJECTION`] (`[E_teacher, E_student]`, a parameter of the student's last stage,
//!   trained, checkpointed and resharded with it) and normalised again, against the
//!   teacher's normalised embeddings: the mean squared distance per sample (`2 − 2 cos`),
//!   the mean of the image and text terms.
//!
//! The KL terms are multiplied by `T²` so that their gradients keep their scale as `T`
//! changes. `KL(p‖q) = Σ p (log p − log q)`, computed from log-softmaxes in f32.
//!
//! **Where the teacher runs.** A [`Teacher`] is the teacher's model (every layer) on each
//! rank that holds the student's last pipeline stage: it runs forward only (no graph, no
//! gradients, no optimizer state), in bf16 on a GPU and in the run's dtype on a CPU, on each
//! micro-batch right where the student's losses are computed (the schedule executor's last
//! stage, [`crate::schedule`]). Every layout therefore computes the same per-micro-batch
//! terms as one process: every pipeline, data- and tensor-parallel layout, and every
//! `parallel.recompute` (under `"full"` the teacher runs in the forward and its
//! [`TeacherOut`] is kept for the backward's rerun of the loss).
//!
//! **Its own tensor parallelism** (`distill.teacher_tp`, [`TeacherGroups`]). By default the
//! teacher is split over the student's tensor-parallel group: each rank loads its `1/tp`
//! slices of the teacher's weights from the checkpoint (Megatron's column- and row-parallel
//! layers and vocabulary split, as the student is cut) and the teacher's forward runs
//! tensor-parallel with the group's collectives (no graph: a forward-only [`Tape`]), on the
//! whole micro-batch (not sequence-parallel, whatever the student does). Its embeddings and
//! contrastive logits come out replicated; its caption logits are this rank's vocabulary
//! slice, softened into log-probabilities over the whole vocabulary with the group's maximum
//! and summed `exp` ([`TeacherOut::caption_log_p`]). With `teacher_tp = 1` every rank runs
//! the whole teacher (the same outputs on each) and keeps its slice of the
//! log-probabilities. With `teacher_tp = k` larger than the student's tp, the teacher is
//! split over the last-stage groups of `r = k / tp` consecutive data-parallel replicas:
//! those replicas' micro-batches (different samples) are all-gathered over the `r` ranks
//! of each tensor-parallel coordinate, the teacher runs once on the `r · B` rows over its
//! `k` ranks, and each rank keeps its own replica's rows — the per-row outputs do not
//! depend on the other rows, so the terms are the one-process ones, with `1/k` of the
//! teacher per rank for the compute of `1/tp` of it. (The caption KL needs the teacher's
//! vocabulary split like the student's, so it is refused there.) Either way the similarity
//! KL, feature matching and ICL are computed on each rank from
//! the student's replicated embeddings, and the caption KL is vocab-parallel
//! ([`vocab_parallel_token_kl`]): the student's caption logits (those its captioning loss
//! scored, [`Losses::caption_logits`]) hold the same vocabulary slice. The teacher's
//! parameters never require grad and are never written: its weights stay bitwise what was
//! loaded. They are not part of the student's checkpoints; a resumed run loads the teacher
//! again from `distill.teacher`.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tracing::info;
use weaver_config::distill::{DistillSection, ItcScale};
use weaver_models::data::Batch;
use weaver_models::device::compute_kind;
use weaver_models::model::{Acts, Losses};
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::{JobConfig, Model, ModelConfig};
use weaver_parallel::comm::Communicator;
use weaver_parallel::tp::{Tape, TensorParallel};

use crate::error::WorkerError;

/// The name of the feature-matching projection in the student's store (on the ranks of its
/// last layer): `[teacher embed_dim, student embed_dim]`.
pub const PROJECTION: &str = "distill.proj.weight";

/// Whether `name` is a parameter distillation adds to the student (not the model's own).
pub fn is_distill_param(name: &str) -> bool {
    name.starts_with("distill.")
}

/// The distillation terms of one micro-batch (f32 scalars on the device).
#[derive(Debug)]
pub struct DistillTerms {
    /// Similarity KL (times `T²`), unweighted.
    pub itc_kl: Tensor,
    /// Caption KL (times `T²`), unweighted.
    pub caption_kl: Tensor,
    /// Feature-matching distance, unweighted.
    pub feature: Tensor,
    /// Interactive contrastive loss, unweighted.
    pub icl: Tensor,
    /// `itc_kl_weight · itc_kl + caption_kl_weight · caption_kl + feature_weight · feature
    /// + icl_weight · icl`: what joins the loss.
    pub weighted: Tensor,
}

/// How many terms [`DistillTerms::stacked`] holds.
pub const TERMS: i64 = 4;

impl DistillTerms {
    /// The unweighted terms `[itc_kl, caption_kl, feature, icl]` as one f64 vector without a
    /// graph (what the step reports sum).
    pub fn stacked(&self) -> Result<Tensor, tch::TchError> {
        Tensor::f_stack(
            &[&self.itc_kl, &self.caption_kl, &self.feature, &self.icl],
            0,
        )?
        .f_detach()?
        .f_to_kind(Kind::Double)
    }
}

/// What the teacher computes for a micro-batch (f32, no graph).
#[derive(Debug)]
pub struct TeacherOut {
    /// Contrastive logits `[B, B]` (scaled cosine similarities, image rows).
    pub itc_logits: Tensor,
    /// The teacher's next-token log-probabilities at the caption target positions, softened
    /// by the temperature (`log_softmax(logits / T)` over the whole vocabulary), on this
    /// rank's slice of the vocabulary under tensor parallelism: `[B, T − 1, V / tp]` (none
    /// without the caption term).
    pub caption_log_p: Option<Tensor>,
    /// Normalised image and text embeddings `[B, E_teacher]` (none without feature
    /// matching and interactive contrastive learning).
    pub embeddings: Option<(Tensor, Tensor)>,
}

/// The communicators a teacher on a last-stage rank uses (see the module docs).
#[derive(Debug, Clone)]
pub struct TeacherGroups {
    /// The teacher's tensor-parallel group (`distill.teacher_tp` ranks: the student's group
    /// by default); `None` for a whole teacher.
    pub group: Option<Arc<dyn Communicator>>,
    /// With a group spanning several data-parallel replicas: the ranks of this rank's
    /// tensor-parallel coordinate in those replicas, in replica order, whose micro-batches
    /// the teacher runs together.
    pub replicas: Option<Arc<dyn Communicator>>,
    /// The student's tensor-parallel group (which vocabulary slice its caption logits hold).
    pub student: Arc<dyn Communicator>,
}

/// A frozen teacher on a rank of the student's last pipeline stage.
#[derive(Debug)]
pub struct Teacher {
    /// The whole teacher, or this rank's part of it (`distill.teacher_tp`).
    model: Model,
    /// The teacher's tensor-parallel group when it is split (its forward runs with the
    /// group's collectives); `None` for a whole teacher.
    group: Option<Arc<dyn Communicator>>,
    /// The replicas whose micro-batches the teacher runs together (see [`TeacherGroups`]).
    replicas: Option<Arc<dyn Communicator>>,
    /// This rank's place in the student's tensor-parallel group (which vocabulary slice its
    /// caption logits hold).
    student_tp: TpPos,
    store: ParamStore,
    cfg: DistillSection,
    pad_id: i64,
    url: String,
    /// The student's feature projection ([`PROJECTION`]), when feature matching or
    /// interactive contrastive learning is on.
    projection: Option<Tensor>,
}

fn bad(message: String) -> WorkerError {
    WorkerError::Other(format!("distill.teacher: {message}"))
}

impl Teacher {
    /// Loads `job.distill.teacher` onto `device` (bf16 on a GPU, the run's dtype on a CPU),
    /// its model configuration from the checkpoint's own job config (or `distill.flavor`
    /// when it has none), and checks that it sees the student's inputs. Split over
    /// `groups.group` (this rank's slices only, its forward over the group), or whole.
    pub fn load(
        job: &JobConfig,
        device: Device,
        groups: TeacherGroups,
    ) -> Result<Teacher, WorkerError> {
        let cfg = job.distill.clone();
        let student_tp = TpPos {
            rank: groups.student.rank(),
            size: groups.student.size(),
        };
        let teacher_tp = groups.group.as_ref().map_or(TpPos::SINGLE, |g| TpPos {
            rank: g.rank(),
            size: g.size(),
        });
        if groups.replicas.is_some() && cfg.caption_kl_weight > 0.0 {
            return Err(bad(format!(
                "distill.teacher_tp = {} spans data-parallel replicas, where the caption KL is not computed: set distill.caption_kl_weight = 0 or teacher_tp to at most parallel.tp",
                teacher_tp.size
            )));
        }
        let kind = match device {
            Device::Cpu => compute_kind(&job.train.dtype, device)?,
            _ => Kind::BFloat16,
        };
        let ckpt =
            weaver_checkpoint::block_on(weaver_checkpoint::Checkpoint::open_url(&cfg.teacher))
                .map_err(|e| bad(format!("{}: {e}", cfg.teacher)))?;
        let has_config = weaver_compress::load::checkpoint_job(&ckpt)
            .map_err(|e| bad(e.to_string()))?
            .map(|j| j.model);
        // The teacher's model: its own config, else `distill.flavor`; the student's job for
        // everything else (tokenizer, data).
        let mut base = job.clone();
        base.distill = DistillSection::default();
        match (&has_config, cfg.flavor.trim()) {
            (Some(m), f) if !f.is_empty() && f != m.flavor => {
                return Err(bad(format!(
                    "distill.flavor = {f:?} but the teacher checkpoint {} says its flavor is {:?}; leave distill.flavor empty (the checkpoint's config is used)",
                    cfg.teacher, m.flavor
                )))
            }
            (Some(_), _) => {}
            (None, "") => {
                return Err(bad(format!(
                    "the checkpoint {} carries no job config (train.config): set distill.flavor to the teacher's flavor",
                    cfg.teacher
                )))
            }
            (None, f) => base.model = ModelConfig::flavor(f)?,
        }
        // The teacher's model is known only now: check that its group can split it the way
        // the layout check checks the student.
        let model = has_config.as_ref().unwrap_or(&base.model);
        let tp = teacher_tp.size;
        if let Some((name, n)) = model.limits().undivided(tp) {
            return Err(bad(format!(
                    "the teacher (flavor {}) cannot be split over {tp} tensor-parallel ranks: {tp} does not divide its {name} = {n}; set distill.teacher_tp = 1 (the whole teacher on every rank) or to a size that divides it (0 is the student's parallel.tp)",
                model.flavor
            )));
        }
        let opts = weaver_compress::LoadOptions {
            device,
            kind,
            layers: None,
            tp: teacher_tp,
        };
        let loaded = weaver_compress::load_checkpoint(&ckpt, &base, &opts)
            .map_err(|e| bad(format!("{}: {e}", cfg.teacher)))?;
        if loaded.quantization.is_some() {
            return Err(bad(format!(
                "{} is quantized; distill from its float source",
                cfg.teacher
            )));
        }
        let (t, s) = (&loaded.job.model, &job.model);
        for (key, tv, sv) in [
            ("image_size", t.image_size, s.image_size),
            ("max_text_len", t.max_text_len, s.max_text_len),
            ("channels", t.channels, s.channels),
        ] {
            if tv != sv {
                return Err(bad(format!(
                    "the teacher's model.{key} is {tv} and the student's {sv}: both must see the same inputs; set the student's model.{key} = {tv}"
                )));
            }
        }
        if cfg.caption_kl_weight > 0.0 {
            if t.multimodal_layers == 0 {
                return Err(bad(format!(
                    "the teacher (flavor {}) has no decoder: set distill.caption_kl_weight = 0",
                    t.flavor
                )));
            }
            if t.vocab_size != s.vocab_size {
                return Err(bad(format!(
                    "the caption KL compares next-token distributions, but the teacher's vocabulary has {} tokens and the student's {}: set model.vocab_size = {} (the same tokenizer), or distill.caption_kl_weight = 0",
                    t.vocab_size, s.vocab_size, t.vocab_size
                )));
            }
        }
        let store = loaded.store;
        for p in store.params() {
            // Never trained: no gradient is ever computed for it.
            let _ = p.tensor.shallow_clone().set_requires_grad(false);
        }
        let pad_id =
            weaver_models::tokenizer::load(&job.data.tokenizer, job.model.vocab_size)?.pad_id();
        info!(
            url = %loaded.url,
            step = loaded.step,
            flavor = %t.flavor,
            params = store.numel(),
            teacher_tp = teacher_tp.size,
            teacher_tp_rank = teacher_tp.rank,
            replicas = groups.replicas.as_ref().map_or(1, |r| r.size()),
            ?kind,
            temperature = cfg.temperature,
            itc_kl_weight = cfg.itc_kl_weight,
            caption_kl_weight = cfg.caption_kl_weight,
            "distillation teacher loaded"
        );
        Ok(Teacher {
            model: loaded.model,
            group: groups.group,
            replicas: groups.replicas,
            student_tp,
            store,
            cfg,
            pad_id,
            url: loaded.url,
            projection: None,
        })
    }

    /// Creates the student's feature projection ([`PROJECTION`]) in `store` (the store of
    /// the ranks holding the student's last layer; its initial value, like every
    /// parameter's, a function of its name and the seed), when feature matching or
    /// interactive contrastive learning is on.
    pub fn add_projection(
        &self,
        store: &mut ParamStore,
        student: &ModelConfig,
    ) -> Result<(), WorkerError> {
        if !self.cfg.projects() {
            return Ok(());
        }
        let (et, es) = (
            self.model.config().embed_dim as i64,
            student.embed_dim as i64,
        );
        // The store keeps it; the trainer binds its final view after the optimizer is built.
        let _created = store.root().sub("distill").sub("proj").param(
            "weight",
            &[et, es],
            weaver_models::nn::Shard::FULL,
            weaver_models::nn::Init::Normal((es as f64).powf(-0.5)),
            true,
        )?;
        Ok(())
    }

    /// Takes the student's projection from `store` (once its parameters sit in their final
    /// buffers: after the optimizer is built), when it is there (see
    /// [`Teacher::add_projection`]).
    pub fn bind_projection(&mut self, store: &ParamStore) -> Result<(), WorkerError> {
        if !self.cfg.projects() {
            return Ok(());
        }
        let p = store
            .get(PROJECTION)
            .ok_or_else(|| bad(format!("the student has no {PROJECTION}")))?;
        self.projection = Some(p.shallow_clone());
        Ok(())
    }

    /// The teacher's checkpoint (its step directory).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The teacher's parameters on this rank, by name (views, not copies; this rank's
    /// slices when it is split over the tensor-parallel group).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.store
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect()
    }

    /// The teacher's model configuration.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The teacher's outputs for `batch` (its positive pairs only: no matching negatives,
    /// no objective rows), without a graph.
    pub fn outputs(&self, batch: &Batch) -> Result<TeacherOut, WorkerError> {
        tch::no_grad(|| {
            let plain = match &self.replicas {
                Some(r) => gather_batch(r.as_ref(), batch)?,
                None => Batch {
                    images: batch.images.shallow_clone(),
                    tokens: batch.tokens.shallow_clone(),
                    eos: batch.eos.shallow_clone(),
                    indices: batch.indices.clone(),
                    mlm: None,
                    vqa: None,
                },
            };
            // A split teacher runs over the group (forward only, whole sequences); a whole
            // one alone (a tape without a group is no tensor parallelism).
            let mut tape = Tape::new(self.group.clone());
            // Without the caption term only the encoders run (the decoder's output is unused).
            let mut acts = Acts::default();
            let tcfg = self.model.config();
            let end = if self.cfg.caption_kl_weight > 0.0 {
                Model::num_layers(tcfg)
            } else {
                tcfg.vision_layers + tcfg.unimodal_layers
            };
            self.model
                .forward_until(&mut tape, &mut acts, &plain, false, end)?;
            if let Some(r) = &self.replicas {
                // This replica's rows of the replicas' micro-batches.
                let b = batch.len() as i64;
                let mine = |t: &Option<Tensor>| -> Result<Option<Tensor>, WorkerError> {
                    Ok(t.as_ref()
                        .map(|t| t.f_narrow(0, r.rank() as i64 * b, b))
                        .transpose()?)
                };
                acts.image_emb = mine(&acts.image_emb)?;
                acts.text_emb = mine(&acts.text_emb)?;
            }
            let scale = self
                .model
                .logit_scale()
                .ok_or_else(|| bad("the teacher has no contrastive temperature".into()))?;
            let itc_logits = contrastive_logits(&acts, scale)?;
            let caption_log_p = if self.cfg.caption_kl_weight > 0.0 {
                let local = caption_logits(&self.model, &acts, batch)?;
                Some(self.caption_log_p(&mut tape, &local)?)
            } else {
                None
            };
            let embeddings = if self.cfg.projects() {
                let f = |t: &Option<Tensor>| {
                    t.as_ref()
                        .map(|t| t.f_to_kind(Kind::Float))
                        .transpose()?
                        .ok_or_else(|| bad("the teacher produced no embeddings".into()))
                };
                Some((f(&acts.image_emb)?, f(&acts.text_emb)?))
            } else {
                None
            };
            Ok(TeacherOut {
                itc_logits,
                caption_log_p,
                embeddings,
            })
        })
    }

    /// The teacher's softened log-probabilities ([`TeacherOut::caption_log_p`]) on this
    /// rank's slice of the student's vocabulary, from its caption logits `local` (its
    /// vocabulary slice when split over the group, `tape`'s; the whole vocabulary when
    /// whole). No graph.
    fn caption_log_p(&self, tape: &mut Tape, local: &Tensor) -> Result<Tensor, WorkerError> {
        let z = local.f_div_scalar(self.cfg.temperature)?;
        let dims = [-1i64];
        if self.group.is_some() {
            // Split: `log_softmax` over the group, as the vocab-parallel cross-entropy does.
            let tp_err =
                |e: weaver_parallel::tp::TpError| bad(format!("the teacher's caption logits: {e}"));
            let max = tape
                .max_no_grad(&z.f_amax(dims.as_slice(), true)?)
                .map_err(tp_err)?;
            let shifted = z.f_sub(&max)?;
            let sum_exp = tape
                .reduce_sum(&shifted.f_exp()?.f_sum_dim_intlist(
                    dims.as_slice(),
                    true,
                    Kind::Float,
                )?)
                .map_err(tp_err)?;
            return Ok(shifted.f_sub(&sum_exp.f_log()?)?);
        }
        let log_p = z.f_log_softmax(-1, Kind::Float)?;
        let pos = self.student_tp;
        if pos.size == 1 {
            return Ok(log_p);
        }
        // Whole on every rank: this rank's slice of the student's vocabulary.
        let v = log_p.size()[2];
        if v % pos.size as i64 != 0 {
            return Err(bad(format!(
                "the teacher's {v} tokens do not split over {} tensor-parallel ranks",
                pos.size
            )));
        }
        let v_local = v / pos.size as i64;
        Ok(log_p.f_narrow(2, pos.rank as i64 * v_local, v_local)?)
    }

    /// The distillation terms of a micro-batch: the teacher's outputs for `batch` against
    /// the student's last-layer activations `acts` and its losses `student_losses` (whose
    /// caption logits the caption KL compares; this rank's vocabulary slice under tensor
    /// parallelism, `tp` the group), `student` the student's model holding the last layer
    /// (its contrastive scale).
    pub fn losses(
        &self,
        tp: &mut dyn TensorParallel,
        student: &Model,
        acts: &Acts,
        student_losses: &Losses,
        batch: &Batch,
    ) -> Result<DistillTerms, WorkerError> {
        let teacher = self.outputs(batch)?;
        self.losses_against(&teacher, tp, student, acts, student_losses, batch)
    }

    /// [`Teacher::losses`] against outputs the teacher already computed for `batch` (full
    /// recomputation keeps them from the forward for the backward's rerun).
    pub fn losses_against(
        &self,
        teacher: &TeacherOut,
        tp: &mut dyn TensorParallel,
        student: &Model,
        acts: &Acts,
        student_losses: &Losses,
        batch: &Batch,
    ) -> Result<DistillTerms, WorkerError> {
        let t = self.cfg.temperature;
        let device = batch.tokens.device();
        let zero = || Tensor::f_zeros([], (Kind::Float, device));
        let itc_kl = if self.cfg.itc_kl_weight > 0.0 {
            let scale = match self.cfg.itc_scale {
                ItcScale::Own => student.logit_scale().ok_or_else(|| {
                    bad("the student's last stage has no contrastive head".into())
                })?,
                ItcScale::Teacher => self
                    .model
                    .logit_scale()
                    .ok_or_else(|| bad("the teacher has no contrastive temperature".into()))?,
            };
            let s = contrastive_logits(acts, scale)?;
            similarity_kl(&s, &teacher.itc_logits, t)?
        } else {
            zero()?
        };
        let caption_kl = match &teacher.caption_log_p {
            Some(tl) => {
                let sl = student_losses.caption_logits.as_ref().ok_or_else(|| {
                    bad("the student's losses carry no caption logits (no decoder)".into())
                })?;
                let targets = batch.tokens.f_narrow(1, 1, batch.tokens.size()[1] - 1)?;
                let valid = targets.f_ne(self.pad_id)?;
                vocab_parallel_token_kl(tp, sl, tl, &valid, t)?
            }
            None => zero()?,
        };
        let (feature, icl) = match (&teacher.embeddings, &self.projection) {
            (Some((ti, tt)), Some(proj)) => {
                let take = |t: &Option<Tensor>| {
                    t.as_ref()
                        .map(|t| t.f_to_kind(Kind::Float))
                        .transpose()?
                        .ok_or_else(|| bad("the student's last stage has no embeddings".into()))
                };
                let proj = proj.f_to_kind(Kind::Float)?;
                let si = projected(&take(&acts.image_emb)?, &proj)?;
                let st = projected(&take(&acts.text_emb)?, &proj)?;
                let feature = if self.cfg.feature_weight > 0.0 {
                    feature_distance(&si, ti)?
                        .f_add(&feature_distance(&st, tt)?)?
                        .f_mul_scalar(0.5)?
                } else {
                    zero()?
                };
                let icl = if self.cfg.icl_weight > 0.0 {
                    let scale = student.logit_scale().ok_or_else(|| {
                        bad("the student's last stage has no contrastive head".into())
                    })?;
                    interactive_contrastive(&si, &st, ti, tt, scale)?
                } else {
                    zero()?
                };
                (feature, icl)
            }
            (None, _) => (zero()?, zero()?),
            (Some(_), None) => {
                return Err(bad(format!(
                    "feature matching is on but the student's {PROJECTION} was not bound"
                )))
            }
        };
        let weighted = itc_kl
            .f_mul_scalar(self.cfg.itc_kl_weight)?
            .f_add(&caption_kl.f_mul_scalar(self.cfg.caption_kl_weight)?)?
            .f_add(&feature.f_mul_scalar(self.cfg.feature_weight)?)?
            .f_add(&icl.f_mul_scalar(self.cfg.icl_weight)?)?;
        Ok(DistillTerms {
            itc_kl,
            caption_kl,
            feature,
            icl,
            weighted,
        })
    }
}

/// The micro-batches of the ranks of `replicas` (the same shapes on each), concatenated in
/// rank order: images, tokens and EOS positions (the teacher's inputs). Collective over
/// `replicas`.
fn gather_batch(replicas: &dyn Communicator, batch: &Batch) -> Result<Batch, WorkerError> {
    let r = replicas.size() as i64;
    let err = |e: weaver_parallel::comm::CommError| {
        bad(format!(
            "gathering the micro-batches of the replicas sharing the teacher: {e}"
        ))
    };
    let gather = |t: &Tensor| -> Result<Tensor, WorkerError> {
        let t = t.f_contiguous()?;
        let mut shape = t.size();
        shape[0] *= r;
        let mut out = Tensor::f_empty(shape.as_slice(), (t.kind(), t.device()))?;
        replicas.all_gather(&t, &mut out).map_err(err)?;
        Ok(out)
    };
    let rows = batch.len() * replicas.size();
    Ok(Batch {
        images: gather(&batch.images)?,
        tokens: gather(&batch.tokens)?,
        eos: gather(&batch.eos)?,
        indices: vec![0; rows],
        mlm: None,
        vqa: None,
    })
}

/// A model's contrastive logits `[B, B]` (f32) from its last-layer activations: its
/// normalised image and text embeddings' similarities times `exp(scale)`, clamped at 100.
pub fn contrastive_logits(acts: &Acts, scale: &Tensor) -> Result<Tensor, WorkerError> {
    let take = |t: &Option<Tensor>, what: &str| {
        t.as_ref()
            .map(|t| t.f_to_kind(Kind::Float))
            .transpose()?
            .ok_or_else(|| bad(format!("the last layer's activations have no {what}")))
    };
    let ie = take(&acts.image_emb, "image embedding")?;
    let te = take(&acts.text_emb, "text embedding")?;
    let s = scale.f_to_kind(Kind::Float)?.f_exp()?.f_clamp_max(100.0)?;
    Ok(ie.f_matmul(&te.f_tr()?)?.f_mul(&s)?)
}

/// Next-token logits `[B, T − 1, V]` (f32) at the caption target positions of the positive
/// pairs (the first `B` rows of the decoder's states), from the last layer's activations.
fn caption_logits(model: &Model, acts: &Acts, batch: &Batch) -> Result<Tensor, WorkerError> {
    let b = batch.len() as i64;
    let text = acts
        .text
        .as_ref()
        .ok_or_else(|| bad("the last layer's activations have no text states".into()))?;
    let rows = Acts {
        text: Some(text.f_narrow(0, 0, b)?),
        ..Acts::default()
    };
    let logits = model.head_logits(&rows)?;
    let t = batch.tokens.size()[1];
    Ok(logits.f_narrow(1, 0, t - 1)?.f_to_kind(Kind::Float)?)
}

/// The student's embeddings `[B, E_student]` mapped to the teacher's width by `proj`
/// (`[E_teacher, E_student]`) and normalised again.
pub fn projected(student: &Tensor, proj: &Tensor) -> Result<Tensor, WorkerError> {
    let mapped = student.f_matmul(&proj.f_tr()?)?;
    let norm = mapped
        .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?;
    Ok(mapped.f_div(&norm)?)
}

/// The mean over rows of `‖student − teacher‖²` (both normalised; the student's through
/// [`projected`]).
pub fn feature_distance(student: &Tensor, teacher: &Tensor) -> Result<Tensor, WorkerError> {
    let d = student.f_sub(teacher)?;
    Ok(d.f_square()?
        .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)?
        .f_mean(Kind::Float)?)
}

/// Interactive contrastive learning (CLIP-KD): with `s = exp(scale)` clamped at 100, the
/// mean of the cross-entropies of the diagonal of `s · image · teacher_textᵀ` (rows) and of
/// `s · text · teacher_imageᵀ` (rows), each averaged over the batch. All embeddings
/// normalised, the student's projected to the teacher's width.
pub fn interactive_contrastive(
    image: &Tensor,
    text: &Tensor,
    teacher_image: &Tensor,
    teacher_text: &Tensor,
    scale: &Tensor,
) -> Result<Tensor, WorkerError> {
    let s = scale.f_to_kind(Kind::Float)?.f_exp()?.f_clamp_max(100.0)?;
    let b = image.size()[0];
    let labels = Tensor::f_arange(b, (Kind::Int64, image.device()))?;
    let ce = |a: &Tensor, t: &Tensor| -> Result<Tensor, WorkerError> {
        let logits = a.f_matmul(&t.f_tr()?)?.f_mul(&s)?;
        Ok(logits
            .f_log_softmax(-1, Kind::Float)?
            .f_nll_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100)?)
    };
    Ok(ce(image, teacher_text)?
        .f_add(&ce(text, teacher_image)?)?
        .f_mul_scalar(0.5)?)
}

/// `KL(p‖q)` of each row, `p = softmax(teacher / t)`, `q = softmax(student / t)` over the
/// last dimension.
pub fn kl_rows(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor, WorkerError> {
    let log_q = student.f_div_scalar(t)?.f_log_softmax(-1, Kind::Float)?;
    let log_p = teacher.f_div_scalar(t)?.f_log_softmax(-1, Kind::Float)?;
    Ok(log_p
        .f_exp()?
        .f_mul(&log_p.f_sub(&log_q)?)?
        .f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)?)
}

/// The similarity KL of contrastive logits `[B, B]` (image rows): `t² ·` the mean of the
/// image→text (rows) and text→image (columns) KLs, each averaged over the batch.
pub fn similarity_kl(student: &Tensor, teacher: &Tensor, t: f64) -> Result<Tensor, WorkerError> {
    let i2t = kl_rows(student, teacher, t)?.f_mean(Kind::Float)?;
    let t2i = kl_rows(&student.f_tr()?, &teacher.f_tr()?, t)?.f_mean(Kind::Float)?;
    Ok(i2t.f_add(&t2i)?.f_mul_scalar(0.5 * t * t)?)
}

/// The caption KL of next-token logits `[B, T', V]`: `t² ·` the mean per-position KL over
/// the positions where `valid` `[B, T']` holds (non-padding targets).
pub fn token_kl(
    student: &Tensor,
    teacher: &Tensor,
    valid: &Tensor,
    t: f64,
) -> Result<Tensor, WorkerError> {
    let per = kl_rows(student, teacher, t)?;
    masked_mean_t2(&per, valid, t)
}

/// The mean of the per-position KL `per` over the `valid` positions (at least one in the
/// divisor), times `t²`: what [`token_kl`] and [`vocab_parallel_token_kl`] return.
fn masked_mean_t2(per: &Tensor, valid: &Tensor, t: f64) -> Result<Tensor, WorkerError> {
    let w = valid.f_to_kind(Kind::Float)?;
    Ok(per
        .f_mul(&w)?
        .f_sum(Kind::Float)?
        .f_div(&w.f_sum(Kind::Float)?.f_clamp_min(1.0)?)?
        .f_mul_scalar(t * t)?)
}

/// [`token_kl`] of a student whose logits `[B, T', V / tp]` hold this rank's slice of the
/// vocabulary (rank `r` the tokens `r·V/tp ..`), against the teacher's softened
/// log-probabilities `log p = log_softmax(teacher / t)` on the same slice (see
/// [`TeacherOut::caption_log_p`]), computed over the tensor-parallel group `tp` the way the
/// vocab-parallel cross-entropy is (Megatron): with `s = student / t`, `KL(p‖q) = Σ_v p_v
/// (log p_v − s_v) + log Σ_v exp(s_v)`; the first sum is each rank's partial over its slice,
/// summed over the group, and the log-partition function comes from the group's maximum and
/// its summed `exp`. The gradient to this rank's logits is `(q_v − p_v) / t` (times `t²` and
/// the mask), local to the slice; the sums pass the gradient unchanged. One process (`tp` of
/// size 1) is [`token_kl`] itself.
pub fn vocab_parallel_token_kl(
    tp: &mut dyn TensorParallel,
    student: &Tensor,
    teacher_log_p: &Tensor,
    valid: &Tensor,
    t: f64,
) -> Result<Tensor, WorkerError> {
    let dims = [-1i64];
    let s = student.f_to_kind(Kind::Float)?.f_div_scalar(t)?;
    let log_p = teacher_log_p.f_to_kind(Kind::Float)?;
    if s.size() != log_p.size() {
        return Err(bad(format!(
            "the student's caption logits {:?} and the teacher's log-probabilities {:?} do not cover the same positions and vocabulary slice",
            s.size(),
            log_p.size()
        )));
    }
    let pos = tp.pos();
    if pos.size == 1 {
        let log_q = s.f_log_softmax(-1, Kind::Float)?;
        let per = log_p
            .f_exp()?
            .f_mul(&log_p.f_sub(&log_q)?)?
            .f_sum_dim_intlist(dims.as_slice(), false, Kind::Float)?;
        return masked_mean_t2(&per, valid, t);
    }
    let tp_err = |e: weaver_parallel::tp::TpError| WorkerError::Other(format!("caption KL: {e}"));
    let partial = log_p.f_exp()?.f_mul(&log_p.f_sub(&s)?)?.f_sum_dim_intlist(
        dims.as_slice(),
        false,
        Kind::Float,
    )?;
    let cross = tp.reduce_sum(&partial).map_err(tp_err)?;
    let max = tp
        .max_no_grad(&s.f_amax(dims.as_slice(), true)?.f_detach()?)
        .map_err(tp_err)?;
    let sum_exp = tp
        .reduce_sum(&s.f_sub(&max)?.f_exp()?.f_sum_dim_intlist(
            dims.as_slice(),
            false,
            Kind::Float,
        )?)
        .map_err(tp_err)?;
    let log_z = sum_exp.f_log()?.f_add(&max.f_squeeze_dim(-1)?)?;
    let per = cross.f_add(&log_z)?;
    masked_mean_t2(&per, valid, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KLs against a hand computation on small numbers: `KL(p‖q) = Σ p log(p/q)`
    /// written out with plain f64 arithmetic.
    #[test]
    fn kl_matches_hand_computation() {
        let s = [[1.0f64, 0.5, -0.3], [0.2, 2.0, 0.1], [-1.0, 0.0, 0.7]];
        let te = [[2.0f64, -0.5, 0.3], [0.0, 1.0, 1.5], [0.4, -0.2, 1.2]];
        let t = 1.7;
        let softmax = |row: [f64; 3]| {
            let e: Vec<f64> = row.iter().map(|x| (x / t).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<_>>()
        };
        let kl = |a: [f64; 3], b: [f64; 3]| {
            let (p, q) = (softmax(b), softmax(a));
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>()
        };
        let col = |m: [[f64; 3]; 3], j: usize| [m[0][j], m[1][j], m[2][j]];
        let i2t: f64 = (0..3).map(|i| kl(s[i], te[i])).sum::<f64>() / 3.0;
        let t2i: f64 = (0..3).map(|j| kl(col(s, j), col(te, j))).sum::<f64>() / 3.0;
        let want_sim = 0.5 * (i2t + t2i) * t * t;
        let flat = |m: [[f64; 3]; 3]| {
            Tensor::from_slice(&m.concat())
                .reshape([3, 3])
                .to_kind(Kind::Float)
        };
        let got_sim = similarity_kl(&flat(s), &flat(te), t)
            .unwrap()
            .double_value(&[]);
        assert!(
            (got_sim - want_sim).abs() < 1e-5 * want_sim.abs().max(1.0),
            "similarity KL {got_sim} vs hand {want_sim}"
        );
        // Token KL: rows 0 and 2 valid, row 1 padding.
        let valid = Tensor::from_slice(&[true, false, true]).reshape([1, 3]);
        let want_tok = (kl(s[0], te[0]) + kl(s[2], te[2])) / 2.0 * t * t;
        let got_tok = token_kl(
            &flat(s).reshape([1, 3, 3]),
            &flat(te).reshape([1, 3, 3]),
            &valid,
            t,
        )
        .unwrap()
        .double_value(&[]);
        assert!(
            (got_tok - want_tok).abs() < 1e-5 * want_tok.abs().max(1.0),
            "token KL {got_tok} vs hand {want_tok}"
        );
        // Feature distance: [1, 0] through the identity against [0, 1] is |(1, −1)|² = 2;
        // against itself 0; the projection's scale does not matter (normalised).
        let eye = Tensor::eye(2, (Kind::Float, tch::Device::Cpu)) * 3.0;
        let s1 = Tensor::from_slice(&[1.0f32, 0.0, 0.6, 0.8]).reshape([2, 2]);
        let t1 = Tensor::from_slice(&[0.0f32, 1.0, 0.6, 0.8]).reshape([2, 2]);
        let f = feature_distance(&projected(&s1, &eye).unwrap(), &t1)
            .unwrap()
            .double_value(&[]);
        assert!(
            (f - 1.0).abs() < 1e-6,
            "feature distance {f} vs (2 + 0) / 2"
        );
        // Interactive contrastive learning: rows of the student against the teacher's other
        // modality, written out with f64 (scale log 2.5: s = 2.5).
        let si = [[0.6f64, 0.8], [1.0, 0.0], [0.0, 1.0]];
        let st = [[0.8f64, 0.6], [0.0, 1.0], [-0.6, 0.8]];
        let ti = [[1.0f64, 0.0], [0.6, -0.8], [0.28, 0.96]];
        let tt = [[0.0f64, 1.0], [0.96, 0.28], [-0.8, 0.6]];
        let sc = 2.5f64;
        let ce = |a: [[f64; 2]; 3], b: [[f64; 2]; 3]| {
            (0..3)
                .map(|i| {
                    let l: Vec<f64> = (0..3)
                        .map(|j| sc * (a[i][0] * b[j][0] + a[i][1] * b[j][1]))
                        .collect();
                    let z: f64 = l.iter().map(|x| x.exp()).sum();
                    z.ln() - l[i]
                })
                .sum::<f64>()
                / 3.0
        };
        let want_icl = 0.5 * (ce(si, tt) + ce(st, ti));
        let m = |x: [[f64; 2]; 3]| {
            Tensor::from_slice(&x.concat())
                .reshape([3, 2])
                .to_kind(Kind::Float)
        };
        let scale = Tensor::from(sc.ln()).to_kind(Kind::Float);
        let got_icl = interactive_contrastive(&m(si), &m(st), &m(ti), &m(tt), &scale)
            .unwrap()
            .double_value(&[]);
        assert!(
            (got_icl - want_icl).abs() < 1e-5 * want_icl.abs().max(1.0),
            "ICL {got_icl} vs hand {want_icl}"
        );
        // A student equal to its teacher has nothing left to learn.
        let same = similarity_kl(&flat(te), &flat(te), t)
            .unwrap()
            .double_value(&[]);
        assert!(same.abs() < 1e-6, "{same}");
    }
}
