//! The CoCa-shaped multimodal transformer (Yu et al. 2022, "CoCa: Contrastive Captioners
//! are Image-Text Foundation Models"), with Flamingo's gated cross-attention (Alayrac et al.
//! 2022) and prefix concatenation as alternative fusions.
//!
//! - Image encoder: a ViT (Dosovitskiy et al. 2021): linear patch embedding, learned
//!   positions, pre-LN blocks, a final norm; mean-pooled and projected for the contrastive
//!   loss, and kept whole as the memory the decoder attends to.
//! - Unimodal text layers: causal pre-LN blocks; the state at EOS, normed and projected, is
//!   the text embedding of the contrastive loss (CLIP's `eot` pooling).
//! - Multimodal text layers: causal self-attention plus cross-attention to the image tokens
//!   (or, for `prefix`, self-attention over `[projected image tokens; text]` with a
//!   prefix-LM mask), feeding the captioning (next-token) head and the image-text matching
//!   head. Matching negatives pair each caption with the next image of the micro-batch.
//!
//! The model is a sequence of *layers* (vision blocks, then unimodal, then multimodal), so a
//! pipeline stage is a range of them; the small pieces between towers (embeddings, pooling,
//! heads) belong to the layer next to them. A [`Model`] holds only the layers of its range,
//! and only this process's tensor-parallel part of each. Everything that flows between
//! layers is in [`Acts`]; collectives go through [`TensorParallel`].

use std::ops::Range;

use tch::{Kind, Tensor};
use weaver_parallel::tp::TensorParallel;

use crate::config::{Fusion, ModelConfig};
use crate::data::Batch;
use crate::error::{ModelError, Result};
use crate::nn::{Builder, Init, LayerNorm, Linear, ParamStore, Shard, Split, TpPos};

/// Tensors flowing between layers (and across pipeline stages).
#[derive(Debug, Default)]
pub struct Acts {
    /// Image tokens `[B, N, Dv]`: the encoder's residual stream, then (normed) the memory
    /// the decoder attends to (`[2B, N, Dv]` with matching negatives).
    pub image: Option<Tensor>,
    /// Text states `[B, T, Dt]` (`[2B, T, Dt]` in the multimodal layers with matching
    /// negatives; `[.., N + T, Dt]` there with prefix fusion).
    pub text: Option<Tensor>,
    /// Normalised image embedding `[B, E]`.
    pub image_emb: Option<Tensor>,
    /// Normalised text embedding `[B, E]`.
    pub text_emb: Option<Tensor>,
}

impl Acts {
    /// The present tensors in a fixed order (image, text, image_emb, text_emb).
    pub fn present_mut(&mut self) -> Vec<&mut Tensor> {
        [
            &mut self.image,
            &mut self.text,
            &mut self.image_emb,
            &mut self.text_emb,
        ]
        .into_iter()
        .filter_map(|t| t.as_mut())
        .collect()
    }

    /// The present tensors (shallow copies) in the order of [`Acts::present_mut`].
    pub fn present(&self) -> Vec<Tensor> {
        [&self.image, &self.text, &self.image_emb, &self.text_emb]
            .into_iter()
            .filter_map(|t| t.as_ref().map(|t| t.shallow_clone()))
            .collect()
    }

    /// Rebuilds activations from tensors laid out as [`Model::boundary_layout`] says.
    pub fn from_fields(fields: &[ActField], tensors: Vec<Tensor>) -> Result<Acts> {
        if fields.len() != tensors.len() {
            return Err(ModelError::ParamMismatch(format!(
                "{} tensors for {} activation fields",
                tensors.len(),
                fields.len()
            )));
        }
        let mut acts = Acts::default();
        for (f, t) in fields.iter().zip(tensors) {
            let slot = match f {
                ActField::Image => &mut acts.image,
                ActField::Text => &mut acts.text,
                ActField::ImageEmb => &mut acts.image_emb,
                ActField::TextEmb => &mut acts.text_emb,
            };
            *slot = Some(t);
        }
        Ok(acts)
    }

    fn take(slot: &Option<Tensor>, what: &str) -> Result<Tensor> {
        slot.as_ref().map(|t| t.shallow_clone()).ok_or_else(|| {
            ModelError::ParamMismatch(format!(
                "layer input {what} is missing from the stage's inputs"
            ))
        })
    }
}

/// A field of [`Acts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActField {
    /// [`Acts::image`].
    Image,
    /// [`Acts::text`].
    Text,
    /// [`Acts::image_emb`].
    ImageEmb,
    /// [`Acts::text_emb`].
    TextEmb,
}

/// Loss terms of one micro-batch (scalars; `total` is the weighted sum to differentiate).
#[derive(Debug)]
pub struct Losses {
    /// Weighted sum.
    pub total: Tensor,
    /// Image-text contrastive loss.
    pub itc: Tensor,
    /// Captioning cross-entropy per target token.
    pub caption: Tensor,
    /// Image-text matching cross-entropy (zero when its weight is zero).
    pub itm: Tensor,
}

/// Weights of the loss terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Contrastive.
    pub itc: f64,
    /// Captioning.
    pub caption: f64,
    /// Matching.
    pub itm: f64,
}

fn map_tp(e: weaver_parallel::tp::TpError) -> ModelError {
    match e {
        weaver_parallel::tp::TpError::Torch(source) => ModelError::Torch {
            op: "tensor-parallel op",
            source,
        },
        other => ModelError::Parallel(other.to_string()),
    }
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: i64,
    head_dim: i64,
}

#[derive(Debug, Clone, Copy)]
enum Mask<'a> {
    None,
    Causal,
    Explicit(&'a Tensor),
}

impl Attention {
    fn new(
        b: &mut Builder<'_>,
        dq: i64,
        dkv: i64,
        heads: i64,
        out_std: f64,
        tp: TpPos,
    ) -> Result<Attention> {
        let std = 0.02;
        Ok(Attention {
            q: Linear::new(&mut b.sub("q"), dq, dq, true, std, Split::Column, tp)?,
            k: Linear::new(&mut b.sub("k"), dkv, dq, true, std, Split::Column, tp)?,
            v: Linear::new(&mut b.sub("v"), dkv, dq, true, std, Split::Column, tp)?,
            o: Linear::new(&mut b.sub("o"), dq, dq, true, out_std, Split::Row, tp)?,
            heads: heads / tp.size as i64,
            head_dim: dq / heads,
        })
    }

    /// Attention of `xq` over `xkv` (both already through `f`), summed over the TP group
    /// and with the output bias added.
    fn forward(
        &self,
        tp: &mut dyn TensorParallel,
        xq: &Tensor,
        xkv: &Tensor,
        mask: Mask<'_>,
    ) -> Result<Tensor> {
        let (b, tq) = (xq.size()[0], xq.size()[1]);
        let tk = xkv.size()[1];
        let split = |x: Tensor, t: i64| -> Result<Tensor> {
            Ok(x.f_view([b, t, self.heads, self.head_dim])?
                .f_transpose(1, 2)?)
        };
        let q = split(self.q.forward_local(xq)?, tq)?;
        let k = split(self.k.forward_local(xkv)?, tk)?;
        let v = split(self.v.forward_local(xkv)?, tk)?;
        let (m, causal) = match mask {
            Mask::None => (None, false),
            Mask::Causal => (None, true),
            Mask::Explicit(m) => (Some(m), false),
        };
        let a = Tensor::f_scaled_dot_product_attention(&q, &k, &v, m, 0.0, causal, None, false)?;
        let a = a
            .f_transpose(1, 2)?
            .f_reshape([b, tq, self.heads * self.head_dim])?;
        let partial = self.o.forward_local(&a)?;
        let y = tp.reduce_sum(&partial).map_err(map_tp)?;
        Ok(match &self.o.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(b: &mut Builder<'_>, d: i64, hidden: i64, out_std: f64, tp: TpPos) -> Result<Mlp> {
        Ok(Mlp {
            fc1: Linear::new(&mut b.sub("fc1"), d, hidden, true, 0.02, Split::Column, tp)?,
            fc2: Linear::new(&mut b.sub("fc2"), hidden, d, true, out_std, Split::Row, tp)?,
        })
    }

    fn forward(&self, tp: &mut dyn TensorParallel, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward_local(x)?.f_gelu("none")?;
        let y = tp
            .reduce_sum(&self.fc2.forward_local(&h)?)
            .map_err(map_tp)?;
        Ok(match &self.fc2.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

/// Pre-LN transformer block: self-attention, optional cross-attention (plain or gated),
/// MLP.
#[derive(Debug)]
struct Block {
    ln1: LayerNorm,
    attn: Attention,
    cross: Option<(LayerNorm, Attention, Option<Tensor>)>,
    ln2: LayerNorm,
    mlp: Mlp,
}

/// Which stream a block transforms, and how it attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Image,
    Text,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder<'_>,
        d: i64,
        heads: i64,
        mlp_ratio: i64,
        depth: i64,
        cross: Option<(i64, bool)>,
        eps: f64,
        tp: TpPos,
    ) -> Result<Block> {
        // GPT-2's scaled init of the projections that write into the residual stream.
        let out_std = 0.02 / (2.0 * depth as f64).sqrt();
        let ln1 = LayerNorm::new(&mut b.sub("ln1"), d, eps)?;
        let attn = Attention::new(&mut b.sub("attn"), d, d, heads, out_std, tp)?;
        let cross = match cross {
            Some((dkv, gated)) => {
                let ln = LayerNorm::new(&mut b.sub("ln_x"), d, eps)?;
                let xattn = Attention::new(&mut b.sub("xattn"), d, dkv, heads, out_std, tp)?;
                let gate = if gated {
                    Some(b.param("gate", &[1], Shard::FULL, Init::Zeros, false)?)
                } else {
                    None
                };
                Some((ln, xattn, gate))
            }
            None => None,
        };
        Ok(Block {
            ln1,
            attn,
            cross,
            ln2: LayerNorm::new(&mut b.sub("ln2"), d, eps)?,
            mlp: Mlp::new(&mut b.sub("mlp"), d, mlp_ratio * d, out_std, tp)?,
        })
    }

    fn forward(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        stream: Stream,
        mask: Mask<'_>,
    ) -> Result<()> {
        let slot = |acts: &Acts| -> Result<Tensor> {
            match stream {
                Stream::Image => Acts::take(&acts.image, "image"),
                Stream::Text => Acts::take(&acts.text, "text"),
            }
        };
        let store = |acts: &mut Acts, t: Tensor| match stream {
            Stream::Image => acts.image = Some(t),
            Stream::Text => acts.text = Some(t),
        };

        let h = self.ln1.forward(&slot(acts)?)?;
        let h = enter(tp, acts, &[&h])?.remove(0);
        let y = self.attn.forward(tp, &h, &h, mask)?;
        let x = slot(acts)?.f_add(&y)?;
        store(acts, x);

        if let Some((ln, xattn, gate)) = &self.cross {
            let h = ln.forward(&slot(acts)?)?;
            let memory = Acts::take(&acts.image, "image")?;
            let mut hm = enter(tp, acts, &[&h, &memory])?;
            let m = hm.remove(1);
            let h = hm.remove(0);
            let mut y = xattn.forward(tp, &h, &m, Mask::None)?;
            if let Some(g) = gate {
                y = y.f_mul(&g.f_tanh()?)?;
            }
            let x = slot(acts)?.f_add(&y)?;
            store(acts, x);
        }

        let h = self.ln2.forward(&slot(acts)?)?;
        let h = enter(tp, acts, &[&h])?.remove(0);
        let y = self.mlp.forward(tp, &h)?;
        let x = slot(acts)?.f_add(&y)?;
        store(acts, x);
        Ok(())
    }
}

/// `f` over `inputs`, with every present activation as a live tensor.
fn enter(tp: &mut dyn TensorParallel, acts: &mut Acts, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let mut live = acts.present_mut();
    tp.enter(&mut live, inputs).map_err(map_tp)
}

#[derive(Debug)]
struct VisionEmbed {
    patch: Linear,
    pos: Tensor,
}

/// A final norm and the projection into the contrastive embedding space.
#[derive(Debug)]
struct Pooler {
    ln: LayerNorm,
    proj: Tensor,
}

impl Pooler {
    /// `prefix.<ln_name>` and `prefix.proj` `[e, d]` (normal, std d^-1/2).
    fn new(b: &mut Builder<'_>, ln_name: &str, d: i64, e: i64, eps: f64) -> Result<Pooler> {
        Ok(Pooler {
            ln: LayerNorm::new(&mut b.sub(ln_name), d, eps)?,
            proj: b.param(
                "proj",
                &[e, d],
                Shard::FULL,
                Init::Normal((d as f64).powf(-0.5)),
                true,
            )?,
        })
    }
}

#[derive(Debug)]
struct TextEmbed {
    tok: Tensor,
    pos: Tensor,
}

#[derive(Debug)]
struct Heads {
    ln: LayerNorm,
    lm: Linear,
    itm: Linear,
    logit_scale: Tensor,
}

/// The layer kinds, in model order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// An image-encoder block.
    Vision,
    /// A unimodal (text-only, causal) block.
    Unimodal,
    /// A multimodal block.
    Multimodal,
}

/// The model's layers `layers` (all of them for a single process), this process's
/// tensor-parallel part.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    layers: Range<usize>,
    pad_id: i64,
    vision_embed: Option<VisionEmbed>,
    vision_head: Option<Pooler>,
    text_embed: Option<TextEmbed>,
    text_pool: Option<Pooler>,
    fusion_in: Option<Linear>,
    heads: Option<Heads>,
    blocks: Vec<Block>,
}

impl Model {
    /// Number of cuttable layers.
    pub fn num_layers(cfg: &ModelConfig) -> usize {
        cfg.vision_layers + cfg.unimodal_layers + cfg.multimodal_layers
    }

    /// The kind of layer `i`.
    pub fn layer_kind(cfg: &ModelConfig, i: usize) -> LayerKind {
        if i < cfg.vision_layers {
            LayerKind::Vision
        } else if i < cfg.vision_layers + cfg.unimodal_layers {
            LayerKind::Unimodal
        } else {
            LayerKind::Multimodal
        }
    }

    /// The activations entering layer `layer` for a micro-batch of `mbs` samples, in
    /// [`Acts::present`] order, with their shapes and dtypes (`kind` is the compute dtype;
    /// embeddings are f32): what a pipeline boundary before that layer carries.
    pub fn boundary_layout(
        cfg: &ModelConfig,
        layer: usize,
        mbs: usize,
        itm: bool,
        kind: Kind,
    ) -> Vec<(ActField, Vec<i64>, Kind)> {
        let (lv, lu) = (cfg.vision_layers, cfg.unimodal_layers);
        let first_mm = lv + lu;
        let b = mbs as i64;
        let n = cfg.num_patches() as i64;
        let t = cfg.max_text_len as i64;
        let (dv, dt, e) = (
            cfg.vision_width as i64,
            cfg.text_width as i64,
            cfg.embed_dim as i64,
        );
        let mut out = Vec::new();
        if layer == 0 {
            return out;
        }
        // Past the first multimodal layer the pairs are doubled (matching negatives) and,
        // with prefix fusion, the image tokens live inside the text sequence.
        let mm = layer > first_mm;
        let rows = if mm && itm { 2 * b } else { b };
        let prefix = mm && cfg.fusion == Fusion::Prefix;
        if !prefix {
            out.push((ActField::Image, vec![rows, n, dv], kind));
        }
        if layer > lv {
            let len = if prefix { n + t } else { t };
            out.push((ActField::Text, vec![rows, len, dt], kind));
        }
        if layer >= lv {
            out.push((ActField::ImageEmb, vec![b, e], Kind::Float));
        }
        if layer >= first_mm {
            out.push((ActField::TextEmb, vec![b, e], Kind::Float));
        }
        out
    }

    /// Relative forward cost of each layer (FLOPs by formula; image-encoder blocks scaled by
    /// `vision_cost`), for balancing pipeline stages.
    pub fn layer_costs(cfg: &ModelConfig, itm: bool, vision_cost: f64) -> Vec<f64> {
        let (dv, dt) = (cfg.vision_width as f64, cfg.text_width as f64);
        let r = cfg.mlp_ratio as f64;
        let n = cfg.num_patches() as f64;
        let t = cfg.max_text_len as f64;
        let block = |d: f64, tokens: f64, keys: f64| {
            tokens * (8.0 * d * d + 4.0 * r * d * d) + 4.0 * tokens * keys * d
        };
        let copies = if itm { 2.0 } else { 1.0 };
        let mm = match cfg.fusion {
            Fusion::Prefix => block(dt, t + n, t + n),
            _ => block(dt, t, t) + 4.0 * t * dt * dt + 4.0 * n * dv * dt + 4.0 * t * n * dt,
        };
        (0..Model::num_layers(cfg))
            .map(|i| match Model::layer_kind(cfg, i) {
                LayerKind::Vision => vision_cost * block(dv, n, n),
                LayerKind::Unimodal => block(dt, t, t),
                LayerKind::Multimodal => copies * mm,
            })
            .collect()
    }

    /// What a parallel layout must divide (heads, split widths, layers).
    pub fn limits(cfg: &ModelConfig) -> weaver_parallel::mesh::ModelLimits {
        weaver_parallel::mesh::ModelLimits {
            heads: vec![
                ("model.vision_heads".into(), cfg.vision_heads),
                ("model.text_heads".into(), cfg.text_heads),
            ],
            split_widths: vec![
                (
                    "the vision MLP width".into(),
                    cfg.mlp_ratio * cfg.vision_width,
                ),
                ("the text MLP width".into(), cfg.mlp_ratio * cfg.text_width),
                ("model.vocab_size".into(), cfg.vocab_size),
            ],
            layers: Model::num_layers(cfg),
        }
    }

    /// Builds layers `layers` into `store` (initial values from the store's seed).
    pub fn new(
        store: &mut ParamStore,
        cfg: &ModelConfig,
        layers: Range<usize>,
        tp: TpPos,
        pad_id: i64,
    ) -> Result<Model> {
        cfg.validate()?;
        let n = Model::num_layers(cfg);
        if layers.start >= layers.end || layers.end > n {
            return Err(ModelError::ParamMismatch(format!(
                "layer range {layers:?} is not inside the model's {n} layers"
            )));
        }
        let (dv, dt) = (cfg.vision_width as i64, cfg.text_width as i64);
        let (lv, lu) = (cfg.vision_layers, cfg.unimodal_layers);
        let first_mm = lv + lu;
        let eps = cfg.norm_eps;
        let ratio = cfg.mlp_ratio as i64;
        let e = cfg.embed_dim as i64;
        let mut root = store.root();
        let has = |i: usize| layers.contains(&i);

        let vision_embed = if has(0) {
            let mut b = root.sub("vision");
            Some(VisionEmbed {
                patch: Linear::new(
                    &mut b.sub("patch_embed"),
                    cfg.patch_dim() as i64,
                    dv,
                    true,
                    0.02,
                    Split::Replicated,
                    tp,
                )?,
                pos: b.param(
                    "pos",
                    &[cfg.num_patches() as i64, dv],
                    Shard::FULL,
                    Init::Normal(0.01),
                    false,
                )?,
            })
        } else {
            None
        };
        let text_embed = if has(lv) {
            let mut b = root.sub("text");
            Some(TextEmbed {
                tok: b.param(
                    "tok_embed.weight",
                    &[cfg.vocab_size as i64, dt],
                    tp.shard(0),
                    Init::Normal(0.02),
                    true,
                )?,
                pos: b.param(
                    "pos",
                    &[cfg.max_text_len as i64, dt],
                    Shard::FULL,
                    Init::Normal(0.01),
                    false,
                )?,
            })
        } else {
            None
        };
        let mut blocks = Vec::new();
        let (mut vision_head, mut text_pool, mut fusion_in, mut heads) = (None, None, None, None);
        for i in layers.clone() {
            let block = match Model::layer_kind(cfg, i) {
                LayerKind::Vision => Block::new(
                    &mut root.sub("vision").sub("blocks").sub(i),
                    dv,
                    cfg.vision_heads as i64,
                    ratio,
                    lv as i64,
                    None,
                    eps,
                    tp,
                )?,
                LayerKind::Unimodal => Block::new(
                    &mut root.sub("text").sub("unimodal").sub(i - lv),
                    dt,
                    cfg.text_heads as i64,
                    ratio,
                    (lu + cfg.multimodal_layers) as i64,
                    None,
                    eps,
                    tp,
                )?,
                LayerKind::Multimodal => {
                    let cross = match cfg.fusion {
                        Fusion::CrossAttention => Some((dv, false)),
                        Fusion::GatedCrossAttention => Some((dv, true)),
                        Fusion::Prefix => None,
                    };
                    if i == first_mm && cfg.fusion == Fusion::Prefix {
                        fusion_in = Some(Linear::new(
                            &mut root.sub("fusion").sub("image_proj"),
                            dv,
                            dt,
                            true,
                            0.02,
                            Split::Replicated,
                            tp,
                        )?);
                    }
                    Block::new(
                        &mut root.sub("text").sub("multimodal").sub(i - first_mm),
                        dt,
                        cfg.text_heads as i64,
                        ratio,
                        (lu + cfg.multimodal_layers) as i64,
                        cross,
                        eps,
                        tp,
                    )?
                }
            };
            blocks.push(block);
            if i + 1 == lv {
                vision_head = Some(Pooler::new(&mut root.sub("vision"), "ln_post", dv, e, eps)?);
            }
            if i + 1 == first_mm {
                text_pool = Some(Pooler::new(&mut root.sub("text"), "ln_pool", dt, e, eps)?);
            }
            if i + 1 == n {
                let mut b = root.sub("head");
                heads = Some(Heads {
                    ln: LayerNorm::new(&mut b.sub("ln"), dt, eps)?,
                    lm: Linear::new(
                        &mut b.sub("lm"),
                        dt,
                        cfg.vocab_size as i64,
                        false,
                        0.02,
                        Split::Column,
                        tp,
                    )?,
                    itm: Linear::new(&mut b.sub("itm"), dt, 2, true, 0.02, Split::Replicated, tp)?,
                    logit_scale: b.param(
                        "logit_scale",
                        &[],
                        Shard::FULL,
                        Init::Const((1.0f64 / 0.07).ln()),
                        false,
                    )?,
                });
            }
        }
        Ok(Model {
            cfg: cfg.clone(),
            layers,
            pad_id,
            vision_embed,
            vision_head,
            text_embed,
            text_pool,
            fusion_in,
            heads,
            blocks,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The layers held here.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    /// Whether this holds the first layer (it embeds the inputs).
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }

    /// Whether this holds the last layer (it computes the losses).
    pub fn is_last(&self) -> bool {
        self.layers.end == Model::num_layers(&self.cfg)
    }

    /// Patches `[B, 3, H, W]` into `[B, N, p·p·3]` (row-major patches, each `(py, px, c)`).
    pub fn patchify(&self, images: &Tensor) -> Result<Tensor> {
        let p = self.cfg.patch_size as i64;
        let s = images.size();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        Ok(images
            .f_reshape([b, c, h / p, p, w / p, p])?
            .f_permute([0, 2, 4, 3, 5, 1])?
            .f_reshape([b, (h / p) * (w / p), p * p * c])?)
    }

    /// Runs this model's layers on `acts` (empty for the first stage), with `batch` the
    /// micro-batch (the first stage reads its images, the text stages its tokens).
    /// `itm` adds the matching negatives at the first multimodal layer.
    pub fn forward(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        batch: &Batch,
        itm: bool,
    ) -> Result<()> {
        self.forward_until(tp, acts, batch, itm, self.layers.end)
    }

    /// Normalised image and text embeddings `[B, E]` of the contrastive loss (single
    /// process: runs the image encoder and the unimodal layers only).
    pub fn embeddings(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let mut acts = Acts::default();
        let end = self.cfg.vision_layers + self.cfg.unimodal_layers;
        self.forward_until(&mut weaver_parallel::tp::NoTp, &mut acts, batch, false, end)?;
        Ok((
            Acts::take(&acts.image_emb, "image_emb")?,
            Acts::take(&acts.text_emb, "text_emb")?,
        ))
    }

    /// As [`Model::forward`], stopping before layer `end`.
    pub fn forward_until(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        batch: &Batch,
        itm: bool,
        end: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (lv, lu) = (cfg.vision_layers, cfg.unimodal_layers);
        let first_mm = lv + lu;
        for (block, i) in self.blocks.iter().zip(self.layers.start..end) {
            if i == 0 {
                let e = self
                    .vision_embed
                    .as_ref()
                    .ok_or_else(|| missing("vision.patch_embed"))?;
                let patches = self.patchify(&batch.images.f_to_kind(self.param_kind())?)?;
                let x = e.patch.forward_local(&patches)?.f_add(&e.pos)?;
                acts.image = Some(x);
            }
            if i == lv {
                let e = self
                    .text_embed
                    .as_ref()
                    .ok_or_else(|| missing("text.tok_embed"))?;
                let x = self
                    .embed_tokens(tp, &e.tok, &batch.tokens)?
                    .f_add(&e.pos)?;
                acts.text = Some(x);
            }
            if i == first_mm {
                self.enter_multimodal(acts, batch, itm)?;
            }
            let (stream, mask_t);
            let mask = match Model::layer_kind(cfg, i) {
                LayerKind::Vision => {
                    stream = Stream::Image;
                    Mask::None
                }
                LayerKind::Unimodal => {
                    stream = Stream::Text;
                    Mask::Causal
                }
                LayerKind::Multimodal => {
                    stream = Stream::Text;
                    if cfg.fusion == Fusion::Prefix {
                        mask_t = self.prefix_mask(acts)?;
                        Mask::Explicit(&mask_t)
                    } else {
                        Mask::Causal
                    }
                }
            };
            block.forward(tp, acts, stream, mask)?;
            if i + 1 == lv {
                let h = self
                    .vision_head
                    .as_ref()
                    .ok_or_else(|| missing("vision.ln_post"))?;
                let x = h.ln.forward(&Acts::take(&acts.image, "image")?)?;
                let pooled = x.f_mean_dim(1, false, x.kind())?;
                acts.image_emb = Some(normalize(&pooled.f_matmul(&h.proj.f_tr()?)?)?);
                acts.image = Some(x);
            }
            if i + 1 == first_mm {
                let p = self
                    .text_pool
                    .as_ref()
                    .ok_or_else(|| missing("text.ln_pool"))?;
                let x = Acts::take(&acts.text, "text")?;
                let at_eos = gather_rows(&x, &batch.eos)?;
                let h = p.ln.forward(&at_eos)?;
                acts.text_emb = Some(normalize(&h.f_matmul(&p.proj.f_tr()?)?)?);
            }
        }
        Ok(())
    }

    fn param_kind(&self) -> Kind {
        self.blocks
            .first()
            .map(|b| b.ln1.weight.kind())
            .unwrap_or(Kind::Float)
    }

    /// Token embedding; with TP the vocabulary is split and each rank embeds the tokens
    /// that fall in its part, the parts summed by `g`.
    fn embed_tokens(
        &self,
        tp: &mut dyn TensorParallel,
        table: &Tensor,
        tokens: &Tensor,
    ) -> Result<Tensor> {
        let pos = tp.pos();
        if pos.size == 1 {
            return Ok(Tensor::f_embedding(table, tokens, -1, false, false)?);
        }
        let part = table.size()[0];
        let lo = pos.rank as i64 * part;
        let inside = tokens.f_ge(lo)?.f_logical_and(&tokens.f_lt(lo + part)?)?;
        let local = (tokens - lo).f_where_self(&inside, &tokens.f_zeros_like()?)?;
        let e = Tensor::f_embedding(table, &local, -1, false, false)?;
        let e = e.f_mul(&inside.f_unsqueeze(-1)?.f_to_kind(e.kind())?)?;
        tp.reduce_sum(&e).map_err(map_tp)
    }

    /// Before the first multimodal layer: add matching negatives (each caption with the
    /// next image of the micro-batch) and, for prefix fusion, prepend projected image
    /// tokens.
    fn enter_multimodal(&self, acts: &mut Acts, _batch: &Batch, itm: bool) -> Result<()> {
        let mut image = Acts::take(&acts.image, "image")?;
        let mut text = Acts::take(&acts.text, "text")?;
        if itm {
            let negatives = image.f_roll([-1], [0])?;
            image = Tensor::f_cat(&[&image, &negatives], 0)?;
            text = Tensor::f_cat(&[&text, &text], 0)?;
        }
        if self.cfg.fusion == Fusion::Prefix {
            let proj = self
                .fusion_in
                .as_ref()
                .ok_or_else(|| missing("fusion.image_proj"))?;
            let prefix = proj.forward_local(&image)?;
            acts.image = None;
            acts.text = Some(Tensor::f_cat(&[&prefix, &text], 1)?);
            return Ok(());
        }
        acts.image = Some(image);
        acts.text = Some(text);
        Ok(())
    }

    /// Prefix-LM mask over `[N image; T text]`: image tokens see each other, text sees
    /// every image token and earlier text (`true` = may attend).
    fn prefix_mask(&self, acts: &Acts) -> Result<Tensor> {
        let n = self.cfg.num_patches() as i64;
        let total = Acts::take(&acts.text, "text")?.size()[1];
        let dev = acts
            .text
            .as_ref()
            .map(|t| t.device())
            .unwrap_or(tch::Device::Cpu);
        let causal = Tensor::f_ones([total, total], (Kind::Bool, dev))?.f_tril(0)?;
        let cols = Tensor::f_arange(total, (Kind::Int64, dev))?;
        let image_col = cols.f_lt(n)?.f_unsqueeze(0)?;
        let rows = cols.f_unsqueeze(1)?;
        let text_row = rows.f_ge(n)?;
        // image rows: image columns only; text rows: image columns or causal.
        let image_rows = image_col.f_logical_and(&text_row.f_logical_not()?)?;
        let text_rows = text_row.f_logical_and(&image_col.f_logical_or(&causal)?)?;
        Ok(image_rows.f_logical_or(&text_rows)?)
    }

    /// The losses of a micro-batch from the last layer's activations.
    pub fn losses(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        batch: &Batch,
        w: LossWeights,
    ) -> Result<Losses> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let b = batch.len() as i64;
        let mut text = Acts::take(&acts.text, "text")?;
        if self.cfg.fusion == Fusion::Prefix {
            let n = self.cfg.num_patches() as i64;
            let total = text.size()[1];
            text = text.f_narrow(1, n, total - n)?;
        }
        // `h` feeds the column-parallel LM head through `f`, and the replicated matching
        // head directly (its gradient must not be summed over the TP group).
        let h = heads.ln.forward(&text)?;
        let mut h_rep = h.shallow_clone();
        let h_lm = {
            let mut live = acts.present_mut();
            live.push(&mut h_rep);
            tp.enter(&mut live, &[&h]).map_err(map_tp)?.remove(0)
        };
        let f32 = |t: Tensor| t.f_to_kind(Kind::Float);

        // Captioning: position t predicts token t + 1 of the positive pairs.
        let t = h_lm.size()[1];
        let pos = h_lm.f_narrow(0, 0, b)?.f_narrow(1, 0, t - 1)?;
        let logits = f32(heads.lm.forward_local(&pos)?)?;
        let targets = batch.tokens.f_narrow(1, 1, t - 1)?;
        let caption = self.vocab_cross_entropy(tp, &logits, &targets)?;

        // Contrastive: symmetric InfoNCE over the micro-batch, learnable temperature
        // (clamped at 100 as in CLIP).
        let ie = f32(Acts::take(&acts.image_emb, "image_emb")?)?;
        let te = f32(Acts::take(&acts.text_emb, "text_emb")?)?;
        let scale = f32(heads.logit_scale.shallow_clone())?
            .f_exp()?
            .f_clamp_max(100.0)?;
        let sim = ie.f_matmul(&te.f_tr()?)?.f_mul(&scale)?;
        let labels = Tensor::f_arange(b, (Kind::Int64, sim.device()))?;
        let itc =
            (sim.f_cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0)?
                + sim.f_tr()?.f_cross_entropy_loss::<Tensor>(
                    &labels,
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                )?)
                * 0.5;

        // Matching: the EOS state of positive and negative pairs.
        let itm = if w.itm > 0.0 {
            let eos = Tensor::f_cat(&[&batch.eos, &batch.eos], 0)?;
            let at_eos = gather_rows(&h_rep, &eos)?;
            let logits = f32(heads.itm.forward_local(&at_eos)?)?;
            let dev = logits.device();
            let y = Tensor::f_cat(
                &[
                    Tensor::f_ones([b], (Kind::Int64, dev))?,
                    Tensor::f_zeros([b], (Kind::Int64, dev))?,
                ],
                0,
            )?;
            logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?
        } else {
            Tensor::f_zeros([], (Kind::Float, h_rep.device()))?
        };
        let total = itc
            .f_mul_scalar(w.itc)?
            .f_add(&caption.f_mul_scalar(w.caption)?)?
            .f_add(&itm.f_mul_scalar(w.itm)?)?;
        Ok(Losses {
            total,
            itc,
            caption,
            itm,
        })
    }

    /// Mean cross-entropy over non-padding targets; with TP the logits hold this rank's
    /// part of the vocabulary and the softmax is computed across the group (Megatron's
    /// vocab-parallel cross-entropy).
    fn vocab_cross_entropy(
        &self,
        tp: &mut dyn TensorParallel,
        logits: &Tensor,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let v = logits.size()[2];
        let flat = logits.f_reshape([-1, v])?;
        let tgt = targets.f_reshape([-1])?;
        let pos = tp.pos();
        if pos.size == 1 {
            return Ok(flat.f_cross_entropy_loss::<Tensor>(
                &tgt,
                None,
                tch::Reduction::Mean,
                self.pad_id,
                0.0,
            )?);
        }
        let lo = pos.rank as i64 * v;
        let max = tp
            .max_no_grad(&flat.f_amax([1], true)?.f_detach()?)
            .map_err(map_tp)?;
        let shifted = flat.f_sub(&max)?;
        let sum_exp = tp
            .reduce_sum(&shifted.f_exp()?.f_sum_dim_intlist(
                [1i64].as_slice(),
                true,
                Kind::Float,
            )?)
            .map_err(map_tp)?;
        let inside = tgt.f_ge(lo)?.f_logical_and(&tgt.f_lt(lo + v)?)?;
        let local = (&tgt - lo).f_where_self(&inside, &tgt.f_zeros_like()?)?;
        let picked = shifted
            .f_gather(1, &local.f_unsqueeze(1)?, false)?
            .f_mul(&inside.f_unsqueeze(1)?.f_to_kind(Kind::Float)?)?;
        let target_logit = tp.reduce_sum(&picked).map_err(map_tp)?;
        let nll = sum_exp.f_log()?.f_sub(&target_logit)?.f_squeeze_dim(1)?;
        let valid = tgt.f_ne(self.pad_id)?.f_to_kind(Kind::Float)?;
        Ok(nll
            .f_mul(&valid)?
            .f_sum(Kind::Float)?
            .f_div(&valid.f_sum(Kind::Float)?.f_clamp_min(1.0)?)?)
    }

    /// Next-token logits of the captioning head for every position of `tokens` `[B, T]`,
    /// given images `[B, 3, H, W]` (single process: needs every layer).
    pub fn caption_logits(&self, images: &Tensor, tokens: &Tensor, eos: &Tensor) -> Result<Tensor> {
        let batch = Batch {
            images: images.shallow_clone(),
            tokens: tokens.shallow_clone(),
            eos: eos.shallow_clone(),
            indices: vec![0; images.size()[0] as usize],
        };
        let mut tp = weaver_parallel::tp::NoTp;
        let mut acts = Acts::default();
        self.forward(&mut tp, &mut acts, &batch, false)?;
        self.head_logits(&acts)
    }

    /// Logits of the captioning head for every text position from the last layer's
    /// activations, over this process's part of the vocabulary (all of it without tensor
    /// parallelism): what a pipeline's last stage decodes from.
    pub fn head_logits(&self, acts: &Acts) -> Result<Tensor> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let mut text = Acts::take(&acts.text, "text")?;
        if self.cfg.fusion == Fusion::Prefix {
            let n = self.cfg.num_patches() as i64;
            let total = text.size()[1];
            text = text.f_narrow(1, n, total - n)?;
        }
        let h = heads.ln.forward(&text)?;
        heads.lm.forward_local(&h)
    }
}

fn missing(what: &str) -> ModelError {
    ModelError::ParamMismatch(format!("this model shard does not hold {what}"))
}

/// L2-normalises the rows of `x` (in f32, as CLIP does).
fn normalize(x: &Tensor) -> Result<Tensor> {
    let x = x.f_to_kind(Kind::Float)?;
    let n = x
        .f_norm_scalaropt_dim(2.0, [-1], true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&n)?)
}

/// `x[i, idx[i], :]` for each row `i`.
fn gather_rows(x: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let d = x.size()[2];
    let index = idx.f_view([-1, 1, 1])?.f_expand([-1, 1, d], false)?;
    Ok(x.f_gather(1, &index, false)?.f_squeeze_dim(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Split};
    use crate::tokenizer::GrammarTokenizer;
    use std::sync::Arc;
    use tch::Device;
    use weaver_parallel::tp::NoTp;

    fn cfg(fusion: Fusion) -> ModelConfig {
        ModelConfig {
            fusion,
            ..ModelConfig::flavor("debug").unwrap()
        }
    }

    #[test]
    fn parameter_count_matches_the_formula() {
        for fusion in Fusion::ALL {
            let c = cfg(fusion);
            let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
            Model::new(&mut store, &c, 0..Model::num_layers(&c), TpPos::SINGLE, 0).unwrap();
            assert_eq!(store.numel() as u64, c.num_params(), "{fusion:?}");
        }
    }

    #[test]
    fn boundary_layouts_match_what_each_layer_produces() {
        for fusion in Fusion::ALL {
            for itm in [false, true] {
                let c = cfg(fusion);
                let n = Model::num_layers(&c);
                let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
                let model = Model::new(&mut store, &c, 0..n, TpPos::SINGLE, 0).unwrap();
                let data = Dataset {
                    seed: 0,
                    image_size: c.image_size,
                    max_objects: 2,
                    text_len: c.max_text_len,
                    tokenizer: Arc::new(GrammarTokenizer::new()),
                };
                let batch = data.batch(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
                for end in 1..n {
                    let mut acts = Acts::default();
                    model
                        .forward_until(&mut NoTp, &mut acts, &batch, itm, end)
                        .unwrap();
                    let got: Vec<(Vec<i64>, Kind)> = acts
                        .present()
                        .iter()
                        .map(|t| (t.size(), t.kind()))
                        .collect();
                    let want: Vec<(Vec<i64>, Kind)> =
                        Model::boundary_layout(&c, end, 3, itm, Kind::Float)
                            .into_iter()
                            .map(|(_, s, k)| (s, k))
                            .collect();
                    assert_eq!(got, want, "{fusion:?}, itm {itm}, before layer {end}");
                }
            }
        }
    }

    #[test]
    fn prefix_mask_lets_text_see_every_image_token_and_only_earlier_text() {
        let c = cfg(Fusion::Prefix);
        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
        let model = Model::new(&mut store, &c, 0..Model::num_layers(&c), TpPos::SINGLE, 0).unwrap();
        let n = c.num_patches() as i64;
        let t = 3i64;
        let acts = Acts {
            text: Some(Tensor::zeros([1, n + t, 4], (Kind::Float, Device::Cpu))),
            ..Acts::default()
        };
        let m = model.prefix_mask(&acts).unwrap();
        let at = |i: i64, j: i64| m.int64_value(&[i, j]) != 0;
        assert!(at(0, n - 1), "image sees image");
        assert!(!at(0, n), "image does not see text");
        assert!(at(n, 0) && at(n, n), "text sees image and itself");
        assert!(!at(n, n + 1), "text does not see later text");
        assert!(at(n + 2, n + 1));
    }
}
