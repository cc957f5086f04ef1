//! The one table between open_clip's parameter names and weaver's, used by import and by
//! export: each [`Rule`] names one open_clip tensor, the weaver parameter(s) it becomes and
//! the [`Transform`] between them (and its inverse). Per-block tables list a transformer
//! block's tensors once; [`rules`] instantiates them for every layer of a config.
//!
//! open_clip 3.3.0's names: `visual.*` (VisionTransformer), `text.*` (CoCa's text tower) or
//! top-level `token_embedding`, `transformer.*`, ... (CLIP), `text_decoder.*`
//! (MultimodalTransformer: `resblocks.i` self-attention blocks and `cross_attn.i`
//! cross-attention blocks), `logit_scale`. `nn.MultiheadAttention` packs q, k and v into
//! `in_proj_weight`/`in_proj_bias` unless the key width differs from the query width (the
//! attentional pooler), where it keeps `q_proj_weight`, `k_proj_weight`, `v_proj_weight`.

use std::collections::HashMap;

use tch::{Kind, Tensor};
use weaver_models::config::{Fusion, MultimodalBlock, TextPool, VisionPool};
use weaver_models::ModelConfig;

use crate::error::{InteropError, Result};

/// How an open_clip tensor becomes weaver's (import) and back (export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// The same tensor.
    Same,
    /// A matrix transposed (open_clip's `x @ P` projections against weaver's `x Pᵀ`).
    Transpose,
    /// open_clip's patch convolution `[d, c, p, p]` as weaver's linear patch embedding
    /// `[d, p·p·c]` over `(py, px, c)`-ordered patches.
    Conv,
    /// A packed `in_proj` (rows q, k, v) as three tensors.
    Split3,
}

/// One open_clip tensor and the weaver parameter(s) it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// open_clip's name.
    pub open_clip: String,
    /// weaver's names (three for [`Transform::Split3`]).
    pub weaver: Vec<String>,
    /// The conversion.
    pub transform: Transform,
}

use Transform::{Same, Split3, Transpose};

type Entry = (&'static str, &'static [&'static str], Transform);

/// A residual attention block (`ln_1`, `attn`, `ln_2`, `mlp`) as weaver's block.
const BLOCK: &[Entry] = &[
    ("ln_1.weight", &["ln1.weight"], Same),
    ("ln_1.bias", &["ln1.bias"], Same),
    (
        "attn.in_proj_weight",
        &["attn.q.weight", "attn.k.weight", "attn.v.weight"],
        Split3,
    ),
    (
        "attn.in_proj_bias",
        &["attn.q.bias", "attn.k.bias", "attn.v.bias"],
        Split3,
    ),
    ("attn.out_proj.weight", &["attn.o.weight"], Same),
    ("attn.out_proj.bias", &["attn.o.bias"], Same),
    ("ln_2.weight", &["ln2.weight"], Same),
    ("ln_2.bias", &["ln2.bias"], Same),
    ("mlp.c_fc.weight", &["mlp.fc1.weight"], Same),
    ("mlp.c_fc.bias", &["mlp.fc1.bias"], Same),
    ("mlp.c_proj.weight", &["mlp.fc2.weight"], Same),
    ("mlp.c_proj.bias", &["mlp.fc2.bias"], Same),
];

/// A decoder's cross-attention block (`text_decoder.cross_attn.i`) as the cross part of
/// weaver's `MultimodalBlock::OpenClip` layer.
const CROSS_BLOCK: &[Entry] = &[
    ("ln_1.weight", &["ln_x.weight"], Same),
    ("ln_1.bias", &["ln_x.bias"], Same),
    ("ln_1_kv.weight", &["ln_x_kv.weight"], Same),
    ("ln_1_kv.bias", &["ln_x_kv.bias"], Same),
    (
        "attn.in_proj_weight",
        &["xattn.q.weight", "xattn.k.weight", "xattn.v.weight"],
        Split3,
    ),
    (
        "attn.in_proj_bias",
        &["xattn.q.bias", "xattn.k.bias", "xattn.v.bias"],
        Split3,
    ),
    ("attn.out_proj.weight", &["xattn.o.weight"], Same),
    ("attn.out_proj.bias", &["xattn.o.bias"], Same),
    ("ln_2.weight", &["ln_x_mlp.weight"], Same),
    ("ln_2.bias", &["ln_x_mlp.bias"], Same),
    ("mlp.c_fc.weight", &["xmlp.fc1.weight"], Same),
    ("mlp.c_fc.bias", &["xmlp.fc1.bias"], Same),
    ("mlp.c_proj.weight", &["xmlp.fc2.weight"], Same),
    ("mlp.c_proj.bias", &["xmlp.fc2.bias"], Same),
];

/// A layer norm.
const NORM: &[Entry] = &[("weight", &["weight"], Same), ("bias", &["bias"], Same)];

fn push_table(out: &mut Vec<Rule>, table: &[Entry], oc: &str, w: &str) {
    for (o, ws, t) in table {
        out.push(Rule {
            open_clip: format!("{oc}.{o}"),
            weaver: ws.iter().map(|x| format!("{w}.{x}")).collect(),
            transform: *t,
        });
    }
}

fn one(out: &mut Vec<Rule>, oc: &str, w: &str, transform: Transform) {
    out.push(Rule {
        open_clip: oc.to_string(),
        weaver: vec![w.to_string()],
        transform,
    });
}

fn not_open_clip(option: &str, value: impl ToString, hint: &str) -> InteropError {
    InteropError::NotOpenClip {
        option: option.into(),
        value: value.to_string(),
        hint: hint.into(),
    }
}

/// Checks that open_clip can represent `cfg` (a ViT CLIP, or a CoCa with open_clip's
/// decoder layers).
pub fn check(cfg: &ModelConfig) -> Result<()> {
    // open_clip's attentions (`nn.MultiheadAttention`) are as wide as their stream.
    let attentions = [
        (
            "vision_head_dim",
            cfg.vision_head_dim,
            cfg.vision_attn_width(),
            cfg.vision_width,
        ),
        (
            "text_head_dim",
            cfg.text_head_dim,
            cfg.text_attn_width(),
            cfg.text_width,
        ),
        (
            "attn_pool_head_dim",
            cfg.attn_pool_head_dim,
            cfg.attn_pool_width(),
            cfg.embed_dim,
        ),
    ];
    for (key, head_dim, attn, width) in attentions {
        if let Some(hd) = head_dim {
            if attn != width {
                return Err(not_open_clip(
                    key,
                    hd,
                    &format!("open_clip's attention is as wide as its stream (heads × head_dim = {width}, here {attn})"),
                ));
            }
        }
    }
    if cfg.patch_bias {
        return Err(not_open_clip(
            "patch_bias",
            true,
            "open_clip's patch convolution has no bias",
        ));
    }
    if !cfg.vision_class_token {
        return Err(not_open_clip(
            "vision_class_token",
            false,
            "open_clip's ViT always has a class token",
        ));
    }
    if !cfg.vision_ln_pre {
        return Err(not_open_clip(
            "vision_ln_pre",
            false,
            "the ViTs open_clip ships have ln_pre",
        ));
    }
    if cfg.multimodal_layers > 0 {
        if cfg.fusion != Fusion::CrossAttention {
            return Err(not_open_clip(
                "fusion",
                cfg.fusion.name(),
                "open_clip's CoCa decoder cross-attends",
            ));
        }
        if cfg.multimodal_block != MultimodalBlock::OpenClip {
            return Err(not_open_clip(
                "multimodal_block",
                "compact",
                "open_clip's decoder layers are open_clip blocks",
            ));
        }
        if cfg.itm_head {
            return Err(not_open_clip(
                "itm_head",
                true,
                "open_clip's CoCa has no matching head",
            ));
        }
        if cfg.memory_width() != cfg.text_width {
            return Err(not_open_clip(
                "embed_dim",
                cfg.memory_width(),
                "open_clip's decoder attends to memory as wide as the text",
            ));
        }
    } else if cfg.text_pool == TextPool::ClassToken {
        return Err(not_open_clip(
            "text_pool",
            "class_token",
            "open_clip's CLIP text tower has no class token",
        ));
    }
    Ok(())
}

/// Every open_clip tensor of `cfg` and the weaver parameters it is, in open_clip's
/// `state_dict()` groups. `cfg` must pass [`check`].
pub fn rules(cfg: &ModelConfig) -> Result<Vec<Rule>> {
    check(cfg)?;
    let mut r = Vec::new();
    let coca = cfg.multimodal_layers > 0;
    // Vision tower.
    one(
        &mut r,
        "visual.conv1.weight",
        "vision.patch_embed.weight",
        Transform::Conv,
    );
    one(&mut r, "visual.class_embedding", "vision.class_token", Same);
    one(&mut r, "visual.positional_embedding", "vision.pos", Same);
    push_table(&mut r, NORM, "visual.ln_pre", "vision.ln_pre");
    for i in 0..cfg.vision_layers {
        push_table(
            &mut r,
            BLOCK,
            &format!("visual.transformer.resblocks.{i}"),
            &format!("vision.blocks.{i}"),
        );
    }
    if cfg.vision_pool == VisionPool::Attentional {
        let (oc, w) = ("visual.attn_pool", "vision.attn_pool");
        one(&mut r, &format!("{oc}.query"), &format!("{w}.query"), Same);
        if cfg.embed_dim == cfg.vision_width {
            push_table(
                &mut r,
                &[(
                    "attn.in_proj_weight",
                    &["attn.q.weight", "attn.k.weight", "attn.v.weight"],
                    Split3,
                )],
                oc,
                w,
            );
        } else {
            for x in ["q", "k", "v"] {
                one(
                    &mut r,
                    &format!("{oc}.attn.{x}_proj_weight"),
                    &format!("{w}.attn.{x}.weight"),
                    Same,
                );
            }
        }
        push_table(
            &mut r,
            &[
                (
                    "attn.in_proj_bias",
                    &["attn.q.bias", "attn.k.bias", "attn.v.bias"],
                    Split3,
                ),
                ("attn.out_proj.weight", &["attn.o.weight"], Same),
                ("attn.out_proj.bias", &["attn.o.bias"], Same),
            ],
            oc,
            w,
        );
        push_table(&mut r, NORM, &format!("{oc}.ln_q"), &format!("{w}.ln_q"));
        push_table(&mut r, NORM, &format!("{oc}.ln_k"), &format!("{w}.ln_k"));
    }
    push_table(&mut r, NORM, "visual.ln_post", "vision.ln_post");
    one(&mut r, "visual.proj", "vision.proj", Transpose);

    // Text tower: under `text.` in CoCa (open_clip's CustomTextCLIP layout), top-level in
    // CLIP.
    let t = if coca { "text." } else { "" };
    one(
        &mut r,
        &format!("{t}token_embedding.weight"),
        "text.tok_embed.weight",
        Same,
    );
    one(
        &mut r,
        &format!("{t}positional_embedding"),
        "text.pos",
        Same,
    );
    if cfg.text_pool == TextPool::ClassToken {
        one(&mut r, &format!("{t}cls_emb"), "text.class_token", Same);
    }
    for i in 0..cfg.unimodal_layers {
        push_table(
            &mut r,
            BLOCK,
            &format!("{t}transformer.resblocks.{i}"),
            &format!("text.unimodal.{i}"),
        );
    }
    push_table(&mut r, NORM, &format!("{t}ln_final"), "text.ln_pool");
    if cfg.text_proj_bias {
        // open_clip's `proj_bias = true`: an nn.Linear, laid out as weaver's projection.
        one(
            &mut r,
            &format!("{t}text_projection.weight"),
            "text.proj",
            Same,
        );
        one(
            &mut r,
            &format!("{t}text_projection.bias"),
            "text.proj_bias",
            Same,
        );
    } else {
        one(
            &mut r,
            &format!("{t}text_projection"),
            "text.proj",
            Transpose,
        );
    }

    // Decoder.
    for i in 0..cfg.multimodal_layers {
        let w = format!("text.multimodal.{i}");
        push_table(&mut r, BLOCK, &format!("text_decoder.resblocks.{i}"), &w);
        push_table(
            &mut r,
            CROSS_BLOCK,
            &format!("text_decoder.cross_attn.{i}"),
            &w,
        );
    }
    if coca {
        push_table(&mut r, NORM, "text_decoder.ln_final", "head.ln");
        one(
            &mut r,
            "text_decoder.text_projection",
            "head.lm.weight",
            Transpose,
        );
    }
    one(&mut r, "logit_scale", "head.logit_scale", Same);
    Ok(r)
}

/// open_clip → weaver for one rule (f32, contiguous).
fn forward(rule: &Rule, t: &Tensor, cfg: &ModelConfig) -> Result<Vec<Tensor>> {
    let t = t.f_to_kind(Kind::Float)?;
    Ok(match rule.transform {
        Same => vec![t.f_contiguous()?],
        Transpose => vec![t.f_tr()?.f_contiguous()?],
        Transform::Conv => {
            let s = t.size();
            if s.len() != 4 {
                return Err(shape_err(rule, &s, cfg));
            }
            vec![t
                .f_permute([0, 2, 3, 1])?
                .f_reshape([s[0], s[1] * s[2] * s[3]])?
                .f_contiguous()?]
        }
        Split3 => {
            let n = t.size().first().copied().unwrap_or(0);
            if n % 3 != 0 {
                return Err(shape_err(rule, &t.size(), cfg));
            }
            t.f_chunk(3, 0)?
                .into_iter()
                .map(|c| c.f_contiguous())
                .collect::<Result<_, _>>()?
        }
    })
}

/// weaver → open_clip for one rule.
fn backward(rule: &Rule, ts: &[Tensor], cfg: &ModelConfig) -> Result<Tensor> {
    Ok(match rule.transform {
        Same => ts[0].f_contiguous()?,
        Transpose => ts[0].f_tr()?.f_contiguous()?,
        Transform::Conv => {
            let (p, c) = (cfg.patch_size as i64, cfg.channels as i64);
            let d = ts[0].size()[0];
            ts[0]
                .f_reshape([d, p, p, c])?
                .f_permute([0, 3, 1, 2])?
                .f_contiguous()?
        }
        Split3 => Tensor::f_cat(ts, 0)?,
    })
}

fn shape_err(rule: &Rule, got: &[i64], cfg: &ModelConfig) -> InteropError {
    InteropError::ShapeMismatch {
        key: rule.open_clip.clone(),
        expected: Vec::new(),
        got: got.to_vec(),
        arch: cfg.flavor.clone(),
    }
}

/// Converts an open_clip state dict to weaver's global parameters. `expected` lists every
/// weaver parameter with its global shape; every one must be produced with that shape, and
/// every tensor of the state dict used (a `module.` prefix, as DDP leaves it, is dropped).
pub fn to_weaver(
    cfg: &ModelConfig,
    arch: &str,
    state_dict: Vec<(String, Tensor)>,
    expected: &[(String, Vec<i64>)],
) -> Result<Vec<(String, Tensor)>> {
    let mut sd: HashMap<String, Tensor> = state_dict
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("module.").unwrap_or(&k).to_string(), v))
        .collect();
    let shapes: HashMap<&str, &Vec<i64>> = expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut made: HashMap<String, Tensor> = HashMap::new();
    for rule in rules(cfg)? {
        let t = sd
            .remove(&rule.open_clip)
            .ok_or_else(|| InteropError::MissingKey {
                key: rule.open_clip.clone(),
                arch: arch.to_string(),
            })?;
        let parts = forward(&rule, &t, cfg)?;
        for (name, part) in rule.weaver.iter().zip(parts) {
            let want = shapes.get(name.as_str()).ok_or_else(|| {
                weaver_models::ModelError::ParamMismatch(format!(
                    "the open_clip map names {name}, which the {} model does not have",
                    cfg.flavor
                ))
            })?;
            if &part.size() != *want {
                return Err(InteropError::ShapeMismatch {
                    key: format!("{} (as weaver's {name})", rule.open_clip),
                    expected: want.to_vec(),
                    got: part.size(),
                    arch: arch.to_string(),
                });
            }
            made.insert(name.clone(), part);
        }
    }
    if let Some(example) = sd.keys().min().cloned() {
        return Err(InteropError::UnexpectedKeys {
            count: sd.len(),
            example,
            arch: arch.to_string(),
        });
    }
    expected
        .iter()
        .map(|(name, _)| {
            made.remove(name).map(|t| (name.clone(), t)).ok_or_else(|| {
                weaver_models::ModelError::ParamMismatch(format!(
                    "open_clip has no tensor for weaver's {name}"
                ))
                .into()
            })
        })
        .collect()
}

/// Converts weaver's global parameters to an open_clip state dict (open_clip's names, f32);
/// every parameter must be used.
pub fn to_open_clip(
    cfg: &ModelConfig,
    params: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    let mut by_name: HashMap<String, Tensor> = params.into_iter().collect();
    let mut out = Vec::new();
    for rule in rules(cfg)? {
        let ts = rule
            .weaver
            .iter()
            .map(|n| {
                by_name.remove(n).ok_or_else(|| {
                    weaver_models::ModelError::ParamMismatch(format!(
                        "the weights have no {n}, which {} needs",
                        rule.open_clip
                    ))
                    .into()
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let ts = ts
            .iter()
            .map(|t| t.f_to_kind(Kind::Float))
            .collect::<Result<Vec<_>, _>>()?;
        out.push((rule.open_clip.clone(), backward(&rule, &ts, cfg)?));
    }
    if let Some(name) = by_name.keys().min() {
        return Err(weaver_models::ModelError::ParamMismatch(format!(
            "weaver's {name} has no open_clip equivalent"
        ))
        .into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flavor_maps_and_each_name_once() {
        for f in [
            "openclip-coca-b32",
            "openclip-coca-l14",
            "openclip-clip-b32",
        ] {
            let cfg = ModelConfig::flavor(f).unwrap();
            let r = rules(&cfg).unwrap();
            let mut oc: Vec<&str> = r.iter().map(|x| x.open_clip.as_str()).collect();
            let mut w: Vec<&str> = r
                .iter()
                .flat_map(|x| x.weaver.iter().map(|s| s.as_str()))
                .collect();
            let (n_oc, n_w) = (oc.len(), w.len());
            oc.sort();
            oc.dedup();
            w.sort();
            w.dedup();
            assert_eq!((oc.len(), w.len()), (n_oc, n_w), "{f}: a name twice");
        }
    }

    #[test]
    fn weaver_only_options_are_refused_by_name() {
        let mut cfg = ModelConfig::flavor("openclip-coca-b32").unwrap();
        cfg.itm_head = true;
        match rules(&cfg) {
            Err(InteropError::NotOpenClip { option, .. }) => assert_eq!(option, "itm_head"),
            other => panic!("{other:?}"),
        }
        assert!(rules(&ModelConfig::flavor("debug").unwrap()).is_err());
        // Narrower attention (`weaver ckpt prune --method heads`) has no open_clip form; the
        // same width spelled out does.
        let mut cfg = ModelConfig::flavor("openclip-coca-b32").unwrap();
        cfg.text_heads = 4;
        cfg.text_head_dim = Some(64);
        match rules(&cfg) {
            Err(InteropError::NotOpenClip { option, .. }) => assert_eq!(option, "text_head_dim"),
            other => panic!("{other:?}"),
        }
        cfg.text_heads = 8;
        assert!(rules(&cfg).is_ok());
    }

    #[test]
    fn transforms_invert() {
        let cfg = ModelConfig::flavor("openclip-clip-b32").unwrap();
        let conv = Tensor::randn([4, 3, 32, 32], (Kind::Float, tch::Device::Cpu));
        for (transform, t) in [
            (Transform::Conv, conv),
            (
                Split3,
                Tensor::randn([6, 2], (Kind::Float, tch::Device::Cpu)),
            ),
            (
                Transpose,
                Tensor::randn([3, 5], (Kind::Float, tch::Device::Cpu)),
            ),
        ] {
            let rule = Rule {
                open_clip: "x".into(),
                weaver: vec!["a".into(), "b".into(), "c".into()],
                transform,
            };
            let w = forward(&rule, &t, &cfg).unwrap();
            assert!(
                backward(&rule, &w, &cfg).unwrap().equal(&t),
                "{transform:?}"
            );
        }
        // The patch layout is weaver's (py, px, c) order.
        let conv = Tensor::arange(2 * 3 * 32 * 32, (Kind::Float, tch::Device::Cpu))
            .reshape([2, 3, 32, 32]);
        let rule = Rule {
            open_clip: "x".into(),
            weaver: vec!["a".into()],
            transform: Transform::Conv,
        };
        let w = forward(&rule, &conv, &cfg).unwrap().remove(0);
        // Element (out 1, py 2, px 5, c 1) of the flattened patch.
        let j = (2 * 32 + 5) * 3 + 1;
        assert_eq!(w.double_value(&[1, j]), conv.double_value(&[1, 1, 2, 5]));
    }
}
