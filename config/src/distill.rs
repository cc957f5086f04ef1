//! `[distill]`: knowledge distillation from a frozen teacher (Hinton et al. 2015), the
//! teacher a weaver checkpoint of its own flavor. The student trains on the hard losses of
//! `[train]` plus, weighted here, the KL divergences between the teacher's and the
//! student's softened distributions: the image→text and text→image similarity
//! distributions of the micro-batch (`itc_kl_weight`) and the caption tokens' next-token
//! distributions (`caption_kl_weight`); feature matching (`feature_weight`) and CLIP-KD's
//! interactive contrastive learning (`icl_weight`) through a learned projection.
//!
//! Where it runs (see the worker's `distill` module): the teacher is loaded on every rank
//! that holds the last pipeline stage and runs forward only on each micro-batch there, in
//! bf16 on a GPU and in the run's dtype on a CPU, split over `teacher_tp` ranks of that
//! stage ([`DistillSection::teacher_group`]): by default the student's tensor-parallel
//! group (each rank holds `1/tp` of its weights), `1` for the whole teacher on every rank,
//! or more ranks than the student's group — whole groups of several data-parallel
//! replicas, whose micro-batches the teacher then runs together — for a teacher larger than
//! the student's tensor parallelism can hold. Every layout works; the caption KL is
//! computed vocab-parallel over the student's group (and needs `teacher_tp` at most the
//! student's tp: a teacher spanning replicas splits its vocabulary otherwise).

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;
use crate::error::ConfigError;

/// Whose contrastive scale the similarity KL uses (`distill.itc_scale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItcScale {
    /// Both models' similarities times the teacher's scale.
    Teacher,
    /// Each model's similarities times its own scale.
    Own,
}

/// `[distill]` (off while `teacher` is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// The teacher's checkpoint (a step directory, or a checkpoint root: its latest
    /// committed step), local path or URL. Empty: no distillation.
    pub teacher: String,
    /// The teacher's flavor when its checkpoint carries no job config (`train.config`, which
    /// every training run, import, quantization and pruning write; when it has one, the
    /// teacher's whole model configuration comes from there and this key must be empty or
    /// agree with it).
    pub flavor: String,
    /// Softening temperature `T` of both distributions; the KL terms are multiplied by `T²`
    /// so that their gradients keep their scale as `T` changes (Hinton et al.).
    pub temperature: f64,
    /// Weight of the KL divergence between the teacher's and the student's image→text and
    /// text→image similarity distributions over the micro-batch (the mean of the two), the
    /// similarities scaled as `itc_scale` says.
    pub itc_kl_weight: f64,
    /// Whose contrastive scale multiplies the similarities in the similarity KL:
    /// `"teacher"` (both models' cosine similarities times the teacher's learned scale, so
    /// that the student matches the teacher's similarity structure and its own scale is
    /// left to its contrastive loss) or `"own"` (each model's own scale, as TinyCLIP's
    /// affinity mimicking does).
    pub itc_scale: ItcScale,
    /// Weight of the KL divergence between the teacher's and the student's next-token
    /// distributions at every caption target position (mean over non-padding targets).
    pub caption_kl_weight: f64,
    /// Weight of feature matching: the student's normalised image and text embeddings,
    /// through a learned projection to the teacher's embedding width (trained with the
    /// student), against the teacher's: the squared distance of the normalised vectors
    /// summed over the embedding (`2 − 2 cos`, in [0, 4]), the mean over the micro-batch
    /// (CLIP-KD's mean over elements is `1 / E_teacher` of it).
    pub feature_weight: f64,
    /// Weight of interactive contrastive learning (CLIP-KD, Yang et al. 2023): the
    /// contrastive loss of the student's image embeddings, through the feature projection,
    /// against the teacher's text embeddings, and of the student's projected text
    /// embeddings against the teacher's image embeddings (the mean of both directions;
    /// cross-entropy over the micro-batch, the student's own learned scale).
    pub icl_weight: f64,
    /// Over how many ranks of the last pipeline stage the teacher is split (its own tensor
    /// parallelism): 0, the default, is the student's `parallel.tp` (the teacher cut like
    /// the student, over its group); 1 is the whole teacher on every rank; a multiple `k` of
    /// `parallel.tp` with `k / tp` dividing `parallel.dp` splits it over the groups of `k /
    /// tp` consecutive data-parallel replicas, which run their micro-batches through it
    /// together (without the caption KL, which needs `teacher_tp` ≤ `parallel.tp`). The
    /// teacher's head counts and split widths must divide by it.
    pub teacher_tp: usize,
}

impl Default for DistillSection {
    fn default() -> Self {
        DistillSection {
            teacher: String::new(),
            flavor: String::new(),
            temperature: 2.0,
            // Measured (bench/distill, README "Distillation"; 8 seeds, paired): feature
            // matching at 8 with interactive contrastive learning at 1 beats the student
            // alone on every seed; the KL terms (the previous defaults, 0.25 each next to
            // feature matching at 1) are level with it and add nothing measurable next to
            // feature matching and ICL.
            itc_kl_weight: 0.0,
            itc_scale: ItcScale::Teacher,
            caption_kl_weight: 0.0,
            feature_weight: 8.0,
            icl_weight: 1.0,
            teacher_tp: 0,
        }
    }
}

impl DistillSection {
    /// Whether the student needs the feature projection and the teacher's embeddings
    /// (feature matching or interactive contrastive learning is on).
    pub fn projects(&self) -> bool {
        self.feature_weight > 0.0 || self.icl_weight > 0.0
    }

    /// The teacher's tensor-parallel size `k` and the data-parallel replicas `r` that share
    /// each of its groups (`k = r · tp`, or `k = 1`, `r = 1` for a whole teacher), for a
    /// student of `tp` tensor-parallel ranks and `dp` replicas; or why `teacher_tp` does not
    /// fit that layout (a message naming the keys to change).
    pub fn teacher_group(&self, tp: usize, dp: usize) -> Result<(usize, usize), String> {
        let (tp, dp) = (tp.max(1), dp.max(1));
        let k = if self.teacher_tp == 0 {
            tp
        } else {
            self.teacher_tp
        };
        if k == 1 {
            return Ok((1, 1));
        }
        if k % tp != 0 {
            return Err(format!(
                "distill.teacher_tp = {k} must be 1 or a multiple of parallel.tp = {tp} (the teacher's groups are whole tensor-parallel groups of the student)"
            ));
        }
        let r = k / tp;
        if dp % r != 0 {
            return Err(format!(
                "distill.teacher_tp = {k} spans {r} data-parallel replicas of {tp} ranks, but parallel.dp = {dp} is not a multiple of {r}: pick a teacher_tp of parallel.tp times a divisor of dp"
            ));
        }
        if r > 1 && self.caption_kl_weight > 0.0 {
            return Err(format!(
                "the caption KL compares vocabulary slices of the student's {tp} tensor-parallel ranks, but distill.teacher_tp = {k} splits the teacher's vocabulary over more ranks: set distill.teacher_tp to at most parallel.tp, or distill.caption_kl_weight = 0"
            ));
        }
        Ok((k, r))
    }

    /// Whether the job distills (a teacher is named).
    pub fn enabled(&self) -> bool {
        !self.teacher.trim().is_empty()
    }

    /// Checks the keys against the student's model and layout (the teacher's own shape is
    /// checked when it is loaded).
    pub fn validate(
        &self,
        student: &ModelConfig,
        layout: Option<(usize, usize)>,
    ) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| {
            Err(ConfigError::BadConfig {
                key: format!("distill.{key}"),
                message,
            })
        };
        for (key, w) in [
            ("itc_kl_weight", self.itc_kl_weight),
            ("caption_kl_weight", self.caption_kl_weight),
            ("feature_weight", self.feature_weight),
            ("icl_weight", self.icl_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return bad(key, format!("must be a finite weight ≥ 0, got {w}"));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(
                "temperature",
                format!("must be a positive number, got {}", self.temperature),
            );
        }
        if !self.enabled() {
            return Ok(());
        }
        if self.itc_kl_weight == 0.0
            && self.caption_kl_weight == 0.0
            && self.feature_weight == 0.0
            && self.icl_weight == 0.0
        {
            return bad(
                "itc_kl_weight",
                "distill.teacher is set but every distillation weight is 0: set itc_kl_weight, caption_kl_weight, feature_weight or icl_weight > 0, or remove the teacher".into(),
            );
        }
        if let Some((tp, dp)) = layout {
            if let Err(message) = self.teacher_group(tp, dp) {
                return bad("teacher_tp", message);
            }
        }
        if self.caption_kl_weight > 0.0 && student.multimodal_layers == 0 {
            return bad(
                "caption_kl_weight",
                format!(
                    "the student (flavor {}) has no multimodal layers, so it predicts no caption tokens: set distill.caption_kl_weight = 0",
                    student.flavor
                ),
            );
        }
        Ok(())
    }
}
