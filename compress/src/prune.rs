//! `weaver ckpt prune`: a checkpoint made sparser or smaller, written as a new checkpoint
//! that [`crate::load`] (and so `weaver eval`, `weaver infer` and `[model] init_from`) runs.
//!
//! - `magnitude` (unstructured): in every linear weight of the transformer blocks
//!   (attention and cross-attention projections, MLPs), the `sparsity` fraction of entries
//!   with the smallest magnitude, per weight, is set to exactly zero (ties broken by
//!   position, so exactly `⌊sparsity · numel⌋` per weight). The model's shape is unchanged;
//!   fine-tuning keeps the zeros with `train.prune_mask = true` (the mask is the zero
//!   pattern of the initial weights, re-applied after every optimizer step).
//! - `mlp` (structured): in every MLP (and the open_clip decoder's second MLP), the hidden
//!   channels with the smallest score `‖fc1 row‖₂ · ‖fc2 column‖₂` are removed: the
//!   checkpoint is a smaller model whose `model.mlp_ratio` is `mlp_ratio · (1 − sparsity)`,
//!   which must therefore be a whole number (e.g. 0.25, 0.5, 0.75 of ratio 4).
//! - `heads` (structured): in every attention (self-attention, cross-attention, the
//!   attentional pooler), the heads with the smallest score `‖q, k, v rows of the head‖₂ ·
//!   ‖o columns of the head‖₂` (the norm of the head's input projections, all three
//!   together, times the norm of its slice of the output projection; a weight-only
//!   proxy of how much the head can write into the stream) are removed, the same count
//!   `heads · (1 − sparsity)` (a whole number ≥ 1) in every attention of a tower. The
//!   checkpoint is a smaller model: `model.vision_heads`, `text_heads` (and
//!   `attn_pool_heads`) shrink while `model.vision_head_dim`, `text_head_dim` (and
//!   `attn_pool_head_dim`) keep the source's head width, written explicitly. q, k and v
//!   lose the head's rows (weights and biases), o its columns; o's bias stays.
//!
//! Optimizer state is not carried over (fine-tuning starts a fresh optimizer through
//! `model.init_from`). The manifest's `layout.extra.pruning` records what was done
//! ([`PruneInfo`]); the (possibly smaller) job config travels as `train.config`.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use tracing::info;
use weaver_checkpoint::{
    block_on, commit, Checkpoint, CkptStore, Layout, SavedTensor, ShardWriter,
};
use weaver_models::JobConfig;

use crate::error::{parse_choice, CompressError, Result};
use crate::load::{load_checkpoint, quantization, LoadOptions, CONFIG};

/// The key of [`PruneInfo`] in a checkpoint's `layout.extra`.
pub const PRUNING: &str = "pruning";

/// A pruning method of `weaver ckpt prune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Unstructured: the smallest-magnitude entries of each block linear weight zeroed.
    Magnitude,
    /// Whole attention heads, by norm score: fewer heads of the same width.
    Heads,
    /// Whole MLP hidden channels, by norm score: a narrower MLP.
    Mlp,
}

impl Method {
    /// Every method, in the order `--method` lists them.
    pub const ALL: [Method; 3] = [Method::Magnitude, Method::Heads, Method::Mlp];

    /// The name on the command line and in the manifest.
    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::Heads => "heads",
            Method::Mlp => "mlp",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = CompressError;

    fn from_str(s: &str) -> Result<Method> {
        parse_choice("--method", "method", s, &Method::ALL, Method::name)
    }
}

/// What a pruned checkpoint records about itself (in `layout.extra.pruning`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneInfo {
    /// The method.
    pub method: Method,
    /// The fraction asked for.
    pub sparsity: f64,
    /// The checkpoint it was made from.
    pub source: String,
    /// Weights pruned (magnitude), MLPs narrowed (mlp) or attentions narrowed (heads).
    pub layers: usize,
}

/// The pruning a checkpoint's manifest records, if any.
pub fn pruning(m: &weaver_checkpoint::Manifest) -> Result<Option<PruneInfo>> {
    match m.layout.extra.get(PRUNING) {
        None => Ok(None),
        Some(v) => {
            serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| CompressError::BadCheckpoint {
                    url: format!("step {}", m.step),
                    message: format!("unreadable layout.extra.{PRUNING}: {e}"),
                })
        }
    }
}

/// What [`prune`] wrote.
#[derive(Debug, Clone)]
pub struct PruneReport {
    /// The new checkpoint (its step directory).
    pub url: String,
    /// What the manifest records.
    pub info: PruneInfo,
    /// Parameters of the source model.
    pub params_before: u64,
    /// Parameters of the pruned model (fewer for `mlp`).
    pub params_after: u64,
    /// Parameters that are exactly zero in the pruned model.
    pub zeros: u64,
    /// Bytes of the new checkpoint's files.
    pub bytes: u64,
    /// `--method heads`: each attention's parameter prefix (`vision.blocks.0.attn.`) and
    /// the source's heads it kept, ascending; empty for the other methods.
    pub kept_heads: Vec<(String, Vec<i64>)>,
}

/// Whether `name` is a linear weight of a transformer block (what magnitude pruning prunes).
pub fn is_block_linear(name: &str) -> bool {
    let in_block = ["vision.blocks.", "text.unimodal.", "text.multimodal."]
        .iter()
        .any(|p| name.starts_with(p));
    let linear = [".attn.", ".xattn.", ".mlp.", ".xmlp."]
        .iter()
        .any(|p| name.contains(p));
    in_block && linear && name.ends_with(".weight")
}

/// `w` with its `⌊sparsity · numel⌋` smallest-magnitude entries set to zero (ties by
/// position).
pub fn magnitude_prune(w: &Tensor, sparsity: f64) -> Result<Tensor> {
    let n = w.numel() as i64;
    let k = ((sparsity * n as f64).floor() as i64).min(n);
    let flat = w.f_detach()?.f_to_kind(Kind::Float)?.f_reshape([-1])?;
    if k == 0 {
        return Ok(flat.f_reshape(w.size())?);
    }
    let order = flat.f_abs()?.f_argsort_stable(true, 0, false)?;
    let drop = order.f_narrow(0, 0, k)?;
    let pruned = flat.f_index_fill(0, &drop, 0.0)?;
    Ok(pruned.f_reshape(w.size())?)
}

/// The hidden channels an MLP keeps (ascending): the `keep` with the largest
/// `‖fc1 row‖₂ · ‖fc2 column‖₂`.
pub fn mlp_keep(fc1: &Tensor, fc2: &Tensor, keep: i64) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.f_to_kind(Kind::Float);
    let rows = f32(fc1)?.f_norm_scalaropt_dim(2, [1i64].as_slice(), false)?;
    let cols = f32(fc2)?.f_norm_scalaropt_dim(2, [0i64].as_slice(), false)?;
    let score = rows.f_mul(&cols)?;
    let order = score.f_argsort_stable(true, 0, true)?;
    let (kept, _) = order.f_narrow(0, 0, keep)?.f_sort(0, false)?;
    Ok(kept)
}

/// The heads an attention keeps (ascending): the `keep` with the largest
/// `‖q, k, v rows of the head‖₂ · ‖o columns of the head‖₂`, heads `head_dim` wide.
pub fn heads_keep(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    head_dim: i64,
    keep: i64,
) -> Result<Tensor> {
    let f32 = |t: &Tensor| t.f_to_kind(Kind::Float);
    let heads = q.size()[0] / head_dim;
    // Row h·hd + j of q, k, v is dimension j of head h: one row of `[H, hd · in]` per head.
    let input = Tensor::f_cat(&[f32(q)?, f32(k)?, f32(v)?], 1)?
        .f_reshape([heads, -1])?
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), false)?;
    let output = f32(o)?
        .f_transpose(0, 1)?
        .f_contiguous()?
        .f_reshape([heads, -1])?
        .f_norm_scalaropt_dim(2, [1i64].as_slice(), false)?;
    let score = input.f_mul(&output)?;
    let order = score.f_argsort_stable(true, 0, true)?;
    let (kept, _) = order.f_narrow(0, 0, keep)?.f_sort(0, false)?;
    Ok(kept)
}

/// The rows of an attention's q, k, v (columns of its o) that heads `kept` own.
fn head_rows(kept: &Tensor, head_dim: i64) -> Result<Tensor> {
    let within = Tensor::f_arange(head_dim, (Kind::Int64, kept.device()))?;
    Ok(kept
        .f_unsqueeze(1)?
        .f_mul_scalar(head_dim)?
        .f_add(&within.f_unsqueeze(0)?)?
        .f_reshape([-1])?)
}

/// One tower's attentions as `--method heads` sees them: its parameter prefixes, head
/// count and width, and the config keys that describe them.
struct HeadGroup {
    /// Parameter-name prefixes of its attentions (`vision.blocks.`).
    prefix: &'static str,
    heads_key: &'static str,
    heads: usize,
    head_dim: usize,
}

/// Whole heads removed from every attention (see the module docs): the kept heads of each
/// and the pruned parameters.
#[allow(clippy::type_complexity)]
fn prune_heads(
    params: &[(String, Tensor)],
    pjob: &mut JobConfig,
    sparsity: f64,
    url: &str,
) -> Result<(Vec<(String, Vec<i64>)>, Vec<(String, Tensor)>)> {
    let m = &pjob.model;
    let mut groups = vec![
        HeadGroup {
            prefix: "vision.blocks.",
            heads_key: "vision_heads",
            heads: m.vision_heads,
            head_dim: m.vision_head_size(),
        },
        HeadGroup {
            prefix: "text.",
            heads_key: "text_heads",
            heads: m.text_heads,
            head_dim: m.text_head_size(),
        },
    ];
    if m.vision_pool == weaver_models::config::VisionPool::Attentional {
        groups.push(HeadGroup {
            prefix: "vision.attn_pool.",
            heads_key: "attn_pool_heads",
            heads: m.attn_pool_heads,
            head_dim: m.attn_pool_head_size(),
        });
    }
    let mut keeps = Vec::new();
    for g in &groups {
        let kept = g.heads as f64 * (1.0 - sparsity);
        if (kept - kept.round()).abs() > 1e-9 || kept.round() < 1.0 {
            return Err(CompressError::BadOption {
                key: "--sparsity".into(),
                message: format!(
                    "--method heads keeps model.{} · (1 − sparsity) = {} · {} = {kept} heads per attention, which must be a whole number ≥ 1: pick a sparsity that is a multiple of 1/{}",
                    g.heads_key,
                    g.heads,
                    1.0 - sparsity,
                    g.heads
                ),
            });
        }
        keeps.push(kept.round() as i64);
    }
    let get = |n: &str| {
        params
            .iter()
            .find(|(m, _)| m == n)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| CompressError::BadCheckpoint {
                url: url.to_string(),
                message: format!("an attention without {n}"),
            })
    };
    // Each attention's prefix (`….attn.`, `….xattn.`), its group, and its kept heads.
    let mut kept_heads: Vec<(String, usize, Tensor)> = Vec::new();
    for (name, q) in params {
        let Some(prefix) = name.strip_suffix("q.weight") else {
            continue;
        };
        if !(prefix.ends_with(".attn.") || prefix.ends_with(".xattn.")) {
            continue;
        }
        let Some(gi) = groups.iter().position(|g| prefix.starts_with(g.prefix)) else {
            continue;
        };
        let hd = groups[gi].head_dim as i64;
        let k = get(&format!("{prefix}k.weight"))?;
        let v = get(&format!("{prefix}v.weight"))?;
        let o = get(&format!("{prefix}o.weight"))?;
        let kept = heads_keep(q, &k, &v, &o, hd, keeps[gi])?;
        kept_heads.push((prefix.to_string(), gi, kept));
    }
    let mut out = Vec::with_capacity(params.len());
    for (name, t) in params {
        let cut = kept_heads.iter().find_map(|(prefix, gi, kept)| {
            let rest = name.strip_prefix(prefix.as_str())?;
            let dim = match rest {
                "q.weight" | "q.bias" | "k.weight" | "k.bias" | "v.weight" | "v.bias" => 0,
                "o.weight" => 1,
                _ => return None,
            };
            Some((dim, kept, groups[*gi].head_dim as i64))
        });
        let v = match cut {
            Some((dim, kept, hd)) => t.f_index_select(dim, &head_rows(kept, hd)?)?,
            None => t.shallow_clone(),
        };
        out.push((name.clone(), v));
    }
    // Fewer heads of the same width, the widths written out (the defaults `width / heads`
    // would change with the count).
    for (g, keep) in groups.iter().zip(&keeps) {
        let (keep, hd) = (*keep as usize, Some(g.head_dim));
        let (m, f) = (&mut pjob.model, &mut pjob.file.model);
        match g.heads_key {
            "vision_heads" => {
                (m.vision_heads, m.vision_head_dim) = (keep, hd);
                (f.vision_heads, f.vision_head_dim) = (Some(keep), hd);
            }
            "text_heads" => {
                (m.text_heads, m.text_head_dim) = (keep, hd);
                (f.text_heads, f.text_head_dim) = (Some(keep), hd);
            }
            _ => {
                (m.attn_pool_heads, m.attn_pool_head_dim) = (keep, hd);
                (f.attn_pool_heads, f.attn_pool_head_dim) = (Some(keep), hd);
            }
        }
    }
    let kept = kept_heads
        .into_iter()
        .map(|(prefix, _, kept)| Ok((prefix, Vec::<i64>::try_from(&kept)?)))
        .collect::<Result<_>>()?;
    Ok((kept, out))
}

/// Prunes the checkpoint `src` (any unquantized checkpoint; its model config from its
/// `train.config`, else from `job`) and writes the result as a committed checkpoint of the
/// same step under the root `out`.
pub fn prune(
    src: &str,
    out: &str,
    job: &JobConfig,
    method: Method,
    sparsity: f64,
) -> Result<PruneReport> {
    let bad_opt = |key: &str, message: String| CompressError::BadOption {
        key: key.into(),
        message,
    };
    if !(sparsity > 0.0 && sparsity < 1.0) {
        return Err(bad_opt(
            "--sparsity",
            format!("must lie in (0, 1), got {sparsity}"),
        ));
    }
    let ckpt = block_on(Checkpoint::open_url(src))?;
    if quantization(ckpt.manifest())?.is_some() {
        return Err(CompressError::BadCheckpoint {
            url: ckpt.url(),
            message: "it is quantized; prune the float checkpoint (then quantize)".into(),
        });
    }
    let loaded = load_checkpoint(&ckpt, job, &LoadOptions::cpu())?;
    let mut pjob = loaded.job.clone();
    let params: Vec<(String, Tensor)> = loaded
        .store
        .params()
        .iter()
        .map(|p| Ok((p.name.clone(), p.tensor.f_detach()?.f_to_kind(Kind::Float)?)))
        .collect::<Result<_>>()?;
    let params_before: u64 = params.iter().map(|(_, t)| t.numel() as u64).sum();
    let mut out_params: Vec<(String, Tensor)> = Vec::with_capacity(params.len());
    let mut layers = 0;
    let mut kept_heads = Vec::new();
    match method {
        Method::Magnitude => {
            for (name, t) in &params {
                if is_block_linear(name) {
                    out_params.push((name.clone(), magnitude_prune(t, sparsity)?));
                    layers += 1;
                } else {
                    out_params.push((name.clone(), t.shallow_clone()));
                }
            }
        }
        Method::Mlp => {
            let ratio = pjob.model.mlp_ratio as f64 * (1.0 - sparsity);
            let new_ratio = ratio.round() as usize;
            if (ratio - new_ratio as f64).abs() > 1e-9 || new_ratio == 0 {
                return Err(bad_opt(
                    "--sparsity",
                    format!(
                        "--method mlp narrows the MLPs to model.mlp_ratio · (1 − sparsity) = {} · {} = {ratio}, which must be a whole number ≥ 1: pick a sparsity that is a multiple of 1/{}",
                        pjob.model.mlp_ratio,
                        1.0 - sparsity,
                        pjob.model.mlp_ratio
                    ),
                ));
            }
            let get = |n: &str| {
                params
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, t)| t.shallow_clone())
            };
            // The kept channels of each MLP, by its `fc1.weight` name prefix.
            let mut keeps: Vec<(String, Tensor)> = Vec::new();
            for (name, fc1) in &params {
                let Some(prefix) = name.strip_suffix("fc1.weight") else {
                    continue;
                };
                if !(prefix.ends_with(".mlp.") || prefix.ends_with(".xmlp.")) {
                    continue;
                }
                let fc2 = get(&format!("{prefix}fc2.weight")).ok_or_else(|| {
                    CompressError::BadCheckpoint {
                        url: ckpt.url(),
                        message: format!("{prefix}fc1.weight has no {prefix}fc2.weight"),
                    }
                })?;
                let hidden = fc1.size()[0];
                let d = hidden / pjob.model.mlp_ratio as i64;
                keeps.push((
                    prefix.to_string(),
                    mlp_keep(fc1, &fc2, new_ratio as i64 * d)?,
                ));
            }
            layers = keeps.len();
            for (name, t) in &params {
                let cut = keeps.iter().find_map(|(prefix, keep)| {
                    let rest = name.strip_prefix(prefix.as_str())?;
                    match rest {
                        "fc1.weight" | "fc1.bias" => Some((0, keep)),
                        "fc2.weight" => Some((1, keep)),
                        _ => None,
                    }
                });
                let v = match cut {
                    Some((dim, keep)) => t.f_index_select(dim, keep)?,
                    None => t.shallow_clone(),
                };
                out_params.push((name.clone(), v));
            }
            pjob.model.mlp_ratio = new_ratio;
            pjob.file.model.mlp_ratio = Some(new_ratio);
        }
        Method::Heads => {
            let (kept, pruned) = prune_heads(&params, &mut pjob, sparsity, &ckpt.url())?;
            layers = kept.len();
            kept_heads = kept;
            out_params = pruned;
        }
    }
    // The pruned model must be the one its config describes (the loader checks every shape
    // against it).
    let check = JobConfig::parse(&pjob.to_toml(), &[])?;
    if check.model != pjob.model {
        return Err(CompressError::BadCheckpoint {
            url: ckpt.url(),
            message: "the pruned model's config does not round-trip".into(),
        });
    }
    let params_after: u64 = out_params.iter().map(|(_, t)| t.numel() as u64).sum();
    let mut zeros = 0u64;
    let mut saved = Vec::with_capacity(out_params.len() + 1);
    for (name, t) in out_params {
        zeros += t.f_eq(0.0)?.f_sum(Kind::Int64)?.int64_value(&[]) as u64;
        saved.push(SavedTensor::whole(name, t.f_contiguous()?));
    }
    saved.push(SavedTensor::from_bytes(CONFIG, pjob.to_toml().as_bytes()));
    let info = PruneInfo {
        method,
        sparsity,
        source: ckpt.url(),
        layers,
    };
    let store = CkptStore::open(out)?;
    let step = ckpt.step();
    let report = ShardWriter::new(&store).start(step, 0, saved)?.wait()?;
    let mut layout = Layout::new(1, 1, 1);
    layout.extra = serde_json::json!({ PRUNING: info });
    let manifest = block_on(commit(&store, step, layout, vec![report]))?;
    let url = format!(
        "{}/{}",
        store.url().trim_end_matches('/'),
        weaver_checkpoint::manifest::step_dir(step)
    );
    info!(url = %url, method = method.name(), sparsity, layers, params_before, params_after, zeros, "pruned checkpoint written");
    Ok(PruneReport {
        url,
        info,
        params_before,
        params_after,
        zeros,
        bytes: manifest.total_bytes(),
        kept_heads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_zeroes_exactly_the_smallest() {
        let w = Tensor::from_slice(&[0.5f32, -0.1, 2.0, -3.0, 0.05, 1.0]).reshape([2, 3]);
        let p = magnitude_prune(&w, 0.5).unwrap();
        let v: Vec<f32> = p.reshape([-1]).try_into().unwrap();
        // |w| sorted: 0.05, 0.1, 0.5 | 1, 2, 3: the first three go.
        assert_eq!(v, vec![0.0, 0.0, 2.0, -3.0, 0.0, 1.0]);
    }

    #[test]
    fn mlp_keeps_the_highest_scores_in_order() {
        // Channel norms of fc1 rows: 1, 3, 2, 0.5; fc2 columns all 1.
        let fc1 = Tensor::from_slice(&[1.0f32, 0.0, 3.0, 0.0, 0.0, 2.0, 0.5, 0.0]).reshape([4, 2]);
        let fc2 = Tensor::ones([2, 4], (Kind::Float, tch::Device::Cpu)) * 0.5f64.sqrt();
        let keep: Vec<i64> = mlp_keep(&fc1, &fc2, 2).unwrap().try_into().unwrap();
        assert_eq!(keep, vec![1, 2]);
    }

    #[test]
    fn heads_keep_the_highest_scores_and_their_rows() {
        // Three heads of width 2 over a 2-wide stream: q rows of norm 1, 3, 2 per head
        // (k, v zero), o columns all of norm 1.
        let q = Tensor::zeros([6, 2], (Kind::Float, tch::Device::Cpu));
        for (h, n) in [(0, 1.0), (1, 3.0), (2, 2.0)] {
            let _ = q.get(2 * h).get(0).fill_(n);
        }
        let kv = Tensor::zeros([6, 2], (Kind::Float, tch::Device::Cpu));
        let o = Tensor::ones([2, 6], (Kind::Float, tch::Device::Cpu)) * 0.5f64.sqrt();
        let keep = heads_keep(&q, &kv, &kv, &o, 2, 2).unwrap();
        assert_eq!(Vec::<i64>::try_from(&keep).unwrap(), vec![1, 2]);
        let rows: Vec<i64> = head_rows(&keep, 2).unwrap().try_into().unwrap();
        assert_eq!(rows, vec![2, 3, 4, 5]);
    }

    #[test]
    fn block_linears_only() {
        assert!(is_block_linear("vision.blocks.0.attn.q.weight"));
        assert!(is_block_linear("text.multimodal.1.xmlp.fc2.weight"));
        assert!(!is_block_linear("vision.blocks.0.attn.q.bias"));
        assert!(!is_block_linear("head.lm.weight"));
        assert!(!is_block_linear("vision.attn_pool.attn.q.weight"));
    }
}
