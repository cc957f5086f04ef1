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

use crate::config::{
    Activation, Fusion, ModelConfig, MultimodalBlock, PadMask, TextPool, VisionPool,
};
use crate::data::Batch;
use crate::error::{ModelError, Result};
use crate::nn::{Builder, Init, LayerNorm, Linear, ParamStore, Shard, Split, TpPos};

pub mod decode;

/// Tensors flowing between layers (and across pipeline stages).
#[derive(Debug, Default)]
pub struct Acts {
    /// Image tokens `[B, N, Dv]`: the encoder's residual stream, then (normed) the memory
    /// the decoder attends to: still the pairs' `B` rows with matching negatives alone (the
    /// cross-attention rolls their queries onto it), one row per text row with MLM or VQA
    /// rows.
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

/// A field of [`Acts`] (defined with the boundary shapes in `weaver-config`, which the
/// planner reads without libtorch).
pub use weaver_config::layers::ActField;

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
    /// Masked-language-modelling cross-entropy per masked token (zero without MLM rows).
    pub mlm: Tensor,
    /// VQA answer cross-entropy per answer token (zero without VQA rows).
    pub vqa: Tensor,
    /// The captioning head's next-token logits at the caption target positions of the
    /// positive pairs, `[B, T − 1, V_local]` (f32, with their graph; this rank's part of
    /// the vocabulary under tensor parallelism), what the captioning loss scored (none
    /// without a decoder or unless [`Model::keep_caption_logits`]): distillation's caption
    /// KL compares them with a teacher's.
    pub caption_logits: Option<Tensor>,
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
    /// Masked language modelling (the batches carry MLM rows when > 0).
    pub mlm: f64,
    /// Visual question answering (the batches carry VQA rows when > 0).
    pub vqa: f64,
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

/// How a row-parallel layer's partial sums are reduced over the TP group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Summed, every rank keeping the whole result (Megatron's `g`).
    Sum,
    /// Summed and split along the sequence, each rank keeping its shard (sequence
    /// parallelism's reduce-scatter).
    Scatter,
}

impl Out {
    fn reduce(
        self,
        tp: &mut dyn TensorParallel,
        live: &mut [&mut Tensor],
        partial: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Out::Sum => tp.reduce_sum(partial).map_err(map_tp),
            Out::Scatter => tp.seq_reduce(live, partial).map_err(map_tp),
        }
    }
}

/// The true sequence lengths a block works on (its stream's, and the memory's for
/// cross-attention): what a gather of sequence shards cuts the padding at.
#[derive(Debug, Clone, Copy)]
struct Lens {
    stream: i64,
    memory: i64,
    /// `Some(n)`: the stream's `2n` rows are the `n` pairs and their matching negatives
    /// (caption `i` with image `i + 1`), and the memory holds the `n` pairs' images only:
    /// the cross-attention computes their keys and values once and rolls the negatives'
    /// queries onto them, instead of attending to a doubled memory `[m; m.roll(-1)]`.
    rolled_memory: Option<i64>,
}

/// The heads of an attention: how many, and how wide each (`model.*_head_dim`; q, k and v
/// project to `heads · head_dim`, which need not be the stream's width).
#[derive(Debug, Clone, Copy)]
struct HeadSpec {
    heads: i64,
    head_dim: i64,
}

impl HeadSpec {
    fn width(self) -> i64 {
        self.heads * self.head_dim
    }
}

impl Attention {
    /// Queries from a `dq`-wide stream, keys and values from a `dkv`-wide one, `h.heads`
    /// heads of `h.head_dim` (split over the TP group), the output back to `dq`.
    fn new(
        b: &mut Builder<'_>,
        dq: i64,
        dkv: i64,
        h: HeadSpec,
        out_std: f64,
        tp: TpPos,
    ) -> Result<Attention> {
        let std = 0.02;
        let a = h.width();
        Ok(Attention {
            q: Linear::new(&mut b.sub("q"), dq, a, true, std, Split::Column, tp)?,
            k: Linear::new(&mut b.sub("k"), dkv, a, true, std, Split::Column, tp)?,
            v: Linear::new(&mut b.sub("v"), dkv, a, true, std, Split::Column, tp)?,
            o: Linear::new(&mut b.sub("o"), a, dq, true, out_std, Split::Row, tp)?,
            heads: h.heads / tp.size as i64,
            head_dim: h.head_dim,
        })
    }

    /// Attention of `xq` over `xkv` (both already through `f`), summed over the TP group
    /// and with the output bias added; `acts` are live across it.
    fn forward(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        xq: &Tensor,
        xkv: &Tensor,
        mask: Mask<'_>,
        out: Out,
    ) -> Result<Tensor> {
        let q = self.project_q(xq)?;
        let (k, v) = self.project_kv(xkv)?;
        self.attend_out(tp, &mut acts.present_mut(), &q, &k, &v, mask, out)
    }

    /// Cross-attention of `xq` (`2n` rows) over the memory `[m; m.roll(-1)]` given as `m`
    /// (`n` rows): the keys and values of `m` only (see `Lens::rolled_memory`).
    fn forward_rolled_memory(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        xq: &Tensor,
        m: &Tensor,
        out: Out,
    ) -> Result<Tensor> {
        let q = self.project_q(xq)?;
        let (k, v) = self.project_kv(m)?;
        // Not the keys and values doubled but the queries moved: negative caption `i`
        // attends to image `i + 1`, so the negatives' queries, rolled forward by one row,
        // line up with `m`'s own rows and join the positives' queries along the sequence
        // (cross-attention has no mask, so every query attends alone). One attention over
        // `n` rows of keys and values, whose gradients are never doubled and summed. The
        // joining works on `[B, T, H, hd]`, the layout the projections have in memory, and
        // the output is split back after the (row-wise) output projection, so that the
        // projection's input is what the attention keeps, as without the negatives.
        let core: weaver_parallel::tp::Recomputed = Box::new(move |t: &[Tensor]| {
            let (q, k, v) = (t[0].f_transpose(1, 2)?, &t[1], &t[2]);
            let n = q.size()[0] / 2;
            let pos = q.f_narrow(0, 0, n)?;
            let neg = q.f_narrow(0, n, n)?.f_roll([1], [0])?;
            let joined = Tensor::f_cat(&[&pos, &neg], 1)?.f_transpose(1, 2)?;
            sdpa(&joined, k, v, None, false)
        });
        self.attend_core(tp, &mut acts.present_mut(), &q, &k, &v, core, out, true)
    }

    /// `[B, T, H·hd]` → `[B, H, T, hd]` (this rank's heads).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.size();
        Ok(x.f_view([s[0], s[1], self.heads, self.head_dim])?
            .f_transpose(1, 2)?)
    }

    /// The queries of `x`, `[B, H, T, hd]`.
    fn project_q(&self, x: &Tensor) -> Result<Tensor> {
        self.split_heads(&self.q.forward_local(x)?)
    }

    /// The keys and values of `x`, each `[B, H, T, hd]` (what a decoding cache keeps).
    fn project_kv(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split_heads(&self.k.forward_local(x)?)?,
            self.split_heads(&self.v.forward_local(x)?)?,
        ))
    }

    /// Scaled dot-product attention of `q` over `k`, `v` (`[B, H, T, hd]`), then the output
    /// projection summed over the TP group, with its bias. The scaled dot product is the
    /// region selective recomputation runs again ([`TensorParallel::recomputed`]); `live`
    /// are the tensors needed after it.
    fn attend(
        &self,
        tp: &mut dyn TensorParallel,
        live: &mut [&mut Tensor],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Mask<'_>,
    ) -> Result<Tensor> {
        self.attend_out(tp, live, q, k, v, mask, Out::Sum)
    }

    /// [`Attention::attend`], the output projection's partial sums reduced as `out` says.
    #[allow(clippy::too_many_arguments)]
    fn attend_out(
        &self,
        tp: &mut dyn TensorParallel,
        live: &mut [&mut Tensor],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Mask<'_>,
        out: Out,
    ) -> Result<Tensor> {
        let (m, causal) = match mask {
            Mask::None => (None, false),
            Mask::Causal => (None, true),
            Mask::Explicit(m) => (Some(m.shallow_clone()), false),
        };
        let core: weaver_parallel::tp::Recomputed =
            Box::new(move |t: &[Tensor]| sdpa(&t[0], &t[1], &t[2], m.as_ref(), causal));
        self.attend_core(tp, live, q, k, v, core, out, false)
    }

    /// `core` (the attention of `q` over `k`, `v`, `[B, H, T, hd]` out) as the region
    /// selective recomputation runs again, then the output projection, reduced as `out`
    /// says, with its bias. `unjoin`: the core's rows are `n` pairs whose sequences join
    /// the positives' and the rolled negatives' (`forward_rolled_memory`); the projection's
    /// output is split back into `2n` rows before the reduction.
    #[allow(clippy::too_many_arguments)]
    fn attend_core(
        &self,
        tp: &mut dyn TensorParallel,
        live: &mut [&mut Tensor],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        core: weaver_parallel::tp::Recomputed,
        out: Out,
        unjoin: bool,
    ) -> Result<Tensor> {
        let a = tp.recomputed(live, &[q, k, v], core).map_err(map_tp)?;
        let (b, tq) = (a.size()[0], a.size()[2]);
        let a = a
            .f_transpose(1, 2)?
            .f_reshape([b, tq, self.heads * self.head_dim])?;
        let mut partial = self.o.forward_local(&a)?;
        if unjoin {
            let t = tq / 2;
            let neg = partial.f_narrow(1, t, t)?.f_roll([-1], [0])?;
            partial = Tensor::f_cat(&[&partial.f_narrow(1, 0, t)?, &neg], 0)?;
        }
        let y = out.reduce(tp, live, &partial)?;
        Ok(match &self.o.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

/// libtorch's fused scaled dot-product attention of `q` over `k`, `v` (`[B, H, T, hd]`):
/// no dropout, the default scale, an optional boolean mask or the causal one.
fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
) -> std::result::Result<Tensor, tch::TchError> {
    Tensor::f_scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None, false)
}

#[derive(Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Mlp {
    fn new(
        b: &mut Builder<'_>,
        d: i64,
        hidden: i64,
        out_std: f64,
        act: Activation,
        tp: TpPos,
    ) -> Result<Mlp> {
        Ok(Mlp {
            fc1: Linear::new(&mut b.sub("fc1"), d, hidden, true, 0.02, Split::Column, tp)?,
            fc2: Linear::new(&mut b.sub("fc2"), hidden, d, true, out_std, Split::Row, tp)?,
            act,
        })
    }

    fn forward(&self, tp: &mut dyn TensorParallel, x: &Tensor) -> Result<Tensor> {
        self.forward_out(tp, &mut [], x, Out::Sum)
    }

    /// [`Mlp::forward`], the second layer's partial sums reduced as `out` says (`live`: the
    /// tensors needed after it, for a cut).
    fn forward_out(
        &self,
        tp: &mut dyn TensorParallel,
        live: &mut [&mut Tensor],
        x: &Tensor,
        out: Out,
    ) -> Result<Tensor> {
        let h = self.fc1.forward_local(x)?;
        let h = match self.act {
            Activation::Gelu => h.f_gelu("none")?,
            // OpenAI CLIP's QuickGELU.
            Activation::QuickGelu => h.f_mul(&h.f_mul_scalar(1.702)?.f_sigmoid()?)?,
        };
        let y = out.reduce(tp, live, &self.fc2.forward_local(&h)?)?;
        Ok(match &self.fc2.bias {
            Some(bias) => y.f_add(bias)?,
            None => y,
        })
    }
}

/// The cross-attention part of a multimodal block.
#[derive(Debug)]
struct Cross {
    /// Norm of the text before the cross-attention.
    ln: LayerNorm,
    /// Norm of the memory (open_clip's `ln_1_kv`; `MultimodalBlock::OpenClip` only).
    ln_kv: Option<LayerNorm>,
    attn: Attention,
    /// Flamingo's tanh gate.
    gate: Option<Tensor>,
    /// A second MLP after the cross-attention (`MultimodalBlock::OpenClip` only).
    mlp: Option<(LayerNorm, Mlp)>,
}

/// What a block's cross-attention looks like.
#[derive(Debug, Clone, Copy)]
struct CrossSpec {
    /// Memory width.
    dkv: i64,
    gated: bool,
    layout: MultimodalBlock,
}

/// Pre-LN transformer block: self-attention, optional cross-attention (plain or gated),
/// MLP; with [`MultimodalBlock::OpenClip`], self-attention and MLP, then cross-attention
/// and a second MLP.
#[derive(Debug)]
struct Block {
    ln1: LayerNorm,
    attn: Attention,
    cross: Option<Cross>,
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
        heads: HeadSpec,
        mlp_ratio: i64,
        depth: i64,
        cross: Option<CrossSpec>,
        eps: f64,
        act: Activation,
        tp: TpPos,
    ) -> Result<Block> {
        // GPT-2's scaled init of the projections that write into the residual stream.
        let out_std = 0.02 / (2.0 * depth as f64).sqrt();
        let ln1 = LayerNorm::new(&mut b.sub("ln1"), d, eps)?;
        let attn = Attention::new(&mut b.sub("attn"), d, d, heads, out_std, tp)?;
        let cross_of = |b: &mut Builder<'_>, spec: CrossSpec| -> Result<Cross> {
            let ln = LayerNorm::new(&mut b.sub("ln_x"), d, eps)?;
            let ln_kv = match spec.layout {
                MultimodalBlock::OpenClip => {
                    Some(LayerNorm::new(&mut b.sub("ln_x_kv"), spec.dkv, eps)?)
                }
                MultimodalBlock::Compact => None,
            };
            let xattn = Attention::new(&mut b.sub("xattn"), d, spec.dkv, heads, out_std, tp)?;
            let gate = if spec.gated {
                Some(b.param("gate", &[1], Shard::FULL, Init::Zeros, false)?)
            } else {
                None
            };
            let mlp = match spec.layout {
                MultimodalBlock::OpenClip => Some((
                    LayerNorm::new(&mut b.sub("ln_x_mlp"), d, eps)?,
                    Mlp::new(&mut b.sub("xmlp"), d, mlp_ratio * d, out_std, act, tp)?,
                )),
                MultimodalBlock::Compact => None,
            };
            Ok(Cross {
                ln,
                ln_kv,
                attn: xattn,
                gate,
                mlp,
            })
        };
        // Parameters are created in the order the forward uses them (a compact block:
        // attention, cross-attention, MLP; an open_clip one: attention, MLP, cross).
        let (cross, ln2, mlp) = match cross {
            Some(spec) if spec.layout == MultimodalBlock::OpenClip => {
                let ln2 = LayerNorm::new(&mut b.sub("ln2"), d, eps)?;
                let mlp = Mlp::new(&mut b.sub("mlp"), d, mlp_ratio * d, out_std, act, tp)?;
                (Some(cross_of(b, spec)?), ln2, mlp)
            }
            spec => {
                let cross = match spec {
                    Some(spec) => Some(cross_of(b, spec)?),
                    None => None,
                };
                let ln2 = LayerNorm::new(&mut b.sub("ln2"), d, eps)?;
                let mlp = Mlp::new(&mut b.sub("mlp"), d, mlp_ratio * d, out_std, act, tp)?;
                (cross, ln2, mlp)
            }
        };
        Ok(Block {
            ln1,
            attn,
            cross,
            ln2,
            mlp,
        })
    }

    /// With sequence parallelism ([`TensorParallel::sequence_parallel`]) the stream and the
    /// memory are sequence shards: the norms, residual additions and gate work on the
    /// shard, the sequence is gathered before the column-parallel layers (the memory once
    /// per cross-attention, i.e. once per layer) and reduce-scattered after the row-parallel
    /// ones.
    fn forward(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        stream: Stream,
        mask: Mask<'_>,
        lens: Lens,
    ) -> Result<()> {
        let sp = tp.sequence_parallel();
        let out = if sp { Out::Scatter } else { Out::Sum };
        let h = self.ln1.forward(&stream_of(acts, stream)?)?;
        let h = if sp {
            seq_enter(tp, acts, &[(&h, lens.stream)])?.remove(0)
        } else {
            enter(tp, acts, &[&h])?.remove(0)
        };
        let y = self.attn.forward(tp, acts, &h, &h, mask, out)?;
        let x = stream_of(acts, stream)?.f_add(&y)?;
        set_stream(acts, stream, x);

        let mlp_first = matches!(&self.cross, Some(c) if c.mlp.is_some());
        if mlp_first {
            residual_mlp(tp, acts, stream, &self.ln2, &self.mlp, lens)?;
        }
        if let Some(c) = &self.cross {
            let h = c.ln.forward(&stream_of(acts, stream)?)?;
            let memory = Acts::take(&acts.image, "image")?;
            // With the matching negatives alone the memory holds the pairs' images only
            // (`n` rows for `2n` text rows): the negatives' half is the same images rolled,
            // which the attention applies to its queries.
            let rolled = lens
                .rolled_memory
                .filter(|&n| n > 0 && memory.size()[0] == n);
            let memory = match &c.ln_kv {
                Some(ln) => ln.forward(&memory)?,
                None => memory,
            };
            let mut hm = if sp {
                seq_enter(tp, acts, &[(&h, lens.stream), (&memory, lens.memory)])?
            } else {
                enter(tp, acts, &[&h, &memory])?
            };
            let m = hm.remove(1);
            let h = hm.remove(0);
            let mut y = match rolled {
                Some(_) => c.attn.forward_rolled_memory(tp, acts, &h, &m, out)?,
                None => c.attn.forward(tp, acts, &h, &m, Mask::None, out)?,
            };
            if let Some(g) = &c.gate {
                y = y.f_mul(&g.f_tanh()?)?;
            }
            let x = stream_of(acts, stream)?.f_add(&y)?;
            set_stream(acts, stream, x);
            if let Some((ln, mlp)) = &c.mlp {
                residual_mlp(tp, acts, stream, ln, mlp, lens)?;
            }
        }
        if !mlp_first {
            residual_mlp(tp, acts, stream, &self.ln2, &self.mlp, lens)?;
        }
        Ok(())
    }

    /// The replicated parameters this block applies to sequence shards under sequence
    /// parallelism (norms, the row-parallel layers' biases, the gate): each rank's
    /// gradient of them covers its shard only and must be summed over the TP group.
    fn sequence_region_params(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        let ln = |out: &mut Vec<Tensor>, l: &LayerNorm| {
            out.push(l.weight.shallow_clone());
            out.push(l.bias.shallow_clone());
        };
        let bias = |out: &mut Vec<Tensor>, l: &Linear| {
            out.extend(l.bias.iter().map(|b| b.shallow_clone()))
        };
        ln(&mut out, &self.ln1);
        bias(&mut out, &self.attn.o);
        ln(&mut out, &self.ln2);
        bias(&mut out, &self.mlp.fc2);
        if let Some(c) = &self.cross {
            ln(&mut out, &c.ln);
            if let Some(l) = &c.ln_kv {
                ln(&mut out, l);
            }
            bias(&mut out, &c.attn.o);
            out.extend(c.gate.iter().map(|g| g.shallow_clone()));
            if let Some((l, m)) = &c.mlp {
                ln(&mut out, l);
                bias(&mut out, &m.fc2);
            }
        }
        out
    }
}

fn stream_of(acts: &Acts, stream: Stream) -> Result<Tensor> {
    match stream {
        Stream::Image => Acts::take(&acts.image, "image"),
        Stream::Text => Acts::take(&acts.text, "text"),
    }
}

fn set_stream(acts: &mut Acts, stream: Stream, t: Tensor) {
    match stream {
        Stream::Image => acts.image = Some(t),
        Stream::Text => acts.text = Some(t),
    }
}

/// `x + mlp(ln(x))` on a stream.
fn residual_mlp(
    tp: &mut dyn TensorParallel,
    acts: &mut Acts,
    stream: Stream,
    ln: &LayerNorm,
    mlp: &Mlp,
    lens: Lens,
) -> Result<()> {
    let h = ln.forward(&stream_of(acts, stream)?)?;
    let y = if tp.sequence_parallel() {
        let h = seq_enter(tp, acts, &[(&h, lens.stream)])?.remove(0);
        mlp.forward_out(tp, &mut acts.present_mut(), &h, Out::Scatter)?
    } else {
        let h = enter(tp, acts, &[&h])?.remove(0);
        mlp.forward(tp, &h)?
    };
    let x = stream_of(acts, stream)?.f_add(&y)?;
    set_stream(acts, stream, x);
    Ok(())
}

/// `f` over `inputs`, with every present activation as a live tensor.
fn enter(tp: &mut dyn TensorParallel, acts: &mut Acts, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    let mut live = acts.present_mut();
    tp.enter(&mut live, inputs).map_err(map_tp)
}

/// Sequence parallelism's `f` over `inputs` (shards and their true lengths), with every
/// present activation as a live tensor.
fn seq_enter(
    tp: &mut dyn TensorParallel,
    acts: &mut Acts,
    inputs: &[(&Tensor, i64)],
) -> Result<Vec<Tensor>> {
    let mut live = acts.present_mut();
    tp.seq_enter(&mut live, inputs).map_err(map_tp)
}

/// This rank's sequence shard of `full` (the same on every rank), with every present
/// activation as a live tensor (`full` itself must not be one of them).
fn seq_shard(tp: &mut dyn TensorParallel, acts: &mut Acts, full: &Tensor) -> Result<Tensor> {
    let mut live = acts.present_mut();
    tp.seq_shard(&mut live, full).map_err(map_tp)
}

/// The whole sequence of `t` (of true length `len`) when it is a sequence shard, else `t`.
fn unshard(tp: &mut dyn TensorParallel, t: Tensor, len: i64) -> Result<Tensor> {
    if tp.sequence_parallel() {
        tp.seq_unshard(&t, len).map_err(map_tp)
    } else {
        Ok(t)
    }
}

#[derive(Debug)]
struct VisionEmbed {
    patch: Linear,
    /// Prepended to the patches (`vision_class_token`).
    class_token: Option<Tensor>,
    pos: Tensor,
    /// open_clip's `ln_pre`.
    ln_pre: Option<LayerNorm>,
}

/// open_clip's `AttentionalPooler`: learned queries (normed) attending to the normed image
/// tokens, heads split over the tensor-parallel group like any attention.
#[derive(Debug)]
struct AttnPool {
    query: Tensor,
    ln_q: LayerNorm,
    ln_k: LayerNorm,
    attn: Attention,
}

impl AttnPool {
    fn forward(&self, tp: &mut dyn TensorParallel, acts: &mut Acts, x: &Tensor) -> Result<Tensor> {
        let b = x.size()[0];
        let k = self.ln_k.forward(x)?;
        let q = self.ln_q.forward(&self.query)?;
        let s = q.size();
        let q = q.f_unsqueeze(0)?.f_expand([b, s[0], s[1]], false)?;
        let mut qk = enter(tp, acts, &[&q, &k])?;
        let k = qk.remove(1);
        let q = qk.remove(0);
        self.attn.forward(tp, acts, &q, &k, Mask::None, Out::Sum)
    }
}

/// A final norm and the projection into the contrastive embedding space.
#[derive(Debug)]
struct Pooler {
    ln: LayerNorm,
    /// `prefix.proj` `[e, d]` and `prefix.proj_bias` `[e]`, as a replicated linear layer.
    proj: Linear,
}

impl Pooler {
    /// `prefix.<ln_name>` and `prefix.proj` `[e, d]` (normal, std d^-1/2), and with `bias`
    /// `prefix.proj_bias` `[e]` (zeros).
    fn new(
        b: &mut Builder<'_>,
        ln_name: &str,
        d: i64,
        e: i64,
        eps: f64,
        bias: bool,
    ) -> Result<Pooler> {
        let ln = LayerNorm::new(&mut b.sub(ln_name), d, eps)?;
        let weight = b.param(
            "proj",
            &[e, d],
            Shard::FULL,
            Init::Normal((d as f64).powf(-0.5)),
            true,
        )?;
        let bias = if bias {
            Some(b.param("proj_bias", &[e], Shard::FULL, Init::Zeros, false)?)
        } else {
            None
        };
        Ok(Pooler {
            ln,
            proj: Linear {
                name: b.name("proj"),
                weight,
                bias,
                split: Split::Replicated,
                quant: None,
                observer: None,
                lora: None,
            },
        })
    }

    /// `x Pᵀ (+ b)` of already normed states.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward_local(x)
    }
}

/// The image encoder's head: optional attentional pooler, final norm, projection.
#[derive(Debug)]
struct VisionHead {
    attn_pool: Option<AttnPool>,
    pooler: Pooler,
}

#[derive(Debug)]
struct TextEmbed {
    tok: Tensor,
    /// Appended after the text (`text_pool = "class_token"`).
    class_token: Option<Tensor>,
    pos: Tensor,
}

#[derive(Debug)]
struct Heads {
    /// The decoder's final norm and the (vocab-parallel) LM head; none without multimodal
    /// layers.
    decoder: Option<(LayerNorm, Linear)>,
    itm: Option<Linear>,
    logit_scale: Tensor,
}

/// The contrastive batch of one micro-batch when its negatives reach beyond it
/// (`train.contrastive = "global"`, see the worker's `contrastive` module): the embeddings
/// of every sample of the global batch, in the global batch's order, where the
/// micro-batch's own rows (of every data-parallel rank) carry their graph and the others
/// are values.
#[derive(Debug)]
pub struct GlobalEmbeddings {
    /// Normalised image embeddings `[N, E]` (f32).
    pub image: Tensor,
    /// Normalised text embeddings `[N, E]` (f32).
    pub text: Tensor,
    /// `(first row, rows)` whose loss this rank computes: all `N` (every rank computes the
    /// whole loss), or the rank's own samples (open_clip's `local_loss`).
    pub rows: (i64, i64),
    /// Whether the temperature's gradient is taken in this pass (once per step: the passes
    /// of one step all compute the same loss).
    pub scale_grad: bool,
}

/// The layer kinds, in model order (from `weaver-config`).
pub use weaver_config::layers::LayerKind;

/// The model's layers `layers` (all of them for a single process), this process's
/// tensor-parallel part.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    layers: Range<usize>,
    pad_id: i64,
    vision_embed: Option<VisionEmbed>,
    vision_head: Option<VisionHead>,
    text_embed: Option<TextEmbed>,
    text_pool: Option<Pooler>,
    fusion_in: Option<Linear>,
    heads: Option<Heads>,
    blocks: Vec<Block>,
    /// Whether [`Model::losses_with`] returns its caption logits
    /// ([`Losses::caption_logits`], for distillation; off: they are not kept).
    keep_caption_logits: bool,
}

impl Model {
    /// Makes [`Model::losses_with`] return the caption logits it scored
    /// ([`Losses::caption_logits`]): a distillation student's last layer.
    pub fn keep_caption_logits(&mut self) {
        self.keep_caption_logits = true;
    }

    /// Number of cuttable layers ([`ModelConfig::num_layers`]).
    pub fn num_layers(cfg: &ModelConfig) -> usize {
        cfg.num_layers()
    }

    /// The kind of layer `i` ([`ModelConfig::layer_kind`]).
    pub fn layer_kind(cfg: &ModelConfig, i: usize) -> LayerKind {
        cfg.layer_kind(i)
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
        cfg.boundary(layer, mbs, itm)
            .into_iter()
            .map(|(f, shape, f32)| (f, shape, if f32 { Kind::Float } else { kind }))
            .collect()
    }

    /// [`Model::boundary_layout`] for a micro-batch with `extra` groups of objective rows
    /// ([`Batch::extra_rows`]).
    pub fn boundary_layout_rows(
        cfg: &ModelConfig,
        layer: usize,
        mbs: usize,
        itm: bool,
        extra: usize,
        kind: Kind,
    ) -> Vec<(ActField, Vec<i64>, Kind)> {
        cfg.boundary_rows(layer, mbs, itm, extra)
            .into_iter()
            .map(|(f, shape, f32)| (f, shape, if f32 { Kind::Float } else { kind }))
            .collect()
    }

    /// [`Model::boundary_layout_rows`] under sequence parallelism over `tp` ranks (the
    /// streams cross as sequence shards: [`ModelConfig::boundary_rows_split`]).
    pub fn boundary_layout_split(
        cfg: &ModelConfig,
        layer: usize,
        mbs: usize,
        itm: bool,
        extra: usize,
        kind: Kind,
        tp: usize,
    ) -> Vec<(ActField, Vec<i64>, Kind)> {
        cfg.boundary_rows_split(layer, mbs, itm, extra, tp)
            .into_iter()
            .map(|(f, shape, f32)| (f, shape, if f32 { Kind::Float } else { kind }))
            .collect()
    }

    /// Relative forward cost of each layer ([`ModelConfig::layer_costs`]).
    pub fn layer_costs(cfg: &ModelConfig, itm: bool, vision_cost: f64) -> Vec<f64> {
        cfg.layer_costs(itm, vision_cost)
    }

    /// What a parallel layout must divide ([`ModelConfig::limits`]).
    pub fn limits(cfg: &ModelConfig) -> weaver_parallel::mesh::ModelLimits {
        cfg.limits()
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
        let act = cfg.activation;
        let vision_heads = HeadSpec {
            heads: cfg.vision_heads as i64,
            head_dim: cfg.vision_head_size() as i64,
        };
        let text_heads = HeadSpec {
            heads: cfg.text_heads as i64,
            head_dim: cfg.text_head_size() as i64,
        };
        let mut root = store.root();
        let has = |i: usize| layers.contains(&i);

        let vision_embed = if has(0) {
            let mut b = root.sub("vision");
            let patch = Linear::new(
                &mut b.sub("patch_embed"),
                cfg.patch_dim() as i64,
                dv,
                cfg.patch_bias,
                0.02,
                Split::Replicated,
                tp,
            )?;
            let class_token = if cfg.vision_class_token {
                Some(b.param(
                    "class_token",
                    &[dv],
                    Shard::FULL,
                    Init::Normal((dv as f64).powf(-0.5)),
                    false,
                )?)
            } else {
                None
            };
            let pos = b.param(
                "pos",
                &[cfg.vision_seq_len() as i64, dv],
                Shard::FULL,
                Init::Normal(0.01),
                false,
            )?;
            let ln_pre = if cfg.vision_ln_pre {
                Some(LayerNorm::new(&mut b.sub("ln_pre"), dv, eps)?)
            } else {
                None
            };
            Some(VisionEmbed {
                patch,
                class_token,
                pos,
                ln_pre,
            })
        } else {
            None
        };
        let text_embed = if has(lv) {
            let mut b = root.sub("text");
            let tok = b.param(
                "tok_embed.weight",
                &[cfg.vocab_size as i64, dt],
                tp.shard(0),
                Init::Normal(0.02),
                true,
            )?;
            let class_token = if cfg.text_pool == TextPool::ClassToken {
                Some(b.param("class_token", &[dt], Shard::FULL, Init::Normal(0.01), false)?)
            } else {
                None
            };
            let pos = b.param(
                "pos",
                &[cfg.text_seq_len() as i64, dt],
                Shard::FULL,
                Init::Normal(0.01),
                false,
            )?;
            Some(TextEmbed {
                tok,
                class_token,
                pos,
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
                    vision_heads,
                    ratio,
                    lv as i64,
                    None,
                    eps,
                    act,
                    tp,
                )?,
                LayerKind::Unimodal => Block::new(
                    &mut root.sub("text").sub("unimodal").sub(i - lv),
                    dt,
                    text_heads,
                    ratio,
                    (lu + cfg.multimodal_layers) as i64,
                    None,
                    eps,
                    act,
                    tp,
                )?,
                LayerKind::Multimodal => {
                    let dkv = cfg.memory_width() as i64;
                    let spec = |gated| CrossSpec {
                        dkv,
                        gated,
                        layout: cfg.multimodal_block,
                    };
                    let cross = match cfg.fusion {
                        Fusion::CrossAttention => Some(spec(false)),
                        Fusion::GatedCrossAttention => Some(spec(true)),
                        Fusion::Prefix => None,
                    };
                    if i == first_mm && cfg.fusion == Fusion::Prefix {
                        fusion_in = Some(Linear::new(
                            &mut root.sub("fusion").sub("image_proj"),
                            dkv,
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
                        text_heads,
                        ratio,
                        (lu + cfg.multimodal_layers) as i64,
                        cross,
                        eps,
                        act,
                        tp,
                    )?
                }
            };
            blocks.push(block);
            if i + 1 == lv {
                let mut b = root.sub("vision");
                let attn_pool = if cfg.vision_pool == VisionPool::Attentional {
                    let mut p = b.sub("attn_pool");
                    let query = p.param(
                        "query",
                        &[cfg.attn_pool_queries as i64, e],
                        Shard::FULL,
                        Init::Normal((e as f64).powf(-0.5)),
                        false,
                    )?;
                    let ln_q = LayerNorm::new(&mut p.sub("ln_q"), e, eps)?;
                    let ln_k = LayerNorm::new(&mut p.sub("ln_k"), dv, eps)?;
                    let attn = Attention::new(
                        &mut p.sub("attn"),
                        e,
                        dv,
                        HeadSpec {
                            heads: cfg.attn_pool_heads as i64,
                            head_dim: cfg.attn_pool_head_size() as i64,
                        },
                        0.02,
                        tp,
                    )?;
                    Some(AttnPool {
                        query,
                        ln_q,
                        ln_k,
                        attn,
                    })
                } else {
                    None
                };
                let pool_dim = if attn_pool.is_some() { e } else { dv };
                vision_head = Some(VisionHead {
                    attn_pool,
                    pooler: Pooler::new(&mut b, "ln_post", pool_dim, e, eps, false)?,
                });
            }
            if i + 1 == first_mm {
                text_pool = Some(Pooler::new(
                    &mut root.sub("text"),
                    "ln_pool",
                    dt,
                    e,
                    eps,
                    cfg.text_proj_bias,
                )?);
            }
            if i + 1 == n {
                let mut b = root.sub("head");
                let decoder = if cfg.multimodal_layers > 0 {
                    Some((
                        LayerNorm::new(&mut b.sub("ln"), dt, eps)?,
                        Linear::new(
                            &mut b.sub("lm"),
                            dt,
                            cfg.vocab_size as i64,
                            false,
                            0.02,
                            Split::Column,
                            tp,
                        )?,
                    ))
                } else {
                    None
                };
                let itm = if cfg.itm_head && cfg.multimodal_layers > 0 {
                    Some(Linear::new(
                        &mut b.sub("itm"),
                        dt,
                        2,
                        true,
                        0.02,
                        Split::Replicated,
                        tp,
                    )?)
                } else {
                    None
                };
                heads = Some(Heads {
                    decoder,
                    itm,
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
            keep_caption_logits: false,
        })
    }

    /// Calls `f` on every linear layer this model holds (attention and MLP projections,
    /// the patch embedding, the poolers' projections, the fusion projection, the heads), in
    /// model order: what quantization and calibration rewrite.
    pub fn for_each_linear(&mut self, f: &mut dyn FnMut(&mut Linear) -> Result<()>) -> Result<()> {
        if let Some(e) = &mut self.vision_embed {
            f(&mut e.patch)?;
        }
        let lv = self.cfg.vision_layers;
        let first_mm = lv + self.cfg.unimodal_layers;
        for (block, i) in self.blocks.iter_mut().zip(self.layers.clone()) {
            if i == first_mm {
                if let Some(p) = &mut self.fusion_in {
                    f(p)?;
                }
            }
            let a = &mut block.attn;
            for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                f(l)?;
            }
            if let Some(c) = &mut block.cross {
                let a = &mut c.attn;
                for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                    f(l)?;
                }
                if let Some((_, m)) = &mut c.mlp {
                    f(&mut m.fc1)?;
                    f(&mut m.fc2)?;
                }
            }
            f(&mut block.mlp.fc1)?;
            f(&mut block.mlp.fc2)?;
            if i + 1 == lv {
                if let Some(h) = &mut self.vision_head {
                    if let Some(p) = &mut h.attn_pool {
                        let a = &mut p.attn;
                        for l in [&mut a.q, &mut a.k, &mut a.v, &mut a.o] {
                            f(l)?;
                        }
                    }
                    f(&mut h.pooler.proj)?;
                }
            }
            if i + 1 == first_mm {
                if let Some(p) = &mut self.text_pool {
                    f(&mut p.proj)?;
                }
            }
        }
        if let Some(h) = &mut self.heads {
            if let Some((_, lm)) = &mut h.decoder {
                f(lm)?;
            }
            if let Some(itm) = &mut h.itm {
                f(itm)?;
            }
        }
        Ok(())
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

    /// Normalised image embeddings `[B, E]` of `images` `[B, 3, H, W]` (single process:
    /// runs the image encoder only).
    pub fn image_embeddings(&self, images: &Tensor) -> Result<Tensor> {
        let b = images.size()[0];
        let batch = Batch {
            images: images.shallow_clone(),
            tokens: Tensor::f_zeros([b, 1], (Kind::Int64, images.device()))?,
            eos: Tensor::f_zeros([b], (Kind::Int64, images.device()))?,
            indices: vec![0; b as usize],
            mlm: None,
            vqa: None,
        };
        let mut acts = Acts::default();
        let end = self.cfg.vision_layers;
        self.forward_until(
            &mut weaver_parallel::tp::NoTp,
            &mut acts,
            &batch,
            false,
            end,
        )?;
        Acts::take(&acts.image_emb, "image_emb")
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
        let extra = batch.extra_rows();
        let text_mask = if (cfg.text_pad_mask != PadMask::None || extra > 0)
            && self.layers.start < first_mm
            && end > lv
        {
            Some(self.unimodal_mask(batch)?)
        } else {
            None
        };
        let sp = tp.sequence_parallel();
        for (block, i) in self.blocks.iter().zip(self.layers.start..end) {
            if i == 0 {
                self.embed_images(acts, &batch.images)?;
                if sp {
                    // The image tokens enter the split region as this rank's shard.
                    let x = Acts::take(&acts.image, "image")?;
                    acts.image = None;
                    acts.image = Some(seq_shard(tp, acts, &x)?);
                }
            }
            if i == lv {
                let e = self
                    .text_embed
                    .as_ref()
                    .ok_or_else(|| missing("text.tok_embed"))?;
                let tokens = self.text_rows(batch)?;
                let mut x = self.embed_tokens(tp, &e.tok, &tokens)?;
                if let Some(c) = &e.class_token {
                    let b = x.size()[0];
                    let c = c.f_view([1, 1, -1])?.f_expand([b, 1, -1], false)?;
                    x = Tensor::f_cat(&[&x, &c], 1)?;
                }
                // A trimmed batch ([`Batch::trim_text`]) uses the first positions.
                let pos = e.pos.f_narrow(0, 0, x.size()[1])?;
                let x = x.f_add(&pos)?;
                acts.text = Some(if sp { seq_shard(tp, acts, &x)? } else { x });
            }
            if i == first_mm {
                self.enter_multimodal(tp, acts, batch, itm)?;
            }
            let (stream, mask_t);
            let mask = match Model::layer_kind(cfg, i) {
                LayerKind::Vision => {
                    stream = Stream::Image;
                    Mask::None
                }
                LayerKind::Unimodal => {
                    stream = Stream::Text;
                    match &text_mask {
                        Some(m) => Mask::Explicit(m),
                        None => Mask::Causal,
                    }
                }
                LayerKind::Multimodal => {
                    stream = Stream::Text;
                    if extra > 0 {
                        mask_t = self.multimodal_mask(acts, batch, itm)?;
                        Mask::Explicit(&mask_t)
                    } else if cfg.fusion == Fusion::Prefix {
                        mask_t = self.prefix_mask(acts, batch)?;
                        Mask::Explicit(&mask_t)
                    } else {
                        Mask::Causal
                    }
                }
            };
            let mut lens = self.lens(i, batch);
            if Model::layer_kind(cfg, i) == LayerKind::Multimodal
                && itm
                && extra == 0
                && cfg.fusion != Fusion::Prefix
            {
                // `enter_multimodal` doubled the text for the negatives, not the memory.
                lens.rolled_memory = Some(batch.len() as i64);
            }
            block.forward(tp, acts, stream, mask, lens)?;
            if i + 1 == lv {
                self.pool_images(tp, acts)?;
            }
            if i + 1 == first_mm {
                self.pool_text(tp, acts, batch)?;
            }
        }
        Ok(())
    }

    /// The true sequence lengths of layer `i`'s stream for `batch` and of the memory (what
    /// the sequence-parallel gathers cut their padding at; see
    /// [`weaver_parallel::tp::SeqShard`]).
    fn lens(&self, i: usize, batch: &Batch) -> Lens {
        let cfg = &self.cfg;
        let stream = match Model::layer_kind(cfg, i) {
            LayerKind::Vision => cfg.vision_seq_len(),
            LayerKind::Unimodal => self.text_seq_len(batch),
            LayerKind::Multimodal => self.multimodal_text_len(batch),
        };
        Lens {
            stream: stream as i64,
            memory: cfg.memory_len() as i64,
            rolled_memory: None,
        }
    }

    /// The text length of `batch`'s rows: its tokens' columns, `model.max_text_len` or
    /// fewer when the trainer trimmed the padding after the batch's last token
    /// ([`Batch::trim_text`]).
    fn text_len(batch: &Batch) -> usize {
        batch.tokens.size()[1] as usize
    }

    /// The text stream's length in the unimodal layers for `batch`: its tokens and the
    /// class token, if any (`ModelConfig::text_seq_len` for an untrimmed batch).
    fn text_seq_len(&self, batch: &Batch) -> usize {
        Model::text_len(batch) + usize::from(self.cfg.text_pool == TextPool::ClassToken)
    }

    /// The text stream's length in the multimodal layers for `batch` (the image tokens
    /// first, with prefix fusion).
    fn multimodal_text_len(&self, batch: &Batch) -> usize {
        match self.cfg.fusion {
            Fusion::Prefix => self.cfg.memory_len() + Model::text_len(batch),
            _ => Model::text_len(batch),
        }
    }

    /// The replicated parameters this model applies to sequence shards under sequence
    /// parallelism (its blocks' norms, row-parallel biases and gates): their gradients
    /// must be summed over the TP group (the trainer's `GradSync` does it once per step).
    /// Shallow copies of the parameter tensors.
    pub fn sequence_region_params(&self) -> Vec<Tensor> {
        self.blocks
            .iter()
            .flat_map(|b| b.sequence_region_params())
            .collect()
    }

    /// Patch embedding, class token, positions, `ln_pre`: the image stream of layer 0.
    fn embed_images(&self, acts: &mut Acts, images: &Tensor) -> Result<()> {
        let e = self
            .vision_embed
            .as_ref()
            .ok_or_else(|| missing("vision.patch_embed"))?;
        let patches = self.patchify(&images.f_to_kind(self.param_kind())?)?;
        let mut x = e.patch.forward_local(&patches)?;
        if let Some(c) = &e.class_token {
            let b = x.size()[0];
            let c = c.f_view([1, 1, -1])?.f_expand([b, 1, -1], false)?;
            x = Tensor::f_cat(&[&c, &x], 1)?;
        }
        let mut x = x.f_add(&e.pos)?;
        if let Some(ln) = &e.ln_pre {
            x = ln.forward(&x)?;
        }
        acts.image = Some(x);
        Ok(())
    }

    /// After the last image block: the image embedding and the decoder's memory.
    fn pool_images(&self, tp: &mut dyn TensorParallel, acts: &mut Acts) -> Result<()> {
        let h = self
            .vision_head
            .as_ref()
            .ok_or_else(|| missing("vision.ln_post"))?;
        let x = Acts::take(&acts.image, "image")?;
        let x = unshard(tp, x, self.cfg.vision_seq_len() as i64)?;
        let (pooled, memory) = match (&h.attn_pool, self.cfg.vision_pool) {
            (Some(pool), _) => {
                // open_clip's CoCa: pool, then norm; query 0 is the embedding.
                let y = pool.forward(tp, acts, &x)?;
                let y = h.pooler.ln.forward(&y)?;
                let q = y.size()[1];
                (y.f_select(1, 0)?, y.f_narrow(1, 1, q - 1)?)
            }
            (None, VisionPool::ClassToken) => {
                let y = h.pooler.ln.forward(&x)?;
                let s = y.size()[1];
                (y.f_select(1, 0)?, y.f_narrow(1, 1, s - 1)?)
            }
            (None, _) => {
                let y = h.pooler.ln.forward(&x)?;
                let tokens = if self.cfg.vision_class_token {
                    let s = y.size()[1];
                    y.f_narrow(1, 1, s - 1)?
                } else {
                    y
                };
                (tokens.f_mean_dim(1, false, tokens.kind())?, tokens)
            }
        };
        acts.image_emb = Some(normalize(&h.pooler.project(&pooled)?)?);
        // A model without multimodal layers has no use for the memory.
        acts.image = None;
        if self.cfg.multimodal_layers > 0 {
            acts.image = Some(if tp.sequence_parallel() {
                seq_shard(tp, acts, &memory)?
            } else {
                memory
            });
        }
        Ok(())
    }

    /// After the last unimodal block: the text embedding; the class token, if any, leaves
    /// the text stream.
    fn pool_text(&self, tp: &mut dyn TensorParallel, acts: &mut Acts, batch: &Batch) -> Result<()> {
        let p = self
            .text_pool
            .as_ref()
            .ok_or_else(|| missing("text.ln_pool"))?;
        let sp = tp.sequence_parallel();
        let x = unshard(
            tp,
            Acts::take(&acts.text, "text")?,
            self.text_seq_len(batch) as i64,
        )?;
        // The objectives' extra rows (MLM, VQA) follow the captions and are not pooled.
        let x_all = x.shallow_clone();
        let x = if batch.extra_rows() > 0 {
            x.f_narrow(0, 0, batch.len() as i64)?
        } else {
            x
        };
        let pooled = match self.cfg.text_pool {
            TextPool::Eos => gather_rows(&x, &batch.eos)?,
            TextPool::Argmax => gather_rows(&x, &batch.tokens.f_argmax(-1, false)?)?,
            TextPool::ClassToken => {
                let s = x.size()[1];
                acts.text = Some(x_all.f_narrow(1, 0, s - 1)?);
                x.f_select(1, s - 1)?
            }
        };
        let h = p.ln.forward(&pooled)?;
        acts.text_emb = Some(normalize(&p.project(&h)?)?);
        if sp && self.cfg.text_pool == TextPool::ClassToken {
            // The stream without its class token, split again (without it, the stream's
            // shards are those it came with).
            let rest = Acts::take(&acts.text, "text")?;
            acts.text = None;
            acts.text = Some(seq_shard(tp, acts, &rest)?);
        }
        Ok(())
    }

    /// The unimodal layers' mask `[B, 1, S, S]` (`true` = may attend): causal, and padding
    /// keys masked as `text_pad_mask` says.
    fn text_mask(&self, tokens: &Tensor) -> Result<Tensor> {
        let dev = tokens.device();
        let b = tokens.size()[0];
        let cls = self.cfg.text_pool == TextPool::ClassToken;
        let s = tokens.size()[1] + i64::from(cls);
        let valid = tokens.f_ne(self.pad_id)?;
        let ones = Tensor::f_ones([b, 1], (Kind::Bool, dev))?;
        let valid = match (self.cfg.text_pad_mask, cls) {
            // open_clip: `cat([cls_valid, valid])` although the class token comes last.
            (PadMask::OpenClipLegacy, _) => Tensor::f_cat(&[&ones, &valid], 1)?,
            (_, true) => Tensor::f_cat(&[&valid, &ones], 1)?,
            (_, false) => valid,
        };
        let causal = Tensor::f_ones([s, s], (Kind::Bool, dev))?.f_tril(0)?;
        Ok(causal
            .f_unsqueeze(0)?
            .f_logical_and(&valid.f_unsqueeze(1)?)?
            .f_unsqueeze(1)?)
    }

    /// The token rows the text embedding reads: the captions, then the objectives' rows.
    fn text_rows(&self, batch: &Batch) -> Result<Tensor> {
        if batch.extra_rows() == 0 {
            return Ok(batch.tokens.shallow_clone());
        }
        let mut rows = vec![batch.tokens.shallow_clone()];
        rows.extend(batch.mlm.iter().map(|r| r.input.shallow_clone()));
        rows.extend(batch.vqa.iter().map(|r| r.input.shallow_clone()));
        Ok(Tensor::f_cat(&rows, 0)?)
    }

    /// The mask of the rows of a causal group `[B, 1, S, S]` in the unimodal layers.
    fn causal_rows_mask(&self, tokens: &Tensor) -> Result<Tensor> {
        if self.cfg.text_pad_mask != PadMask::None {
            return self.text_mask(tokens);
        }
        let s = tokens.size()[1] + i64::from(self.cfg.text_pool == TextPool::ClassToken);
        let b = tokens.size()[0];
        Ok(Tensor::f_ones([s, s], (Kind::Bool, tokens.device()))?
            .f_tril(0)?
            .f_expand([b, 1, s, s], false)?)
    }

    /// Bidirectional attention over `tokens`' non-padding keys (and the text class token,
    /// if any), `[B, 1, S, S]`: the MLM rows' mask in the unimodal layers.
    fn bidirectional_mask(&self, tokens: &Tensor) -> Result<Tensor> {
        let s = tokens.size()[1] + i64::from(self.cfg.text_pool == TextPool::ClassToken);
        let b = tokens.size()[0];
        let mut valid = tokens.f_ne(self.pad_id)?;
        if self.cfg.text_pool == TextPool::ClassToken {
            let ones = Tensor::f_ones([b, 1], (Kind::Bool, tokens.device()))?;
            valid = Tensor::f_cat(&[&valid, &ones], 1)?;
        }
        Ok(valid.f_view([b, 1, 1, s])?.f_expand([b, 1, s, s], false)?)
    }

    /// The unimodal layers' mask of every text row: [`Model::text_mask`] for the captions
    /// alone; with objective rows `[B_rows, 1, S, S]`, causal for captions and VQA rows,
    /// bidirectional for MLM rows.
    fn unimodal_mask(&self, batch: &Batch) -> Result<Tensor> {
        if batch.extra_rows() == 0 {
            return self.text_mask(&batch.tokens);
        }
        let mut parts = vec![self.causal_rows_mask(&batch.tokens)?];
        if batch.mlm.is_some() {
            parts.push(self.bidirectional_mask(&batch.tokens)?);
        }
        if let Some(v) = &batch.vqa {
            parts.push(self.causal_rows_mask(&v.input)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// The multimodal layers' mask of every row with objective rows, `[rows, 1, L, L]`:
    /// the captions' (causal, or prefix-LM with prefix fusion) for captions, matching
    /// negatives and VQA rows; bidirectional over the text's non-padding keys (and every
    /// image token, with prefix fusion) for MLM rows.
    fn multimodal_mask(&self, acts: &Acts, batch: &Batch, itm: bool) -> Result<Tensor> {
        let b = batch.len() as i64;
        let dev = batch.tokens.device();
        let t = Model::text_len(batch) as i64;
        let (causal, n) = if self.cfg.fusion == Fusion::Prefix {
            (self.prefix_mask(acts, batch)?, self.cfg.memory_len() as i64)
        } else {
            (Tensor::f_ones([t, t], (Kind::Bool, dev))?.f_tril(0)?, 0)
        };
        let l = n + t;
        let causal_rows = |rows: i64| causal.f_expand([rows, 1, l, l], false);
        let mut parts = vec![causal_rows(if itm { 2 * b } else { b })?];
        if batch.mlm.is_some() {
            let valid = Tensor::f_cat(
                &[
                    &Tensor::f_ones([b, n], (Kind::Bool, dev))?,
                    &batch.tokens.f_ne(self.pad_id)?,
                ],
                1,
            )?;
            // Image rows (prefix fusion) see the image tokens only, text rows every valid key.
            let rows = Tensor::f_arange(l, (Kind::Int64, dev))?;
            let text_row = rows.f_ge(n)?.f_view([1, l, 1])?;
            let image_col = rows.f_lt(n)?.f_view([1, 1, l])?;
            let m = image_col.f_logical_or(&text_row.f_logical_and(&valid.f_unsqueeze(1)?)?)?;
            parts.push(m.f_unsqueeze(1)?);
        }
        if batch.vqa.is_some() {
            parts.push(causal_rows(b)?);
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// Whether the greedy answer of each VQA row is exactly its answer `[B]` (1.0 or 0.0,
    /// f32), from the last layer's activations of a forward (matching negatives `itm`):
    /// the argmax at every answer position (and the one before EOS) is the next answer
    /// token, which is when greedy decoding after the question writes the answer and stops
    /// (see [`crate::objectives`]). The argmax is taken over the whole vocabulary across the
    /// tensor-parallel group. Collective over it.
    pub fn vqa_correct(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &Acts,
        batch: &Batch,
        itm: bool,
    ) -> Result<Tensor> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let (ln, lm) = heads
            .decoder
            .as_ref()
            .ok_or_else(|| missing("head.lm (a model without multimodal layers)"))?;
        let rows = batch.vqa.as_ref().ok_or_else(|| {
            ModelError::Data("VQA accuracy asked of a batch without VQA rows".into())
        })?;
        let b = batch.len() as i64;
        let offset = b * (1 + i64::from(itm) + i64::from(batch.mlm.is_some()));
        let mut text = unshard(
            tp,
            Acts::take(&acts.text, "text")?,
            self.multimodal_text_len(batch) as i64,
        )?;
        if self.cfg.fusion == Fusion::Prefix {
            let n = self.cfg.memory_len() as i64;
            let total = text.size()[1];
            text = text.f_narrow(1, n, total - n)?;
        }
        let h = ln.forward(&text.f_narrow(0, offset, b)?)?;
        let logits = lm.forward_local(&h)?.f_to_kind(Kind::Float)?.f_detach()?;
        let v = logits.size()[2];
        let tgt = &rows.targets;
        let pos = tp.pos();
        let lo = pos.rank as i64 * v;
        let inside = tgt.f_ge(lo)?.f_logical_and(&tgt.f_lt(lo + v)?)?;
        let local = (tgt - lo).f_where_self(&inside, &tgt.f_zeros_like()?)?;
        let picked = logits
            .f_gather(2, &local.f_unsqueeze(2)?, false)?
            .f_squeeze_dim(2)?
            .f_mul(&inside.f_to_kind(Kind::Float)?)?;
        let (target_logit, max) = if pos.size == 1 {
            (picked, logits.f_amax([2], false)?)
        } else {
            (
                tp.reduce_sum(&picked).map_err(map_tp)?,
                tp.max_no_grad(&logits.f_amax([2], false)?)
                    .map_err(map_tp)?,
            )
        };
        let hit = target_logit.f_ge_tensor(&max)?;
        let scored = tgt.f_ne(self.pad_id)?;
        let wrong = scored.f_logical_and(&hit.f_logical_not()?)?;
        Ok(wrong
            .f_any_dim(1, false)?
            .f_logical_not()?
            .f_to_kind(Kind::Float)?)
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
    ///
    /// With sequence parallelism the rows are arranged on the shards (every step here is
    /// along the batch), except for prefix fusion, which gathers both sequences, joins them
    /// and splits the joined one.
    fn enter_multimodal(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        batch: &Batch,
        itm: bool,
    ) -> Result<()> {
        let mut image = Acts::take(&acts.image, "image")?;
        let mut text = Acts::take(&acts.text, "text")?;
        let prefix = self.cfg.fusion == Fusion::Prefix;
        if prefix {
            image = unshard(tp, image, self.cfg.memory_len() as i64)?;
            text = unshard(tp, text, Model::text_len(batch) as i64)?;
        }
        let extra = batch.extra_rows();
        if extra > 0 {
            // `[captions | MLM | VQA]` becomes `[captions | negatives | MLM | VQA]`, each
            // extra row attending to its own sample's image.
            let b = batch.len() as i64;
            let rows = text.size()[0];
            let captions = text.f_narrow(0, 0, b)?;
            let others = text.f_narrow(0, b, rows - b)?;
            let mut texts = vec![captions.shallow_clone()];
            let mut images = vec![image.shallow_clone()];
            if itm {
                texts.push(captions);
                images.push(image.f_roll([-1], [0])?);
            }
            texts.push(others);
            for _ in 0..extra {
                images.push(image.shallow_clone());
            }
            image = Tensor::f_cat(&images, 0)?;
            text = Tensor::f_cat(&texts, 0)?;
        } else if itm {
            // Cross-attention pairs each negative caption with the next image itself
            // (`Lens::rolled_memory`): only the prefix needs the images doubled.
            if prefix {
                let negatives = image.f_roll([-1], [0])?;
                image = Tensor::f_cat(&[&image, &negatives], 0)?;
            }
            text = Tensor::f_cat(&[&text, &text], 0)?;
        }
        if self.cfg.fusion == Fusion::Prefix {
            let proj = self
                .fusion_in
                .as_ref()
                .ok_or_else(|| missing("fusion.image_proj"))?;
            let prefix = proj.forward_local(&image)?;
            acts.image = None;
            acts.text = None;
            let joined = Tensor::f_cat(&[&prefix, &text], 1)?;
            acts.text = Some(if tp.sequence_parallel() {
                seq_shard(tp, acts, &joined)?
            } else {
                joined
            });
            return Ok(());
        }
        acts.image = Some(image);
        acts.text = Some(text);
        Ok(())
    }

    /// Prefix-LM mask over `[N image; T text]`: image tokens see each other, text sees
    /// every image token and earlier text (`true` = may attend).
    fn prefix_mask(&self, acts: &Acts, batch: &Batch) -> Result<Tensor> {
        let n = self.cfg.memory_len() as i64;
        // The whole sequence's length (the stream may be a sequence shard).
        let total = self.multimodal_text_len(batch) as i64;
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
        self.losses_with(tp, acts, batch, w, None)
    }

    /// As [`Model::losses`]; with `global`, the contrastive loss is computed over those
    /// embeddings (its rows `global.rows` against every column) instead of the
    /// micro-batch's own.
    pub fn losses_with(
        &self,
        tp: &mut dyn TensorParallel,
        acts: &mut Acts,
        batch: &Batch,
        w: LossWeights,
        global: Option<&GlobalEmbeddings>,
    ) -> Result<Losses> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let b = batch.len() as i64;
        let f32 = |t: Tensor| t.f_to_kind(Kind::Float);
        let mut objectives: (Option<Tensor>, Option<Tensor>) = (None, None);
        let mut caption_logits = None;
        let (caption, h_rep) = match &heads.decoder {
            Some((ln, lm)) => {
                // The heads need every position: a sequence-parallel stream is gathered.
                let mut text = unshard(
                    tp,
                    Acts::take(&acts.text, "text")?,
                    self.multimodal_text_len(batch) as i64,
                )?;
                if self.cfg.fusion == Fusion::Prefix {
                    let n = self.cfg.memory_len() as i64;
                    let total = text.size()[1];
                    text = text.f_narrow(1, n, total - n)?;
                }
                // `h` feeds the column-parallel LM head through `f`, and the replicated
                // matching head directly (its gradient must not be summed over the TP
                // group).
                let h = ln.forward(&text)?;
                let mut h_rep = h.shallow_clone();
                let h_lm = {
                    let mut live = acts.present_mut();
                    live.push(&mut h_rep);
                    tp.enter(&mut live, &[&h]).map_err(map_tp)?.remove(0)
                };

                // Captioning: position t predicts token t + 1 of the positive pairs.
                let t = h_lm.size()[1];
                let pos = h_lm.f_narrow(0, 0, b)?.f_narrow(1, 0, t - 1)?;
                let logits = f32(lm.forward_local(&pos)?)?;
                let targets = batch.tokens.f_narrow(1, 1, t - 1)?;
                let caption = self.vocab_cross_entropy(tp, &logits, &targets)?;
                if self.keep_caption_logits {
                    caption_logits = Some(logits);
                }
                // The objectives' rows: the LM head at every position of each row.
                let itm_rows = if w.itm > 0.0 { b } else { 0 };
                let mut objective = |rows: &Option<crate::objectives::TextRows>,
                                     offset: i64,
                                     weight: f64|
                 -> Result<Option<Tensor>> {
                    let Some(r) = rows else { return Ok(None) };
                    if weight == 0.0 {
                        return Ok(None);
                    }
                    let h = h_lm.f_narrow(0, b + itm_rows + offset, b)?;
                    let logits = f32(lm.forward_local(&h)?)?;
                    Ok(Some(self.vocab_cross_entropy(tp, &logits, &r.targets)?))
                };
                let mlm = objective(&batch.mlm, 0, w.mlm)?;
                let vqa_offset = if batch.mlm.is_some() { b } else { 0 };
                let vqa = objective(&batch.vqa, vqa_offset, w.vqa)?;
                objectives = (mlm, vqa);
                (caption, Some(h_rep))
            }
            // No decoder (CLIP): contrastive only.
            None => (
                Tensor::f_zeros([], (Kind::Float, batch.tokens.device()))?,
                None,
            ),
        };

        // Contrastive: symmetric InfoNCE over the micro-batch, learnable temperature
        // (clamped at 100 as in CLIP).
        let scale = f32(heads.logit_scale.shallow_clone())?
            .f_exp()?
            .f_clamp_max(100.0)?;
        let itc = match global {
            None => {
                let ie = f32(Acts::take(&acts.image_emb, "image_emb")?)?;
                let te = f32(Acts::take(&acts.text_emb, "text_emb")?)?;
                let sim = ie.f_matmul(&te.f_tr()?)?.f_mul(&scale)?;
                let labels = Tensor::f_arange(b, (Kind::Int64, sim.device()))?;
                (sim.f_cross_entropy_loss::<Tensor>(
                    &labels,
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                )? + sim.f_tr()?.f_cross_entropy_loss::<Tensor>(
                    &labels,
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                )?) * 0.5
            }
            Some(g) => global_itc(g, &scale)?,
        };

        // Matching: the EOS state of positive and negative pairs.
        let itm = match (&h_rep, &heads.itm) {
            (Some(h_rep), Some(head)) if w.itm > 0.0 => {
                let eos = Tensor::f_cat(&[&batch.eos, &batch.eos], 0)?;
                let pairs = if batch.extra_rows() > 0 {
                    h_rep.f_narrow(0, 0, 2 * b)?
                } else {
                    h_rep.shallow_clone()
                };
                let at_eos = gather_rows(&pairs, &eos)?;
                let logits = f32(head.forward_local(&at_eos)?)?;
                let dev = logits.device();
                let y = Tensor::f_cat(
                    &[
                        Tensor::f_ones([b], (Kind::Int64, dev))?,
                        Tensor::f_zeros([b], (Kind::Int64, dev))?,
                    ],
                    0,
                )?;
                logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?
            }
            _ if w.itm > 0.0 => return Err(missing("head.itm (model.itm_head)")),
            _ => Tensor::f_zeros([], (Kind::Float, scale.device()))?,
        };
        let mut total = itc
            .f_mul_scalar(w.itc)?
            .f_add(&caption.f_mul_scalar(w.caption)?)?
            .f_add(&itm.f_mul_scalar(w.itm)?)?;
        let zero = || Tensor::f_zeros([], (Kind::Float, scale.device()));
        let (mlm, vqa) = objectives;
        if w.mlm > 0.0 && mlm.is_none() {
            return Err(ModelError::Data(
                "train.mlm_weight > 0 but the micro-batch has no MLM rows".into(),
            ));
        }
        if w.vqa > 0.0 && vqa.is_none() {
            return Err(ModelError::Data(
                "train.vqa_weight > 0 but the micro-batch has no VQA rows".into(),
            ));
        }
        if let Some(l) = &mlm {
            total = total.f_add(&l.f_mul_scalar(w.mlm)?)?;
        }
        if let Some(l) = &vqa {
            total = total.f_add(&l.f_mul_scalar(w.vqa)?)?;
        }
        Ok(Losses {
            total,
            itc,
            caption,
            itm,
            mlm: match mlm {
                Some(l) => l,
                None => zero()?,
            },
            vqa: match vqa {
                Some(l) => l,
                None => zero()?,
            },
            caption_logits,
        })
    }

    /// The contrastive loss of `global` (rows `global.rows` against the whole batch; see
    /// [`GlobalEmbeddings`]), with this model's temperature (the last layer's).
    pub fn contrastive_loss(&self, global: &GlobalEmbeddings) -> Result<Tensor> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let scale = heads
            .logit_scale
            .f_to_kind(Kind::Float)?
            .f_exp()?
            .f_clamp_max(100.0)?;
        global_itc(global, &scale)
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
            mlm: None,
            vqa: None,
        };
        let mut tp = weaver_parallel::tp::NoTp;
        let mut acts = Acts::default();
        self.forward(&mut tp, &mut acts, &batch, false)?;
        self.head_logits(&acts)
    }

    /// The contrastive temperature's parameter (the log of the scale `exp(·)` that
    /// multiplies the cosine similarities, clamped at 100 in the loss), on the model that
    /// holds the last layer; `None` elsewhere. Distillation scales each model's
    /// similarities by its own.
    pub fn logit_scale(&self) -> Option<&Tensor> {
        self.heads.as_ref().map(|h| &h.logit_scale)
    }

    /// Logits of the captioning head for every text position from the last layer's
    /// activations, over this process's part of the vocabulary (all of it without tensor
    /// parallelism): what a pipeline's last stage decodes from.
    pub fn head_logits(&self, acts: &Acts) -> Result<Tensor> {
        let heads = self.heads.as_ref().ok_or_else(|| missing("head"))?;
        let (ln, lm) = heads
            .decoder
            .as_ref()
            .ok_or_else(|| missing("head.lm (a model without multimodal layers)"))?;
        let mut text = Acts::take(&acts.text, "text")?;
        if self.cfg.fusion == Fusion::Prefix {
            let n = self.cfg.memory_len() as i64;
            let total = text.size()[1];
            text = text.f_narrow(1, n, total - n)?;
        }
        let h = ln.forward(&text)?;
        lm.forward_local(&h)
    }
}

/// open_clip's `resize_pos_embed`: the image positions `pos` `[extra + g·g, d]` of an
/// encoder trained at another image size, resized bicubically (antialiased, as open_clip
/// does) to the patch grid of `cfg`; the class token's position (`extra = 1` with
/// `vision_class_token`) is kept as it is.
pub fn resize_vision_pos(pos: &Tensor, cfg: &ModelConfig) -> Result<Tensor> {
    let extra = i64::from(cfg.vision_class_token);
    let s = pos.size();
    let bad = |message: String| ModelError::ParamMismatch(format!("vision.pos: {message}"));
    if s.len() != 2 || s[0] <= extra {
        return Err(bad(format!("shape {s:?} is not [tokens, width]")));
    }
    let (n_old, d) = (s[0] - extra, s[1]);
    let g_old = (n_old as f64).sqrt().round() as i64;
    if g_old * g_old != n_old {
        return Err(bad(format!("{n_old} positions are not a square grid")));
    }
    let g = (cfg.image_size / cfg.patch_size) as i64;
    let grid = pos
        .f_narrow(0, extra, n_old)?
        .f_to_kind(Kind::Float)?
        .f_reshape([1, g_old, g_old, d])?
        .f_permute([0, 3, 1, 2])?;
    let resized = grid
        .f_internal_upsample_bicubic2d_aa([g, g], false, None, None)?
        .f_permute([0, 2, 3, 1])?
        .f_reshape([g * g, d])?;
    let head = pos.f_narrow(0, 0, extra)?.f_to_kind(Kind::Float)?;
    Ok(Tensor::f_cat(&[&head, &resized], 0)?)
}

/// The symmetric InfoNCE loss of rows `g.rows` of the global batch against all of it:
/// images of those rows against every text, and texts of those rows against every image,
/// each the mean cross-entropy over the rows (CLIP's loss over the whole batch when the rows
/// are all of it; open_clip's `local_loss` otherwise).
fn global_itc(g: &GlobalEmbeddings, scale: &Tensor) -> Result<Tensor> {
    let scale = if g.scale_grad {
        scale.shallow_clone()
    } else {
        scale.f_detach()?
    };
    let (start, len) = g.rows;
    let n = g.image.size()[0];
    let labels = Tensor::f_arange_start(start, start + len, (Kind::Int64, g.image.device()))?;
    let ce = |x: &Tensor| {
        x.f_cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0)
    };
    let (per_image, per_text) = if start == 0 && len == n {
        let sim = g.image.f_matmul(&g.text.f_tr()?)?.f_mul(&scale)?;
        let t = sim.f_tr()?;
        (sim, t)
    } else {
        (
            g.image
                .f_narrow(0, start, len)?
                .f_matmul(&g.text.f_tr()?)?
                .f_mul(&scale)?,
            g.text
                .f_narrow(0, start, len)?
                .f_matmul(&g.image.f_tr()?)?
                .f_mul(&scale)?,
        )
    };
    Ok((ce(&per_image)? + ce(&per_text)?) * 0.5)
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
    use crate::config::{Activation, PadMask, TextPool, VisionPool};
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

    /// An open_clip flavor at debug size (every architecture option of the flavor on).
    pub(crate) fn small_open_clip(flavor: &str, fusion: Fusion) -> ModelConfig {
        let full = ModelConfig::flavor(flavor).unwrap();
        ModelConfig {
            fusion,
            image_size: 32,
            patch_size: 8,
            vision_width: 64,
            vision_layers: 2,
            vision_heads: 4,
            text_width: 32,
            text_heads: 4,
            unimodal_layers: 2,
            multimodal_layers: full.multimodal_layers.min(2),
            vocab_size: 64,
            max_text_len: 16,
            embed_dim: 32,
            attn_pool_queries: 9,
            attn_pool_heads: 4,
            ..full
        }
    }

    /// The whole model of `c` in f32 on the CPU (seed 0), its store, and the synthetic
    /// data at its sizes.
    fn whole_model(c: &ModelConfig) -> (ParamStore, Model, Dataset) {
        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
        let n = Model::num_layers(c);
        let model = Model::new(&mut store, c, 0..n, TpPos::SINGLE, 0).unwrap();
        let data = Dataset {
            seed: 0,
            image_size: c.image_size,
            max_objects: 2,
            text_len: c.max_text_len,
            tokenizer: Arc::new(GrammarTokenizer::new()),
        };
        (store, model, data)
    }

    /// Every architecture the tests sweep: the debug model with each fusion, the open_clip
    /// flavors at debug size (CoCa with each fusion), and the remaining options.
    pub(crate) fn every_config() -> Vec<ModelConfig> {
        let mut out: Vec<ModelConfig> = Fusion::ALL.into_iter().map(cfg).collect();
        for fusion in Fusion::ALL {
            out.push(small_open_clip("openclip-coca-b32", fusion));
        }
        out.push(small_open_clip("openclip-clip-b32", Fusion::CrossAttention));
        let mut argmax = small_open_clip("openclip-clip-b32", Fusion::CrossAttention);
        argmax.text_pool = TextPool::Argmax;
        argmax.text_pad_mask = PadMask::Keys;
        argmax.text_proj_bias = true;
        argmax.activation = Activation::QuickGelu;
        out.push(argmax);
        let mut mean = small_open_clip("openclip-coca-b32", Fusion::CrossAttention);
        mean.vision_pool = VisionPool::Mean;
        mean.itm_head = true;
        out.push(mean);
        out.extend(narrow_configs());
        out
    }

    /// Attention narrower (and wider) than the residual stream (`model.*_head_dim`): the
    /// debug model with 8-wide image heads and two 24-wide text heads (48 of 64), with
    /// cross-attention and with prefix fusion, and the open_clip CoCa at debug size with
    /// other widths everywhere: 8-wide image heads, two 12-wide text heads (24 of 32), and
    /// 6-wide pooler heads (24 of 32).
    pub(crate) fn narrow_configs() -> Vec<ModelConfig> {
        let debug = ModelConfig {
            vision_head_dim: Some(8),
            text_heads: 2,
            text_head_dim: Some(24),
            ..cfg(Fusion::CrossAttention)
        };
        let prefix = ModelConfig {
            fusion: Fusion::Prefix,
            ..debug.clone()
        };
        let coca = ModelConfig {
            vision_head_dim: Some(8),
            text_heads: 2,
            text_head_dim: Some(12),
            attn_pool_head_dim: Some(6),
            ..small_open_clip("openclip-coca-b32", Fusion::GatedCrossAttention)
        };
        vec![debug, prefix, coca]
    }

    #[test]
    fn parameter_count_matches_the_formula() {
        for c in every_config() {
            let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
            Model::new(&mut store, &c, 0..Model::num_layers(&c), TpPos::SINGLE, 0).unwrap();
            assert_eq!(store.numel() as u64, c.num_params(), "{c:?}");
        }
    }

    /// Every architecture builds over placeholder parameters
    /// ([`ParamStore::placeholders`], how the layout evaluator makes its stage decoders),
    /// and once each is bound to a real model's tensor of the same name (`set_data`) the
    /// model computes what the real one does.
    #[test]
    fn every_config_builds_over_placeholders_and_runs_once_bound() {
        for c in every_config() {
            let (store, real, data) = whole_model(&c);
            let mut ph = ParamStore::placeholders(Device::Cpu, Kind::Float);
            let n = Model::num_layers(&c);
            let bound = Model::new(&mut ph, &c, 0..n, TpPos::SINGLE, 0).unwrap();
            assert_eq!(ph.params().len(), store.params().len(), "{c:?}");
            for p in ph.params() {
                let src = store.get(&p.name).unwrap();
                assert_eq!(p.tensor.size(), src.size(), "{}", p.name);
                p.tensor.shallow_clone().set_data(src);
            }
            let batch = data.batch(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
            let (a, b) = (
                real.embeddings(&batch).unwrap(),
                bound.embeddings(&batch).unwrap(),
            );
            assert!(a.0.equal(&b.0) && a.1.equal(&b.1), "{c:?}");
        }
    }

    /// The planner's memory model counts each layer's parameters (and how tensor
    /// parallelism splits them) from the config alone: it must hold what a rank builds.
    #[test]
    fn layer_params_match_each_layers_store_on_every_tp_rank() {
        for c in every_config() {
            for tp in [1usize, 2, 4] {
                if c.limits().undivided(tp).is_some() {
                    continue;
                }
                for i in 0..Model::num_layers(&c) {
                    for rank in [0, tp - 1] {
                        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
                        Model::new(&mut store, &c, i..i + 1, TpPos { rank, size: tp }, 0).unwrap();
                        let sharded: i64 = store
                            .params()
                            .iter()
                            .filter(|p| p.shard.world > 1)
                            .map(|p| p.tensor.numel() as i64)
                            .sum();
                        let want = c.layer_params(i);
                        assert_eq!(
                            store.numel() as u64,
                            want.local(tp),
                            "{c:?} layer {i} tp {tp}"
                        );
                        if tp > 1 {
                            assert_eq!(
                                sharded as u64 * tp as u64,
                                want.sharded,
                                "layer {i} tp {tp}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_two_dimensional_weight_is_a_visited_linear_layer() {
        for c in every_config() {
            let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
            let mut model =
                Model::new(&mut store, &c, 0..Model::num_layers(&c), TpPos::SINGLE, 0).unwrap();
            let mut names = Vec::new();
            model
                .for_each_linear(&mut |l| {
                    names.push(l.name.clone());
                    Ok(())
                })
                .unwrap();
            let mut want: Vec<String> = store
                .params()
                .iter()
                .filter(|p| {
                    p.global_shape.len() == 2
                        && !p.name.ends_with("tok_embed.weight")
                        && !p.name.ends_with(".pos")
                        && !p.name.ends_with("attn_pool.query")
                })
                .map(|p| p.name.clone())
                .collect();
            let mut got = names.clone();
            got.sort();
            got.dedup();
            assert_eq!(got.len(), names.len(), "a layer visited twice");
            want.sort();
            assert_eq!(got, want, "{c:?}");
        }
    }

    #[test]
    fn open_clip_flavors_have_open_clips_parameter_counts() {
        // sum(p.numel() for p in open_clip.create_model(arch).state_dict().values()) with
        // open-clip-torch 3.3.0.
        for (flavor, count) in [
            ("openclip-coca-b32", 253_560_065u64),
            ("openclip-coca-l14", 638_450_177),
            ("openclip-clip-b32", 151_277_313),
        ] {
            assert_eq!(
                ModelConfig::flavor(flavor).unwrap().num_params(),
                count,
                "{flavor}"
            );
        }
    }

    #[test]
    fn argmax_pooling_is_eos_pooling_when_eos_is_the_largest_id() {
        let mut c = small_open_clip("openclip-clip-b32", Fusion::CrossAttention);
        let n = Model::num_layers(&c);
        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 3);
        let eos_model = Model::new(&mut store, &c, 0..n, TpPos::SINGLE, 0).unwrap();
        c.text_pool = TextPool::Argmax;
        let mut store2 = ParamStore::new(Device::Cpu, Kind::Float, 3);
        let argmax_model = Model::new(&mut store2, &c, 0..n, TpPos::SINGLE, 0).unwrap();
        let mut ids = vec![0i64; 16];
        ids[..4].copy_from_slice(&[1, 5, 7, 63]);
        let batch = Batch {
            images: Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)),
            tokens: Tensor::from_slice(&ids).reshape([1, 16]).repeat([2, 1]),
            eos: Tensor::from_slice(&[3i64, 3]),
            indices: vec![0, 1],
            mlm: None,
            vqa: None,
        };
        let (_, a) = eos_model.embeddings(&batch).unwrap();
        let (_, b) = argmax_model.embeddings(&batch).unwrap();
        assert!(a.equal(&b));
    }

    #[test]
    fn legacy_pad_mask_is_shifted_by_one() {
        let c = small_open_clip("openclip-coca-b32", Fusion::CrossAttention);
        let mut store = ParamStore::new(Device::Cpu, Kind::Float, 0);
        let model = Model::new(&mut store, &c, 0..1, TpPos::SINGLE, 0).unwrap();
        let mut ids = vec![0i64; 16];
        ids[..3].copy_from_slice(&[1, 9, 2]);
        let m = model
            .text_mask(&Tensor::from_slice(&ids).reshape([1, 16]))
            .unwrap();
        assert_eq!(m.size(), vec![1, 1, 17, 17]);
        let at = |i: i64, j: i64| m.int64_value(&[0, 0, i, j]) != 0;
        // Token 3 is the first padding: open_clip masks key 4 (and the class token at 16,
        // since token 15 is padding), not key 3.
        assert!(at(3, 3) && at(16, 3));
        assert!(!at(4, 4) && !at(16, 4) && !at(16, 16));
        assert!(!at(2, 3), "causal");
    }

    #[test]
    fn boundary_layouts_match_what_each_layer_produces() {
        for c in every_config() {
            for itm in [false, true] {
                if itm && (c.multimodal_layers == 0 || !c.itm_head) {
                    continue;
                }
                let fusion = c.fusion;
                let n = Model::num_layers(&c);
                let (_store, model, data) = whole_model(&c);
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

    /// With the MLM and VQA rows, every boundary carries what `boundary_layout_rows` says
    /// (what a pipeline receives), and the captions' rows compute what they compute alone.
    #[test]
    fn objective_rows_match_the_boundary_layout_and_leave_the_captions_alone() {
        use crate::objectives::{MlmSpec, Objectives};
        for c in every_config() {
            if c.multimodal_layers == 0 {
                continue;
            }
            let n = Model::num_layers(&c);
            let (_store, model, data) = whole_model(&c);
            let plain = data.batch(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
            let mut batch = data.batch(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
            let objectives = Objectives {
                mlm: Some(MlmSpec::new(data.tokenizer.as_ref(), 0, 0.15).unwrap()),
                vqa: true,
            };
            objectives
                .attach(&mut batch, &data, Split::Train, true)
                .unwrap();
            assert_eq!(batch.extra_rows(), 2);
            for itm in [false, true] {
                if itm && !c.itm_head {
                    continue;
                }
                for end in 1..n {
                    let mut acts = Acts::default();
                    model
                        .forward_until(&mut NoTp, &mut acts, &batch, itm, end)
                        .unwrap();
                    let got: Vec<Vec<i64>> = acts.present().iter().map(|t| t.size()).collect();
                    let want: Vec<Vec<i64>> =
                        Model::boundary_layout_rows(&c, end, 3, itm, 2, Kind::Float)
                            .into_iter()
                            .map(|(_, s, _)| s)
                            .collect();
                    assert_eq!(got, want, "{:?}, itm {itm}, before layer {end}", c.fusion);
                }
                let w = LossWeights {
                    itc: 1.0,
                    caption: 1.0,
                    itm: if itm { 0.5 } else { 0.0 },
                    mlm: 1.0,
                    vqa: 1.0,
                };
                let (mut a, mut b) = (Acts::default(), Acts::default());
                model.forward(&mut NoTp, &mut a, &plain, itm).unwrap();
                model.forward(&mut NoTp, &mut b, &batch, itm).unwrap();
                let la = model
                    .losses(
                        &mut NoTp,
                        &mut a,
                        &plain,
                        LossWeights {
                            mlm: 0.0,
                            vqa: 0.0,
                            ..w
                        },
                    )
                    .unwrap();
                let lb = model.losses(&mut NoTp, &mut b, &batch, w).unwrap();
                let close = |x: &Tensor, y: &Tensor| {
                    (x - y).abs().double_value(&[]) < 1e-5 * (1.0 + x.abs().double_value(&[]))
                };
                assert!(close(&la.itc, &lb.itc) && close(&la.caption, &lb.caption));
                assert!(close(&la.itm, &lb.itm), "{:?}", c.fusion);
                assert!(lb.mlm.double_value(&[]) > 0.0 && lb.vqa.double_value(&[]) > 0.0);
                let correct = model.vqa_correct(&mut NoTp, &b, &batch, itm).unwrap();
                assert_eq!(correct.size(), vec![3]);
            }
        }
    }

    /// A batch trimmed after its last token (`Batch::trim_text`) gives the losses and
    /// gradients of the padded one (EOS pooling: where the trainer trims), and its
    /// activations have the shapes the boundary layout of its length says (what a pipeline
    /// stage receives).
    #[test]
    fn trimmed_text_gives_the_padded_losses_and_gradients() {
        for c in every_config() {
            if c.text_pool != TextPool::Eos {
                continue;
            }
            let n = Model::num_layers(&c);
            let (mut store, model, data) = whole_model(&c);
            let full = data
                .batch(Split::Train, &[0, 1, 2, 3], Device::Cpu)
                .unwrap();
            let trimmed = full.trim_text(data.tokenizer.pad_id()).unwrap();
            let t = trimmed.tokens.size()[1];
            let last_eos = full.eos.max().int64_value(&[]);
            assert_eq!(t, last_eos + 1, "trimmed right after the last EOS");
            assert!(t < c.max_text_len as i64);
            let itm = c.itm_head && c.multimodal_layers > 0;
            let short = ModelConfig {
                max_text_len: t as usize,
                ..c.clone()
            };
            for end in 1..n {
                let mut acts = Acts::default();
                model
                    .forward_until(&mut NoTp, &mut acts, &trimmed, itm, end)
                    .unwrap();
                let got: Vec<Vec<i64>> = acts.present().iter().map(|t| t.size()).collect();
                let want: Vec<Vec<i64>> = Model::boundary_layout(&short, end, 4, itm, Kind::Float)
                    .into_iter()
                    .map(|(_, s, _)| s)
                    .collect();
                assert_eq!(got, want, "{:?}, before layer {end}", c.fusion);
            }
            let w = LossWeights {
                itc: 1.0,
                caption: 1.0,
                itm: if itm { 0.5 } else { 0.0 },
                mlm: 0.0,
                vqa: 0.0,
            };
            let mut run = |batch: &Batch| {
                store.zero_grad();
                let mut acts = Acts::default();
                model.forward(&mut NoTp, &mut acts, batch, itm).unwrap();
                let l = model.losses(&mut NoTp, &mut acts, batch, w).unwrap();
                l.total.backward();
                let grads: Vec<Tensor> = store
                    .params()
                    .iter()
                    .map(|p| p.tensor.grad().copy())
                    .collect();
                (l, grads)
            };
            let (la, ga) = run(&full);
            let (lb, gb) = run(&trimmed);
            let close = |a: &Tensor, b: &Tensor| {
                let d = (a - b).abs().max().double_value(&[]);
                assert!(d < 1e-5, "{:?}: differ by {d}", c.fusion);
            };
            for (a, b) in [
                (&la.itc, &lb.itc),
                (&la.caption, &lb.caption),
                (&la.itm, &lb.itm),
            ] {
                close(a, b);
            }
            for (a, b) in ga.iter().zip(&gb) {
                close(a, b);
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
        let tokens = Tensor::zeros([1, c.max_text_len as i64], (Kind::Int64, Device::Cpu));
        let batch = Batch {
            images: Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            eos: Tensor::zeros([1], (Kind::Int64, Device::Cpu)),
            tokens,
            indices: vec![0],
            mlm: None,
            vqa: None,
        };
        let m = model.prefix_mask(&acts, &batch).unwrap();
        let at = |i: i64, j: i64| m.int64_value(&[i, j]) != 0;
        assert!(at(0, n - 1), "image sees image");
        assert!(!at(0, n), "image does not see text");
        assert!(at(n, 0) && at(n, n), "text sees image and itself");
        assert!(!at(n, n + 1), "text does not see later text");
        assert!(at(n + 2, n + 1));
    }
}
