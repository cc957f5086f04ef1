//! open_clip interoperability: start weaver from open_clip's CoCa and CLIP weights and give
//! the result back to open_clip.
//!
//! | module | owns |
//! |---|---|
//! | [`pickle`] | reading `torch.save` state dicts (`.pt`, `.bin`) without Python |
//! | [`mapping`] | the open_clip ↔ weaver name and layout table, both directions |
//! | this file | `weaver import open_clip` ([`import`]) and `weaver ckpt export --format open_clip` ([`export`]) |
//!
//! An import writes an ordinary weaver checkpoint (step 0, global tensors, a manifest), so
//! `[model] init_from` starts a run from it on any layout; an export writes one safetensors
//! state dict that `open_clip.create_model(arch).load_state_dict(.., strict=True)` takes.

pub mod error;
pub mod mapping;
pub mod pickle;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tracing::info;
use weaver_checkpoint::{
    block_on, commit, Checkpoint, CkptStore, Layout, SavedTensor, ShardWriter,
};
use weaver_models::nn::{ParamStore, TpPos};
use weaver_models::{JobConfig, Model, ModelConfig};

pub use error::{InteropError, Result};

/// open_clip architectures (`open_clip.create_model` names) and the weaver flavors that are
/// exactly them.
pub const ARCHS: [(&str, &str); 3] = [
    ("coca_ViT-B-32", "openclip-coca-b32"),
    ("coca_ViT-L-14", "openclip-coca-l14"),
    ("ViT-B-32", "openclip-clip-b32"),
];

/// Name of the job config inside a checkpoint (what a training rank 0 writes too).
pub const CONFIG: &str = "train.config";

/// The weaver flavor of an open_clip architecture.
pub fn flavor_of(arch: &str) -> Result<&'static str> {
    ARCHS
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, f)| *f)
        .ok_or_else(|| InteropError::UnknownArch {
            arch: arch.to_string(),
            known: ARCHS.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", "),
        })
}

/// Reads a state dict: `.safetensors`, or a `torch.save` zip (`.pt`, `.pth`, `.bin`; told
/// apart by content, not by name).
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut magic = [0u8; 4];
    let p = path.display().to_string();
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|source| InteropError::Io {
            path: p.clone(),
            source,
        })?;
        let _ = f.read(&mut magic).map_err(|source| InteropError::Io {
            path: p.clone(),
            source,
        })?;
    }
    let is_safetensors = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    if &magic == b"PK\x03\x04" || !is_safetensors {
        return pickle::read_torch_zip(path);
    }
    Tensor::read_safetensors(path).map_err(|e| InteropError::Zip {
        path: p,
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// Names and global shapes of every parameter of the whole model `cfg`, in creation order.
pub fn param_shapes(cfg: &ModelConfig) -> Result<Vec<(String, Vec<i64>)>> {
    // Built on the CPU at the model's size: the values are thrown away.
    let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
    Model::new(&mut store, cfg, 0..Model::num_layers(cfg), TpPos::SINGLE, 0)?;
    Ok(store
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.global_shape.clone()))
        .collect())
}

/// The job config an imported checkpoint carries: the flavor, and open_clip's loss weights
/// for it (CoCa: contrastive 1, captioning 2; CLIP: contrastive only).
pub fn import_config(flavor: &str) -> Result<JobConfig> {
    let caption = if ModelConfig::flavor(flavor)?.multimodal_layers > 0 {
        2.0
    } else {
        0.0
    };
    Ok(JobConfig::parse(
        &format!(
            "[model]\nflavor = \"{flavor}\"\n[train]\nitc_weight = 1.0\ncaption_weight = {caption}\nitm_weight = 0.0\n"
        ),
        &[],
    )?)
}

/// What [`import`] wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The checkpoint (its step directory).
    pub url: String,
    /// The flavor it is.
    pub flavor: String,
    /// Parameters written.
    pub tensors: usize,
    /// Their elements.
    pub numel: i64,
}

/// Converts the open_clip state dict `weights` of `arch` and writes it as a committed weaver
/// checkpoint of step 0 under `out` (a checkpoint root: local path or object-store URL).
pub fn import(arch: &str, weights: &Path, out: &str) -> Result<ImportReport> {
    let flavor = flavor_of(arch)?;
    let job = import_config(flavor)?;
    let cfg = &job.model;
    info!(arch, flavor, weights = %weights.display(), "reading the open_clip state dict");
    let sd = read_state_dict(weights)?;
    let shapes = param_shapes(cfg)?;
    let params = mapping::to_weaver(cfg, arch, sd, &shapes)?;
    let numel = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let tensors = params.len();
    let store = CkptStore::open(out)?;
    let mut saved: Vec<SavedTensor> = params
        .into_iter()
        .map(|(n, t)| SavedTensor::whole(n, t))
        .collect();
    saved.push(SavedTensor::from_bytes(CONFIG, job.to_toml().as_bytes()));
    info!(tensors, numel, out, "writing the weaver checkpoint");
    let report = ShardWriter::new(&store).start(0, 0, saved)?.wait()?;
    let mut layout = Layout::new(1, 1, 1);
    layout.extra = serde_json_value(arch, flavor, weights);
    let manifest = block_on(commit(&store, 0, layout, vec![report]))?;
    Ok(ImportReport {
        url: format!(
            "{}/{}",
            store.url().trim_end_matches('/'),
            weaver_checkpoint::manifest::step_dir(manifest.step)
        ),
        flavor: flavor.to_string(),
        tensors,
        numel,
    })
}

fn serde_json_value(arch: &str, flavor: &str, weights: &Path) -> serde_json::Value {
    serde_json::json!({
        "source": "open_clip",
        "arch": arch,
        "flavor": flavor,
        "weights": weights.display().to_string(),
    })
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The file.
    pub path: PathBuf,
    /// The open_clip architecture it loads into.
    pub arch: String,
    /// Tensors written.
    pub tensors: usize,
}

/// Writes the parameters of the checkpoint `url` as an open_clip state dict (safetensors,
/// f32) to `out`; the model is the one in the checkpoint's config, which open_clip must be
/// able to represent ([`mapping::check`]).
pub fn export(url: &str, out: &Path) -> Result<ExportReport> {
    let ckpt = block_on(Checkpoint::open_url(url))?;
    let text = block_on(ckpt.read_bytes(CONFIG))?;
    let text = String::from_utf8_lossy(&text);
    let job = JobConfig::parse(&text, &[])?;
    let cfg = &job.model;
    let arch = ARCHS
        .iter()
        .find(|(_, f)| *f == cfg.flavor)
        .map(|(a, _)| a.to_string())
        .unwrap_or_else(|| format!("an open_clip model like flavor {}", cfg.flavor));
    let mut params = Vec::new();
    for (name, _) in param_shapes(cfg)? {
        let t = block_on(ckpt.read_tensor(&name))?;
        params.push((name, t));
    }
    // A LoRA run's adapters are merged into their layers' weights (open_clip has no place
    // for them; the merged model computes what the adapted one does).
    let adapters: Vec<String> = ckpt
        .manifest()
        .tensors
        .keys()
        .filter(|n| weaver_models::lora::is_adapter(n))
        .cloned()
        .collect();
    if !adapters.is_empty() {
        let scale = weaver_models::lora::LoraSpec::of(&job.train)
            .map(|s| s.scale())
            .ok_or_else(|| InteropError::BadTensor {
                path: url.to_string(),
                name: adapters[0].clone(),
                message: "a LoRA adapter, but the checkpoint's config has train.lora_rank = 0, so its scale is unknown".into(),
            })?;
        for name in adapters {
            let t = block_on(ckpt.read_tensor(&name))?;
            params.push((name, t));
        }
        params = weaver_models::lora::merge_all(params, scale)?;
        info!(scale, "LoRA adapters merged into their layers' weights");
    }
    let sd = mapping::to_open_clip(cfg, params)?;
    let tensors = sd.len();
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    Tensor::write_safetensors(&sd, &partial)?;
    std::fs::rename(&partial, out).map_err(|source| InteropError::Io {
        path: out.display().to_string(),
        source,
    })?;
    Ok(ExportReport {
        path: out.to_path_buf(),
        arch,
        tensors,
    })
}
