//! The linear probe (`weaver eval --probe`): the standard measure of a representation.
//! The image encoder is frozen; its (normalised) image embeddings of a labelled training set
//! are standardised and a multinomial logistic regression is fitted on them by full-batch
//! gradient descent with the step `1 / L` (`L` bounds the curvature of the mean
//! cross-entropy: half the largest eigenvalue of the features' second moment, plus the L2
//! weight), which converges on this convex problem without tuning; its accuracy on a
//! held-out labelled set is reported.
//!
//! Labelled images come through [`LabelledImages`]: the synthetic scenes label themselves
//! (the first object's shape or colour, [`SyntheticLabels`]); WebDataset shards with a
//! `cls` entry implement the same trait.

use tch::{Device, Kind, Tensor};
use weaver_models::data::{Dataset, Split, COLORS, SHAPES};
use weaver_models::Model;

use crate::error::WorkerError;

/// A source of labelled images.
pub trait LabelledImages {
    /// Number of classes (labels are `0..classes`).
    fn classes(&self) -> usize;
    /// Images `[B, 3, H, W]` and labels `[B]` (int64) of samples `indices` of `split`.
    fn load(
        &self,
        split: Split,
        indices: &[u64],
        device: Device,
    ) -> Result<(Tensor, Tensor), WorkerError>;
}

/// What a synthetic scene is labelled by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SceneLabel {
    /// The first object's shape (4 classes).
    Shape,
    /// The first object's colour (6 classes).
    Color,
}

impl std::str::FromStr for SceneLabel {
    type Err = WorkerError;
    fn from_str(s: &str) -> Result<SceneLabel, WorkerError> {
        match s {
            "shape" => Ok(SceneLabel::Shape),
            "color" | "colour" => Ok(SceneLabel::Color),
            other => Err(WorkerError::Other(format!(
                "unknown probe label {other:?}: use shape or color"
            ))),
        }
    }
}

/// The synthetic dataset's scenes, labelled by their first object.
#[derive(Debug, Clone)]
pub struct SyntheticLabels {
    /// The dataset.
    pub data: Dataset,
    /// The label.
    pub label: SceneLabel,
}

impl LabelledImages for SyntheticLabels {
    fn classes(&self) -> usize {
        match self.label {
            SceneLabel::Shape => SHAPES.len(),
            SceneLabel::Color => COLORS.len(),
        }
    }

    fn load(
        &self,
        split: Split,
        indices: &[u64],
        device: Device,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        let batch = self.data.batch(split, indices, device)?;
        let labels: Vec<i64> = indices
            .iter()
            .map(|&i| {
                let o = self.data.scene(split, i).objects[0];
                match self.label {
                    SceneLabel::Shape => o.shape as i64,
                    SceneLabel::Color => o.color as i64,
                }
            })
            .collect();
        Ok((
            batch.images,
            Tensor::f_from_slice(&labels)?.f_to_device(device)?,
        ))
    }
}

/// Sizes and optimisation of a probe.
#[derive(Debug, Clone, Copy)]
pub struct ProbeConfig {
    /// Training samples (from the training split).
    pub train: usize,
    /// Held-out samples (from the held-out split).
    pub test: usize,
    /// Gradient-descent steps.
    pub steps: usize,
    /// L2 weight on the classifier's weights.
    pub l2: f64,
    /// Samples per forward pass of the image encoder.
    pub chunk: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            train: 2000,
            test: 1000,
            steps: 1000,
            l2: 1e-4,
            chunk: 100,
        }
    }
}

/// What a probe measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProbeResult {
    /// Accuracy on the held-out samples.
    pub accuracy: f64,
    /// Accuracy on the training samples.
    pub train_accuracy: f64,
    /// Accuracy of always answering the most frequent training class on the held-out set.
    pub majority: f64,
    /// `1 / classes`.
    pub chance: f64,
    /// Number of classes.
    pub classes: usize,
    /// Training samples.
    pub train: usize,
    /// Held-out samples.
    pub test: usize,
}

/// Normalised image embeddings of `split` samples `0..n` (encoder frozen: no gradients).
pub fn image_features(
    model: &Model,
    source: &dyn LabelledImages,
    split: Split,
    n: usize,
    chunk: usize,
    device: Device,
) -> Result<(Tensor, Tensor), WorkerError> {
    let indices: Vec<u64> = (0..n as u64).collect();
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    tch::no_grad(|| -> Result<(), WorkerError> {
        for part in indices.chunks(chunk.max(1)) {
            let (images, labels) = source.load(split, part, device)?;
            xs.push(model.image_embeddings(&images)?.f_to_kind(Kind::Float)?);
            ys.push(labels);
        }
        Ok(())
    })?;
    Ok((Tensor::f_cat(&xs, 0)?, Tensor::f_cat(&ys, 0)?))
}

/// Fits a logistic-regression probe on `(train_x, train_y)` and measures it on
/// `(test_x, test_y)` (features `[N, D]` f32, labels `[N]` int64 in `0..classes`).
pub fn fit_probe(
    train_x: &Tensor,
    train_y: &Tensor,
    test_x: &Tensor,
    test_y: &Tensor,
    classes: usize,
    cfg: &ProbeConfig,
) -> Result<ProbeResult, WorkerError> {
    let n = train_x.size()[0];
    let d = train_x.size()[1];
    let c = classes as i64;
    let dev = train_x.device();
    // Standardise with the training set's statistics.
    let mean = train_x.f_mean_dim([0i64].as_slice(), true, Kind::Float)?;
    let std = train_x
        .f_std_dim([0i64].as_slice(), false, true)?
        .f_clamp_min(1e-6)?;
    let xtr = train_x.f_sub(&mean)?.f_div(&std)?;
    let xte = test_x.f_sub(&mean)?.f_div(&std)?;
    // Curvature bound of mean softmax cross-entropy in (W, b): ≤ ½ λmax(E[x̃ x̃ᵀ]) with
    // x̃ = [x, 1], plus the L2 term.
    let ones = Tensor::f_ones([n, 1], (Kind::Float, dev))?;
    let xa = Tensor::f_cat(&[&xtr, &ones], 1)?;
    let second = xa.f_tr()?.f_matmul(&xa)?.f_div_scalar(n as f64)?;
    let lmax = second
        .f_linalg_eigvalsh("L")?
        .f_max()?
        .f_double_value(&[])?;
    let lr = 1.0 / (0.5 * lmax + cfg.l2);
    let w = Tensor::f_zeros([d, c], (Kind::Float, dev))?.set_requires_grad(true);
    let b = Tensor::f_zeros([c], (Kind::Float, dev))?.set_requires_grad(true);
    for _ in 0..cfg.steps {
        let logits = xtr.f_matmul(&w)?.f_add(&b)?;
        let loss = logits
            .f_cross_entropy_loss::<Tensor>(train_y, None, tch::Reduction::Mean, -100, 0.0)?
            .f_add(
                &w.f_square()?
                    .f_sum(Kind::Float)?
                    .f_mul_scalar(0.5 * cfg.l2)?,
            )?;
        let grads = Tensor::f_run_backward(&[&loss], &[&w, &b], false, false)?;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            let _ = w.shallow_clone().f_sub_(&grads[0].f_mul_scalar(lr)?)?;
            let _ = b.shallow_clone().f_sub_(&grads[1].f_mul_scalar(lr)?)?;
            Ok(())
        })?;
    }
    let accuracy = |x: &Tensor, y: &Tensor| -> Result<f64, WorkerError> {
        let pred = tch::no_grad(|| x.f_matmul(&w)?.f_add(&b)?.f_argmax(1, false))?;
        Ok(pred
            .f_eq_tensor(y)?
            .f_to_kind(Kind::Float)?
            .f_mean(Kind::Float)?
            .f_double_value(&[])?)
    };
    let counts = train_y.f_bincount::<Tensor>(None, c)?;
    let top = counts.f_argmax(0, false)?.f_int64_value(&[])?;
    let majority = test_y
        .f_eq(top)?
        .f_to_kind(Kind::Float)?
        .f_mean(Kind::Float)?
        .f_double_value(&[])?;
    Ok(ProbeResult {
        accuracy: accuracy(&xte, test_y)?,
        train_accuracy: accuracy(&xtr, train_y)?,
        majority,
        chance: 1.0 / classes as f64,
        classes,
        train: n as usize,
        test: test_x.size()[0] as usize,
    })
}

/// The probe of a whole (single-process) model on `source`.
pub fn probe(
    model: &Model,
    source: &dyn LabelledImages,
    cfg: &ProbeConfig,
    device: Device,
) -> Result<ProbeResult, WorkerError> {
    let (xtr, ytr) = image_features(model, source, Split::Train, cfg.train, cfg.chunk, device)?;
    let (xte, yte) = image_features(model, source, Split::Heldout, cfg.test, cfg.chunk, device)?;
    fit_probe(&xtr, &ytr, &xte, &yte, source.classes(), cfg)
}
