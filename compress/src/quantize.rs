//! `weaver ckpt quantize`: a checkpoint's linear layers as per-output-channel symmetric int8
//! weights with f32 scales ([`weaver_models::quant`]), written as a new checkpoint that
//! [`crate::load`] (and so `weaver eval` and `weaver infer`) runs.
//!
//! Every linear layer of the model is quantized (attention and MLP projections, the patch
//! embedding, the poolers' projections, the fusion projection, the captioning and matching
//! heads); embedding tables, positions, norms, class tokens and the temperature stay f32.
//! The output holds, for a quantized weight `W`: `W` as `I8` `[out, in]`, `W.scale` `F32`
//! `[out]`, and with smoothing `W.smooth` `F32` `[in]`; the manifest's
//! `layout.extra.quantization` records the scheme ([`QuantInfo`]); the job config travels
//! as `train.config`.
//!
//! `int8-dynamic` quantizes activations per token at run time. Its calibration pass runs
//! the float model over held-out samples (synthetic held-out indices from
//! [`CALIBRATION_FIRST`] on, far from the evaluation pool; or, for a job with held-out
//! shards, `data.eval_shards`' samples after the evaluation pool, which the caller reads
//! ([`HeldoutShards`]: this crate does not depend on the loader)), records each layer's
//! per-input-channel activation maximum, and folds SmoothQuant's factors
//! `s = max|x|^α / max|w|^(1−α)` into the weights before quantizing them (activations are
//! divided by `s` at run time). `int8-weight` leaves activations in float and needs no
//! calibration.

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tracing::info;
use weaver_checkpoint::{
    block_on, commit, Checkpoint, CkptStore, Layout, SavedTensor, ShardWriter,
};
use weaver_models::config::DataSource;
use weaver_models::data::{Batch, Dataset, Split};
use weaver_models::model::Acts;
use weaver_models::quant::{quantize_per_channel, smoothing_factors, Observer};
use weaver_models::{tokenizer, JobConfig, Model};
use weaver_parallel::tp::NoTp;

use crate::error::{CompressError, Result};
use crate::load::{
    load_checkpoint, quantization, LoadOptions, QuantInfo, Scheme, CONFIG, QUANTIZATION, SCALE,
    SMOOTH,
};

/// First synthetic held-out index the calibration pass reads (the evaluation pool is the
/// first few hundred held-out indices).
pub const CALIBRATION_FIRST: u64 = 1 << 32;

/// How to quantize.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// The scheme.
    pub scheme: Scheme,
    /// Held-out samples of the calibration pass (`int8-dynamic` only; 0: no calibration,
    /// no smoothing).
    pub calibration_samples: usize,
    /// SmoothQuant's migration strength α in `[0, 1]` (0: no smoothing).
    pub smooth_alpha: f64,
    /// Samples per calibration batch.
    pub batch: usize,
}

impl QuantizeOptions {
    /// The defaults of `scheme`: `int8-dynamic` calibrates on 256 held-out samples with
    /// α = 0.5; `int8-weight` needs no calibration.
    pub fn new(scheme: Scheme) -> QuantizeOptions {
        let dynamic = scheme == Scheme::Int8Dynamic;
        QuantizeOptions {
            scheme,
            calibration_samples: if dynamic { 256 } else { 0 },
            smooth_alpha: if dynamic { 0.5 } else { 0.0 },
            batch: 32,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(CompressError::BadOption {
                key: key.into(),
                message,
            })
        };
        if !(0.0..=1.0).contains(&self.smooth_alpha) {
            return bad(
                "--smooth-alpha",
                format!("{} is not in [0, 1]", self.smooth_alpha),
            );
        }
        if self.scheme == Scheme::Int8Weight
            && (self.calibration_samples > 0 || self.smooth_alpha > 0.0)
        {
            return bad(
                "--calibrate",
                "int8-weight keeps activations in float: it has nothing to calibrate (drop --calibrate and --smooth-alpha)".into(),
            );
        }
        if self.smooth_alpha > 0.0 && self.calibration_samples == 0 {
            return bad(
                "--smooth-alpha",
                "smoothing factors come from the calibration pass: pass --calibrate N (N > 0) or --smooth-alpha 0".into(),
            );
        }
        if self.batch == 0 {
            return bad("--batch", "must be at least 1".into());
        }
        Ok(())
    }
}

/// What [`quantize`] wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// The new checkpoint (its step directory).
    pub url: String,
    /// What the manifest records.
    pub info: QuantInfo,
    /// Parameters now stored as int8.
    pub int8_params: u64,
    /// Parameters still stored as floats.
    pub float_params: u64,
    /// Bytes of the source's model parameters (optimizer state not counted).
    pub source_param_bytes: u64,
    /// Bytes of the new checkpoint's files (everything in it).
    pub bytes: u64,
}

/// The held-out batches of a job's shards (`data.eval_shards`) for the calibration pass:
/// `(job, samples, batch)` → at most `samples` held-out samples of `job` after its
/// evaluation pool, in batches of `batch`, on the CPU, read one at a time.
pub type HeldoutShards<'a> =
    &'a dyn Fn(&JobConfig, usize, usize) -> Result<Box<dyn Iterator<Item = Result<Batch>>>>;

/// The synthetic dataset of `job`, for calibration.
fn calibration_data(job: &JobConfig) -> Result<Dataset> {
    if job.data.source != DataSource::Synthetic {
        return Err(CompressError::BadOption {
            key: "--calibrate".into(),
            message: "the job trains on shards and names no held-out shards to calibrate on: set data.eval_shards (--set data.eval_shards=URL), or use --calibrate 0 --smooth-alpha 0".into(),
        });
    }
    let tok = tokenizer::load(&job.data.tokenizer, job.model.vocab_size)?;
    Ok(Dataset {
        seed: job.data.seed,
        image_size: job.model.image_size,
        max_objects: job.data.max_objects,
        text_len: job.model.max_text_len,
        tokenizer: Arc::from(tok),
    })
}

/// Runs `samples` held-out samples through `model` (the captions teacher-forced, so every
/// layer sees realistic inputs) and returns each linear layer's per-input-channel
/// activation maximum.
pub fn calibrate(
    model: &mut Model,
    data: &Dataset,
    samples: usize,
    batch: usize,
) -> Result<HashMap<String, Tensor>> {
    let indices: Vec<u64> = (CALIBRATION_FIRST..CALIBRATION_FIRST + samples as u64).collect();
    let batches = indices
        .chunks(batch.max(1))
        .map(|part| Ok(data.batch(Split::Heldout, part, Device::Cpu)?));
    calibrate_on(model, batches)
}

/// [`calibrate`] on the held-out `batches` (captions teacher-forced, as there).
pub fn calibrate_on(
    model: &mut Model,
    batches: impl Iterator<Item = Result<Batch>>,
) -> Result<HashMap<String, Tensor>> {
    model.for_each_linear(&mut |l| {
        l.observer = Some(Observer::default());
        Ok(())
    })?;
    let run = tch::no_grad(|| -> Result<()> {
        for b in batches {
            let b = b?;
            let mut acts = Acts::default();
            model.forward(&mut NoTp, &mut acts, &b, false)?;
        }
        Ok(())
    });
    let mut maxima = HashMap::new();
    model.for_each_linear(&mut |l| {
        if let Some(m) = l.observer.take().and_then(|o| o.take()) {
            maxima.insert(l.name.clone(), m);
        }
        Ok(())
    })?;
    run?;
    Ok(maxima)
}

/// Quantizes the checkpoint `src` (a training checkpoint, an import, any unquantized
/// checkpoint; its model config from its `train.config`, else from `job`) and writes the
/// result as a committed checkpoint of the same step under the root `out`. Calibrates on
/// the synthetic held-out split: [`quantize_with`] reads held-out shards.
pub fn quantize(
    src: &str,
    out: &str,
    job: &JobConfig,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    quantize_with(src, out, job, opts, None)
}

/// [`quantize`], calibrating on `shards` when the job names held-out shards
/// (`data.eval_shards`; else on the synthetic held-out split).
pub fn quantize_with(
    src: &str,
    out: &str,
    job: &JobConfig,
    opts: &QuantizeOptions,
    shards: Option<HeldoutShards<'_>>,
) -> Result<QuantizeReport> {
    opts.check()?;
    let ckpt = block_on(Checkpoint::open_url(src))?;
    if let Some(q) = quantization(ckpt.manifest())? {
        return Err(CompressError::BadCheckpoint {
            url: ckpt.url(),
            message: format!(
                "it is already quantized ({}, from {}); quantize the float checkpoint",
                q.scheme.name(),
                q.source
            ),
        });
    }
    let mut loaded = load_checkpoint(&ckpt, job, &LoadOptions::cpu())?;
    let dynamic = opts.scheme == Scheme::Int8Dynamic;
    let maxima = if dynamic && opts.calibration_samples > 0 {
        info!(
            samples = opts.calibration_samples,
            "calibration pass over held-out data"
        );
        match shards {
            Some(read) if !loaded.job.data.eval_shards.is_empty() => {
                info!(shards = ?loaded.job.data.eval_shards, "calibrating on held-out shards");
                let batches = read(&loaded.job, opts.calibration_samples, opts.batch)?;
                calibrate_on(&mut loaded.model, batches)?
            }
            _ => {
                let data = calibration_data(&loaded.job)?;
                calibrate(
                    &mut loaded.model,
                    &data,
                    opts.calibration_samples,
                    opts.batch,
                )?
            }
        }
    } else {
        HashMap::new()
    };

    // name → (int8 values, scales, smoothing factors)
    let mut quantized: HashMap<String, (Tensor, Tensor, Option<Tensor>)> = HashMap::new();
    let alpha = opts.smooth_alpha;
    loaded.model.for_each_linear(&mut |l| {
        let w = l.weight.f_detach()?.f_to_kind(Kind::Float)?;
        let smooth = match maxima.get(&l.name) {
            Some(act) if alpha > 0.0 => Some(smoothing_factors(act, &w, alpha)?),
            _ => None,
        };
        let w = match &smooth {
            Some(s) => w.f_mul(&s.f_unsqueeze(0)?)?,
            None => w,
        };
        let (q, scale) = quantize_per_channel(&w)?;
        quantized.insert(l.name.clone(), (q, scale, smooth));
        Ok(())
    })?;

    let layers = quantized.len();
    let (mut int8_params, mut float_params) = (0u64, 0u64);
    let mut saved = Vec::new();
    for p in loaded.store.params() {
        match quantized.remove(&p.name) {
            Some((q, scale, smooth)) => {
                int8_params += q.numel() as u64;
                saved.push(SavedTensor::whole(p.name.clone(), q));
                saved.push(SavedTensor::whole(format!("{}{SCALE}", p.name), scale));
                if let Some(s) = smooth {
                    saved.push(SavedTensor::whole(format!("{}{SMOOTH}", p.name), s));
                }
            }
            None => {
                float_params += p.tensor.numel() as u64;
                let t = p
                    .tensor
                    .f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()?;
                saved.push(SavedTensor::whole(p.name.clone(), t));
            }
        }
    }
    saved.push(SavedTensor::from_bytes(
        CONFIG,
        loaded.job.to_toml().as_bytes(),
    ));
    let info = QuantInfo {
        scheme: opts.scheme,
        source: ckpt.url(),
        layers,
        calibration_samples: if maxima.is_empty() {
            0
        } else {
            opts.calibration_samples
        },
        smooth_alpha: (alpha > 0.0 && !maxima.is_empty()).then_some(alpha),
    };
    let source_param_bytes = ckpt
        .manifest()
        .tensors
        .iter()
        .filter(|(n, _)| {
            !n.starts_with("optim.") && !n.starts_with("train.") && !n.starts_with("data.")
        })
        .map(|(_, t)| t.nbytes())
        .sum();
    let store = CkptStore::open(out)?;
    let step = ckpt.step();
    let report = ShardWriter::new(&store).start(step, 0, saved)?.wait()?;
    let mut layout = Layout::new(1, 1, 1);
    layout.extra = serde_json::json!({ QUANTIZATION: info });
    let manifest = block_on(commit(&store, step, layout, vec![report]))?;
    let url = format!(
        "{}/{}",
        store.url().trim_end_matches('/'),
        weaver_checkpoint::manifest::step_dir(step)
    );
    info!(url = %url, scheme = opts.scheme.name(), int8_params, float_params, bytes = manifest.total_bytes(), "quantized checkpoint written");
    Ok(QuantizeReport {
        url,
        info,
        int8_params,
        float_params,
        source_param_bytes,
        bytes: manifest.total_bytes(),
    })
}
