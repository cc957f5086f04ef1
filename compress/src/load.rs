//! One loader for every weaver checkpoint a model can run from: a training checkpoint, an
//! imported one, a quantized one (`weaver ckpt quantize`: int8 weights and their scales in
//! place of the float weights) and a pruned one (`weaver ckpt prune`: a smaller model
//! config, and for magnitude pruning the masks). `weaver eval` uses it for compressed
//! checkpoints, `weaver infer` for all.
//!
//! The model's configuration comes from the checkpoint (`train.config`, which every
//! training rank 0, import, quantization and pruning write) when it has one: a pruned
//! model's smaller layers are only described there. The caller's job supplies everything
//! else (data, evaluation, device). Each rank reads only its slices, so the loader works for
//! any tensor-parallel part and any range of layers.
//!
//! A LoRA run's checkpoint loads as the plain model it computes: each adapted layer's
//! weight becomes `W + s · B A` (the scale `s = alpha / r` from the checkpoint's own
//! `train` section; each rank adds its slice of `s · B A`), so quantization, pruning,
//! evaluation, inference and a distillation teacher take it without a merged export first.

use std::collections::HashMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};
use tracing::info;
use weaver_checkpoint::{block_on, Checkpoint, Dtype, Manifest, SliceRequest};
use weaver_models::nn::{ParamStore, Shard, TpPos};
use weaver_models::quant::{Int8Mode, Int8Weight};
use weaver_models::{tokenizer, JobConfig, Model};

use crate::error::{parse_choice, CompressError, Result};

/// The job config's tensor in a checkpoint (as the trainer writes it).
pub const CONFIG: &str = "train.config";
/// The key of [`QuantInfo`] in a checkpoint's `layout.extra`.
pub const QUANTIZATION: &str = "quantization";
/// Suffix of a quantized weight's per-output-channel scales (`<weight>.scale`).
pub const SCALE: &str = ".scale";
/// Suffix of a quantized weight's smoothing factors (`<weight>.smooth`).
pub const SMOOTH: &str = ".smooth";

/// A quantization scheme of `weaver ckpt quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    /// Per-output-channel symmetric int8 weights; float activations.
    #[serde(rename = "int8-weight")]
    Int8Weight,
    /// int8 weights and per-token int8 activations at run time, int32 accumulation.
    #[serde(rename = "int8-dynamic")]
    Int8Dynamic,
}

impl Scheme {
    /// Every scheme, in the order `--scheme` lists them.
    pub const ALL: [Scheme; 2] = [Scheme::Int8Weight, Scheme::Int8Dynamic];

    /// The name on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Int8Weight => "int8-weight",
            Scheme::Int8Dynamic => "int8-dynamic",
        }
    }

    /// How its layers compute.
    pub fn mode(self) -> Int8Mode {
        match self {
            Scheme::Int8Weight => Int8Mode::WeightOnly,
            Scheme::Int8Dynamic => Int8Mode::Dynamic,
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = CompressError;

    fn from_str(s: &str) -> Result<Scheme> {
        parse_choice("--scheme", "scheme", s, &Scheme::ALL, Scheme::name)
    }
}

/// What a quantized checkpoint records about itself (in `layout.extra.quantization`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// The scheme.
    pub scheme: Scheme,
    /// The checkpoint it was made from.
    pub source: String,
    /// Linear layers quantized.
    pub layers: usize,
    /// Held-out samples of the calibration pass (0: none).
    pub calibration_samples: usize,
    /// SmoothQuant's α of the calibrated smoothing factors (`None`: not smoothed).
    pub smooth_alpha: Option<f64>,
}

/// The quantization a checkpoint's manifest records, if any.
pub fn quantization(m: &Manifest) -> Result<Option<QuantInfo>> {
    match m.layout.extra.get(QUANTIZATION) {
        None => Ok(None),
        Some(v) => {
            serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| CompressError::BadCheckpoint {
                    url: format!("step {}", m.step),
                    message: format!("unreadable layout.extra.{QUANTIZATION}: {e}"),
                })
        }
    }
}

/// The job config a checkpoint carries (`train.config`), if it has one.
pub fn checkpoint_job(ckpt: &Checkpoint) -> Result<Option<JobConfig>> {
    if !ckpt.manifest().tensors.contains_key(CONFIG) {
        return Ok(None);
    }
    let text = block_on(ckpt.read_bytes(CONFIG))?;
    let text = String::from_utf8_lossy(&text);
    JobConfig::parse(&text, &[])
        .map(Some)
        .map_err(|e| CompressError::BadCheckpoint {
            url: ckpt.url(),
            message: format!("its {CONFIG} does not parse: {e}"),
        })
}

/// `job` with the model of the checkpoint's own config, when it has one (a pruned model's
/// smaller layers are only described there); everything else stays the caller's.
pub fn job_for(ckpt: &Checkpoint, job: &JobConfig) -> Result<JobConfig> {
    let mut job = job.clone();
    if let Some(saved) = checkpoint_job(ckpt)? {
        if saved.model != job.model {
            info!(url = %ckpt.url(), flavor = %saved.model.flavor, "the model's configuration comes from the checkpoint");
        }
        job.model = saved.model;
        job.file.model = saved.file.model;
    }
    Ok(job)
}

/// Where and how to build the model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Device of the parameters.
    pub device: Device,
    /// Dtype of the float parameters (int8 weights stay int8, their scales f32).
    pub kind: Kind,
    /// The layers to build (`None`: every layer).
    pub layers: Option<Range<usize>>,
    /// This rank's tensor-parallel position (its slices are read).
    pub tp: TpPos,
}

impl LoadOptions {
    /// The whole model in f32 on the CPU.
    pub fn cpu() -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            layers: None,
            tp: TpPos::SINGLE,
        }
    }
}

/// A model loaded from a checkpoint, ready to run.
#[derive(Debug)]
pub struct Loaded {
    /// The job: the caller's, with the checkpoint's model.
    pub job: JobConfig,
    /// The float parameters (quantized weights are not in it).
    pub store: ParamStore,
    /// The model.
    pub model: Model,
    /// The checkpoint's quantization, if any.
    pub quantization: Option<QuantInfo>,
    /// The checkpoint's step.
    pub step: u64,
    /// The checkpoint (its step directory).
    pub url: String,
}

/// Global index ranges of `shard` of a tensor of `global` shape.
pub(crate) fn shard_ranges(global: &[i64], shard: Shard) -> Vec<Range<u64>> {
    let mut r: Vec<Range<u64>> = global.iter().map(|&d| 0..d as u64).collect();
    if shard.world > 1 {
        let (dim, start, len) = shard.range(global);
        r[dim] = start as u64..(start + len) as u64;
    }
    r
}

/// Opens `url` and loads it ([`load_checkpoint`]).
pub fn load(url: &str, job: &JobConfig, opts: &LoadOptions) -> Result<Loaded> {
    let ckpt = block_on(Checkpoint::open_url(url))?;
    load_checkpoint(&ckpt, job, opts)
}

/// Builds this rank's part of the checkpoint's model and fills it from the checkpoint:
/// quantized linear layers get their int8 weights, scales and smoothing factors (their float
/// weights leave the store), every other parameter its float values.
pub fn load_checkpoint(ckpt: &Checkpoint, job: &JobConfig, opts: &LoadOptions) -> Result<Loaded> {
    let job = job_for(ckpt, job)?;
    let manifest = ckpt.manifest();
    let url = ckpt.url();
    let quant = quantization(manifest)?;
    let tok = tokenizer::load(&job.data.tokenizer, job.model.vocab_size)?;
    let n = Model::num_layers(&job.model);
    let layers = opts.layers.clone().unwrap_or(0..n);
    let mut store = ParamStore::new(opts.device, opts.kind, job.train.seed);
    let mut model = Model::new(&mut store, &job.model, layers, opts.tp, tok.pad_id())?;
    let bad = |message: String| CompressError::BadCheckpoint {
        url: url.clone(),
        message,
    };
    let shapes: HashMap<String, (Vec<i64>, Shard)> = store
        .params()
        .iter()
        .map(|p| (p.name.clone(), (p.global_shape.clone(), p.shard)))
        .collect();

    // Quantized linear layers.
    let mut quantized = Vec::new();
    if let Some(q) = &quant {
        let mode = q.scheme.mode();
        let (kind, device) = (opts.kind, opts.device);
        model.for_each_linear(&mut |l| {
            let info = manifest.tensors.get(&l.name).ok_or_else(|| {
                weaver_models::ModelError::ParamMismatch(format!("{url}: no {}", l.name))
            })?;
            if info.dtype != Dtype::I8 {
                // Left in float by the quantizer.
                return Ok(());
            }
            let (global, shard) = shapes.get(&l.name).cloned().ok_or_else(|| {
                weaver_models::ModelError::ParamMismatch(format!("no parameter {}", l.name))
            })?;
            let w = shard_ranges(&global, shard);
            // The scales follow the output rows (split by a column-parallel layer), the
            // smoothing factors the input columns (split by a row-parallel one).
            let scale = vec![w[0].clone()];
            let smooth = vec![w[1].clone()];
            let mut reqs = vec![
                SliceRequest::new(l.name.clone(), w),
                SliceRequest::new(format!("{}{SCALE}", l.name), scale),
            ];
            let smoothed = manifest
                .tensors
                .contains_key(&format!("{}{SMOOTH}", l.name));
            if smoothed {
                reqs.push(SliceRequest::new(format!("{}{SMOOTH}", l.name), smooth));
            }
            let mut got = block_on(ckpt.read_slices(&reqs)).map_err(|e| {
                weaver_models::ModelError::ParamMismatch(format!("{}: {e}", l.name))
            })?;
            let f32_on = |t: Tensor| t.f_to_kind(Kind::Float)?.f_to_device(device);
            let smooth = if smoothed {
                got.pop().map(f32_on).transpose()?
            } else {
                None
            };
            let scale = got.pop().map(f32_on).transpose()?;
            let qw = got.pop().map(|t| t.f_to_device(device)).transpose()?;
            let (Some(qw), Some(scale)) = (qw, scale) else {
                return Err(missing_tensor(&l.name));
            };
            l.quant = Some(Int8Weight {
                q: qw,
                scale,
                smooth,
                mode,
            });
            l.weight = Tensor::f_empty([0], (kind, device))?;
            quantized.push(l.name.clone());
            Ok(())
        })?;
        for name in &quantized {
            store.remove(name);
        }
    }

    // Every other parameter, in float.
    let mut reqs = Vec::new();
    for p in store.params() {
        let info = manifest.tensors.get(&p.name).ok_or_else(|| {
            bad(format!(
                "it has no {} (is it a checkpoint of flavor {}?)",
                p.name, job.model.flavor
            ))
        })?;
        let saved: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if saved != p.global_shape {
            return Err(bad(format!(
                "{} has shape {saved:?} there but {:?} in this model",
                p.name, p.global_shape
            )));
        }
        if !matches!(
            info.dtype,
            Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64
        ) {
            return Err(bad(format!(
                "{} is stored as {}, not as floats; a quantized weight needs the manifest's {QUANTIZATION} record",
                p.name, info.dtype
            )));
        }
        reqs.push(SliceRequest::new(
            p.name.clone(),
            shard_ranges(&p.global_shape, p.shard),
        ));
    }
    let values = block_on(ckpt.read_slices(&reqs))?;
    let adapters = adapter_scale(ckpt)?;
    let mut merged = 0;
    let mut named = Vec::with_capacity(reqs.len());
    for (r, t) in reqs.into_iter().zip(values) {
        let t = match adapters {
            Some(scale) => match merge_adapter(ckpt, &r, &t, scale)? {
                Some(w) => {
                    merged += 1;
                    w
                }
                None => t,
            },
            None => t,
        };
        named.push((r.name, t.f_to_kind(opts.kind)?.f_to_device(opts.device)?));
    }
    if let Some(scale) = adapters {
        info!(url = %url, scale, layers = merged, "LoRA adapters merged into their layers' weights");
    }
    store.load_local(&named)?;
    info!(
        url = %url,
        step = ckpt.step(),
        scheme = quant.as_ref().map(|q| q.scheme.name()).unwrap_or("none"),
        quantized = quantized.len(),
        float_params = store.params().len(),
        "model loaded"
    );
    Ok(Loaded {
        job,
        store,
        model,
        quantization: quant,
        step: ckpt.step(),
        url,
    })
}

/// The scale `alpha / r` of the checkpoint's LoRA adapters (from its own `train.config`),
/// or `None` when it holds none.
fn adapter_scale(ckpt: &Checkpoint) -> Result<Option<f64>> {
    if !ckpt
        .manifest()
        .tensors
        .keys()
        .any(|n| weaver_models::lora::is_adapter(n))
    {
        return Ok(None);
    }
    let bad = |message: &str| CompressError::BadCheckpoint {
        url: ckpt.url(),
        message: message.into(),
    };
    let saved = checkpoint_job(ckpt)?.ok_or_else(|| {
        bad("it holds LoRA adapters but no train.config, so their scale (train.lora_alpha / train.lora_rank) is unknown")
    })?;
    let spec = weaver_models::lora::LoraSpec::of(&saved.train).ok_or_else(|| {
        bad("it holds LoRA adapters but its config has train.lora_rank = 0, so their scale is unknown")
    })?;
    Ok(Some(spec.scale()))
}

/// This rank's slice `w` (as `req` read it) of a weight with its adapter merged in, `w +
/// (s · B A)[slice]` in f32 ([`weaver_models::lora::merge`]), when the checkpoint holds
/// `<layer>.lora_a` and `<layer>.lora_b` for it; `None` otherwise.
fn merge_adapter(
    ckpt: &Checkpoint,
    req: &SliceRequest,
    w: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    use weaver_config::finetune::{LORA_A, LORA_B};
    let Some(layer) = req.name.strip_suffix(".weight") else {
        return Ok(None);
    };
    let (a, b) = (format!("{layer}.{LORA_A}"), format!("{layer}.{LORA_B}"));
    let tensors = &ckpt.manifest().tensors;
    if !(tensors.contains_key(&a) && tensors.contains_key(&b)) {
        return Ok(None);
    }
    // The factors are small (`[r, in]`, `[out, r]`): read whole, the product sliced.
    let a = block_on(ckpt.read_tensor(&a))?;
    let b = block_on(ckpt.read_tensor(&b))?;
    let zero = Tensor::f_zeros([b.size()[0], a.size()[1]], (Kind::Float, Device::Cpu))?;
    let mut delta = weaver_models::lora::merge(&zero, &a, &b, scale)?;
    for (dim, r) in req.ranges.iter().enumerate() {
        delta = delta.f_narrow(dim as i64, r.start as i64, (r.end - r.start) as i64)?;
    }
    Ok(Some(w.f_to_kind(Kind::Float)?.f_add(&delta)?))
}

fn missing_tensor(name: &str) -> weaver_models::ModelError {
    weaver_models::ModelError::ParamMismatch(format!(
        "{name}: its int8 values or scales are missing"
    ))
}
