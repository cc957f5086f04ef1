//! `[model] init_from`: a run's initial parameters from a checkpoint (one written by
//! `weaver import open_clip`, or any run's), read as this rank's slices so that it works on
//! any layout. Parameters only: the optimizer starts fresh and the run at step 0. Image
//! positions saved for another image size are resized to this one (open_clip's
//! `resize_pos_embed`).

use tch::Tensor;
use tracing::info;
use weaver_checkpoint::{block_on, Checkpoint, SliceRequest};
use weaver_config::finetune::is_lora;
use weaver_models::model::resize_vision_pos;
use weaver_models::nn::ParamStore;
use weaver_models::ModelConfig;

use crate::ckpt::{param_ranges, to_param};
use crate::error::WorkerError;
use crate::optim::{AdamW, FlatAdamW};

/// Where the optimizer keeps the f32 values that must start from the loaded parameters too.
#[derive(Debug)]
pub enum Values<'a> {
    /// No optimizer: the parameters only.
    None,
    /// The per-parameter reference optimizer (its f32 master copies, when there are any).
    PerParam(&'a mut AdamW),
    /// The flat-buffer optimizer (its f32 values: masters, or the f32 parameters).
    Flat(&'a FlatAdamW),
}

/// The image positions' name: the one parameter that may differ in shape (another image
/// size).
const VISION_POS: &str = "vision.pos";

/// Loads `cfg.init_from` (if set) into this rank's parameters and, given the optimizer,
/// their f32 values. Every parameter must be in the checkpoint with its global shape (the
/// image positions may be for another image size).
pub fn load_init_from(
    cfg: &ModelConfig,
    store: &ParamStore,
    mut values: Values<'_>,
) -> Result<(), WorkerError> {
    let Some(url) = &cfg.init_from else {
        return Ok(());
    };
    let ckpt = block_on(Checkpoint::open_url(url))?;
    let manifest = ckpt.manifest();
    let mut requests = Vec::new();
    let mut resized: Vec<(usize, Tensor)> = Vec::new();
    let mut fresh_adapters = 0;
    for (i, p) in store.params().iter().enumerate() {
        if crate::distill::is_distill_param(&p.name) && !manifest.tensors.contains_key(&p.name) {
            // Distillation's feature projection starts fresh (its initial value).
            continue;
        }
        if is_lora(&p.name) && !manifest.tensors.contains_key(&p.name) {
            // A base model for LoRA fine-tuning: the adapters start fresh (B = 0, so the
            // adapted model starts as the loaded one).
            fresh_adapters += 1;
            continue;
        }
        let info = manifest.tensors.get(&p.name).ok_or_else(|| {
            WorkerError::Checkpoint(format!(
                "model.init_from = {url}: the checkpoint has no {} (is it a checkpoint of flavor {}?)",
                p.name, cfg.flavor
            ))
        })?;
        let saved: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if saved == p.global_shape {
            requests.push((i, SliceRequest::new(p.name.clone(), param_ranges(p))));
        } else if p.name == VISION_POS {
            let whole = block_on(ckpt.read_tensor(&p.name))?;
            info!(from = ?saved, to = ?p.global_shape, "resizing the image positions to model.image_size");
            resized.push((i, resize_vision_pos(&whole, cfg)?));
        } else {
            return Err(WorkerError::Checkpoint(format!(
                "model.init_from = {url}: {} has shape {saved:?} there but {:?} in this model; the checkpoint is of another architecture",
                p.name, p.global_shape
            )));
        }
    }
    if let Some(n) = manifest
        .tensors
        .keys()
        .find(|n| crate::ckpt::is_param(n) && is_lora(n))
    {
        if !store.params().iter().any(|p| &p.name == n) {
            return Err(WorkerError::Checkpoint(format!(
                "model.init_from = {url}: the checkpoint holds LoRA adapters ({n}) this model does not have; start from its merged export (`weaver ckpt export`, then `weaver import`), or set the same train.lora_rank and train.lora_targets"
            )));
        }
    }
    if fresh_adapters > 0 {
        info!(
            adapters = fresh_adapters,
            "LoRA adapters not in model.init_from: they start fresh (the base model's outputs)"
        );
    }
    let reqs: Vec<SliceRequest> = requests.iter().map(|(_, r)| r.clone()).collect();
    let tensors = block_on(ckpt.read_slices(&reqs))?;
    let loaded = requests.iter().map(|(i, _)| *i).zip(tensors).chain(resized);
    let params = store.params();
    tch::no_grad(|| -> Result<(), WorkerError> {
        for (i, value) in loaded {
            let p = &params[i];
            let device = p.tensor.device();
            p.tensor
                .shallow_clone()
                .f_copy_(&to_param(&value, p.tensor.kind(), device)?)?;
            let f32_value = to_param(&value, tch::Kind::Float, device)?;
            match &mut values {
                Values::None => {}
                Values::PerParam(o) => {
                    if let Some(master) = o.states[i].master.as_mut() {
                        master.f_copy_(&f32_value)?;
                    }
                }
                Values::Flat(o) => o.load_value(i, &f32_value)?,
            }
        }
        Ok(())
    })?;
    info!(url = %ckpt.url(), step = ckpt.step(), params = params.len(), "initial parameters loaded (model.init_from)");
    Ok(())
}
