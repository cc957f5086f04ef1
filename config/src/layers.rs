//! The model's cuttable layers as the control plane sees them: how many, of which kind,
//! their relative costs for balancing pipeline stages, what a parallel layout must divide,
//! what crosses each boundary between layers, and the parameters each layer holds. Pure
//! functions of [`ModelConfig`]; `weaver_models::Model` delegates to them (and its tests
//! hold them to the tensors it builds).

use crate::config::{Fusion, ModelConfig, MultimodalBlock, TextPool, VisionPool};
use crate::mesh::ModelLimits;

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

/// A tensor flowing between layers (and across pipeline stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActField {
    /// The image stream: the encoder's residual stream, then the decoder's memory.
    Image,
    /// The text stream.
    Text,
    /// The normalised image embedding.
    ImageEmb,
    /// The normalised text embedding.
    TextEmb,
}

/// One tensor of a boundary: its field, shape, and whether it is f32 whatever the compute
/// dtype (the embeddings) or in the compute dtype.
pub type BoundaryTensor = (ActField, Vec<i64>, bool);

/// Parameters of one layer (its block and the pieces attached to it: embeddings on the
/// first layer of a tower, pooling and heads on the last), by how tensor parallelism holds
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerParams {
    /// Elements split over the tensor-parallel group (each rank holds `1/tp`).
    pub sharded: u64,
    /// Elements every tensor-parallel rank holds whole.
    pub replicated: u64,
}

impl LayerParams {
    /// Elements one tensor-parallel rank of `tp` holds.
    pub fn local(&self, tp: usize) -> u64 {
        self.sharded / tp.max(1) as u64 + self.replicated
    }

    /// Elements of the whole layer.
    pub fn total(&self) -> u64 {
        self.sharded + self.replicated
    }
}

impl std::ops::Add for LayerParams {
    type Output = LayerParams;
    fn add(self, o: LayerParams) -> LayerParams {
        LayerParams {
            sharded: self.sharded + o.sharded,
            replicated: self.replicated + o.replicated,
        }
    }
}

impl ModelConfig {
    /// Number of cuttable layers.
    pub fn num_layers(&self) -> usize {
        self.vision_layers + self.unimodal_layers + self.multimodal_layers
    }

    /// The kind of layer `i`.
    pub fn layer_kind(&self, i: usize) -> LayerKind {
        if i < self.vision_layers {
            LayerKind::Vision
        } else if i < self.vision_layers + self.unimodal_layers {
            LayerKind::Unimodal
        } else {
            LayerKind::Multimodal
        }
    }

    /// Relative forward cost of each layer (FLOPs by formula; image-encoder blocks scaled by
    /// `vision_cost`), for balancing pipeline stages.
    pub fn layer_costs(&self, itm: bool, vision_cost: f64) -> Vec<f64> {
        let (dv, dt) = (self.vision_width as f64, self.text_width as f64);
        let r = self.mlp_ratio as f64;
        let nv = self.vision_seq_len() as f64;
        let (n, dm) = (self.memory_len() as f64, self.memory_width() as f64);
        let t = self.max_text_len as f64;
        let tu = self.text_seq_len() as f64;
        let (av, at) = (
            self.vision_attn_width() as f64,
            self.text_attn_width() as f64,
        );
        // q, k, v, o between the width `d` and the attention width `a`, the MLP, the
        // scores and values.
        let block = |d: f64, a: f64, tokens: f64, keys: f64| {
            tokens * (8.0 * d * a + 4.0 * r * d * d) + 4.0 * tokens * keys * a
        };
        let copies = if itm { 2.0 } else { 1.0 };
        let cross_mlp = match self.multimodal_block {
            MultimodalBlock::Compact => 0.0,
            MultimodalBlock::OpenClip => t * 4.0 * r * dt * dt,
        };
        let mm = match self.fusion {
            Fusion::Prefix => block(dt, at, t + n, t + n),
            _ => {
                block(dt, at, t, t)
                    + 4.0 * t * dt * at
                    + 4.0 * n * dm * at
                    + 4.0 * t * n * at
                    + cross_mlp
            }
        };
        (0..self.num_layers())
            .map(|i| match self.layer_kind(i) {
                LayerKind::Vision => vision_cost * block(dv, av, nv, nv),
                LayerKind::Unimodal => block(dt, at, tu, tu),
                LayerKind::Multimodal => copies * mm,
            })
            .collect()
    }

    /// The activations entering layer `layer` for a micro-batch of `mbs` samples, in the
    /// model's field order (image, text, image embedding, text embedding), with their shapes
    /// and whether they are f32 (the embeddings) rather than the compute dtype: what a
    /// pipeline boundary before that layer carries (empty before layer 0).
    pub fn boundary(&self, layer: usize, mbs: usize, itm: bool) -> Vec<BoundaryTensor> {
        self.boundary_rows(layer, mbs, itm, 0)
    }

    /// [`ModelConfig::boundary`] with `extra` more groups of `mbs` text rows (the MLM and VQA
    /// passes: `weaver_models::objectives`) riding in the text stream from the text
    /// embedding on, and in the memory past the first multimodal layer (each extra row
    /// attends to its own sample's image).
    pub fn boundary_rows(
        &self,
        layer: usize,
        mbs: usize,
        itm: bool,
        extra: usize,
    ) -> Vec<BoundaryTensor> {
        let (lv, lu) = (self.vision_layers, self.unimodal_layers);
        let first_mm = lv + lu;
        let b = mbs as i64;
        let t = self.max_text_len as i64;
        let (dv, dt, e) = (
            self.vision_width as i64,
            self.text_width as i64,
            self.embed_dim as i64,
        );
        let (n, dm) = (self.memory_len() as i64, self.memory_width() as i64);
        let mut out = Vec::new();
        if layer == 0 {
            return out;
        }
        // Past the first multimodal layer the pairs are doubled (matching negatives) and,
        // with prefix fusion, the image tokens live inside the text sequence.
        let mm = layer > first_mm;
        let extra = extra as i64 * b;
        let rows = if mm && itm { 2 * b } else { b };
        let (rows, text_rows) = if mm {
            (rows + extra, rows + extra)
        } else {
            (rows, rows + extra)
        };
        let prefix = mm && self.fusion == Fusion::Prefix;
        if layer < lv {
            out.push((
                ActField::Image,
                vec![b, self.vision_seq_len() as i64, dv],
                false,
            ));
        } else if !prefix && self.multimodal_layers > 0 {
            // After the image encoder's head: the memory the decoder attends to (a model
            // without multimodal layers drops it). Each objective row gets its own copy;
            // the matching negatives do not: their cross-attention rolls the pairs' memory.
            let memory_rows = if mm && extra > 0 { rows } else { b };
            out.push((ActField::Image, vec![memory_rows, n, dm], false));
        }
        if layer > lv {
            // The unimodal layers carry the text class token, if any; it is pooled and
            // dropped after the last of them.
            let len = if prefix {
                n + t
            } else if layer < first_mm {
                self.text_seq_len() as i64
            } else {
                t
            };
            out.push((ActField::Text, vec![text_rows, len, dt], false));
        }
        if layer >= lv {
            out.push((ActField::ImageEmb, vec![b, e], true));
        }
        if layer >= first_mm {
            out.push((ActField::TextEmb, vec![b, e], true));
        }
        out
    }

    /// [`ModelConfig::boundary_rows`] under sequence parallelism over `tp` ranks
    /// (`parallel.sequence_parallel`): the image and text streams (and the memory) cross as
    /// this rank's sequence shard, `ceil(len / tp)` positions (the sequence padded to whole
    /// shards, see `weaver_parallel::tp::SeqShard`); the embeddings are whole.
    pub fn boundary_rows_split(
        &self,
        layer: usize,
        mbs: usize,
        itm: bool,
        extra: usize,
        tp: usize,
    ) -> Vec<BoundaryTensor> {
        let tp = tp.max(1) as i64;
        self.boundary_rows(layer, mbs, itm, extra)
            .into_iter()
            .map(|(f, mut shape, f32)| {
                if matches!(f, ActField::Image | ActField::Text) {
                    shape[1] = (shape[1] + tp - 1) / tp;
                }
                (f, shape, f32)
            })
            .collect()
    }

    /// The parameters of layer `i`: its block, and the embeddings, pooling and heads that
    /// belong to it (as `weaver_models::Model` builds them: column-split linears' weights and
    /// biases and row-split linears' weights are sharded over tensor parallelism, as are the
    /// token embedding and the LM head by vocabulary; norms, positions, tokens, the
    /// projections into the embedding space and row-split biases are replicated).
    pub fn layer_params(&self, i: usize) -> LayerParams {
        let (dv, dt) = (self.vision_width as u64, self.text_width as u64);
        let e = self.embed_dim as u64;
        let r = self.mlp_ratio as u64;
        let (lv, lu) = (self.vision_layers, self.unimodal_layers);
        let first_mm = lv + lu;
        let n_layers = self.num_layers();
        let rep = |replicated: u64| LayerParams {
            sharded: 0,
            replicated,
        };
        let ln = |d: u64| rep(2 * d);
        // q, k, v (to the attention width `a`) column-split with biases; o row-split
        // (weight sharded, bias whole).
        let attn = |dq: u64, dkv: u64, a: u64| LayerParams {
            sharded: (dq * a + a) + 2 * (dkv * a + a) + a * dq,
            replicated: dq,
        };
        let (av, at) = (
            self.vision_attn_width() as u64,
            self.text_attn_width() as u64,
        );
        let mlp = |d: u64| LayerParams {
            sharded: (d * r * d + r * d) + r * d * d,
            replicated: d,
        };
        let block = |d: u64, a: u64| ln(d) + attn(d, d, a) + ln(d) + mlp(d);
        let mut p = match self.layer_kind(i) {
            LayerKind::Vision => block(dv, av),
            LayerKind::Unimodal => block(dt, at),
            LayerKind::Multimodal => {
                let dm = self.memory_width() as u64;
                let cross = match self.multimodal_block {
                    MultimodalBlock::Compact => ln(dt) + attn(dt, dm, at),
                    MultimodalBlock::OpenClip => {
                        ln(dt) + ln(dm) + attn(dt, dm, at) + ln(dt) + mlp(dt)
                    }
                };
                match self.fusion {
                    Fusion::CrossAttention => block(dt, at) + cross,
                    Fusion::GatedCrossAttention => block(dt, at) + cross + rep(1),
                    Fusion::Prefix => block(dt, at),
                }
            }
        };
        if i == 0 {
            let patch = self.patch_dim() as u64 * dv + if self.patch_bias { dv } else { 0 };
            p = p
                + rep(patch + self.vision_seq_len() as u64 * dv)
                + rep(if self.vision_class_token { dv } else { 0 })
                + if self.vision_ln_pre { ln(dv) } else { rep(0) };
        }
        if i + 1 == lv {
            let pool_dim = match self.vision_pool {
                VisionPool::Attentional => {
                    p = p
                        + rep(self.attn_pool_queries as u64 * e)
                        + ln(e)
                        + ln(dv)
                        + attn(e, dv, self.attn_pool_width() as u64);
                    e
                }
                _ => dv,
            };
            p = p + ln(pool_dim) + rep(pool_dim * e);
        }
        if i == lv {
            p =
                p + LayerParams {
                    sharded: self.vocab_size as u64 * dt,
                    replicated: self.text_seq_len() as u64 * dt,
                } + rep(if self.text_pool == TextPool::ClassToken {
                    dt
                } else {
                    0
                });
        }
        if i + 1 == first_mm {
            p = p + ln(dt) + rep(dt * e + if self.text_proj_bias { e } else { 0 });
        }
        if i == first_mm && self.fusion == Fusion::Prefix && self.multimodal_layers > 0 {
            p = p + rep(self.memory_width() as u64 * dt + dt);
        }
        if i + 1 == n_layers {
            if self.multimodal_layers > 0 {
                p = p
                    + ln(dt)
                    + LayerParams {
                        sharded: self.vocab_size as u64 * dt,
                        replicated: 0,
                    };
                if self.itm_head {
                    p = p + rep(dt * 2 + 2);
                }
            }
            p = p + rep(1);
        }
        p
    }

    /// Forward FLOPs per sample of layer `i` with the pieces attached to it (patch embedding,
    /// pooling, projections, the LM and matching heads), counted as
    /// [`ModelConfig::forward_flops_per_sample`] counts them: the layers' sum is that figure.
    /// `itm`: the matching loss doubles the multimodal layers' pairs.
    pub fn layer_flops(&self, i: usize, itm: bool) -> f64 {
        let (dv, dt) = (self.vision_width as f64, self.text_width as f64);
        let e = self.embed_dim as f64;
        let (lv, lu) = (self.vision_layers, self.unimodal_layers);
        let first_mm = lv + lu;
        let copies = if itm { 2.0 } else { 1.0 };
        let mut f = self.layer_costs(itm, 1.0)[i];
        if i == 0 {
            f += 2.0 * self.num_patches() as f64 * self.patch_dim() as f64 * dv;
        }
        if i + 1 == lv {
            let nv = self.vision_seq_len() as f64;
            let proj_in = match self.vision_pool {
                VisionPool::Attentional => {
                    let q = self.attn_pool_queries as f64;
                    let ap = self.attn_pool_width() as f64;
                    f += 4.0 * q * e * ap + 4.0 * nv * dv * ap + 4.0 * q * nv * ap;
                    e
                }
                _ => dv,
            };
            f += 2.0 * proj_in * e;
        }
        if i + 1 == first_mm {
            f += 2.0 * dt * e;
        }
        if self.multimodal_layers > 0 {
            if i == first_mm && self.fusion == Fusion::Prefix {
                let (n, dm) = (self.memory_len() as f64, self.memory_width() as f64);
                f += copies * 2.0 * n * dm * dt;
            }
            if i + 1 == self.num_layers() {
                f += 2.0 * self.max_text_len as f64 * dt * self.vocab_size as f64;
            }
        }
        // The matching head, as `forward_flops_per_sample` counts it (whenever the matching
        // loss is on).
        if itm && i + 1 == self.num_layers() {
            f += 8.0 * dt;
        }
        f
    }

    /// Forward FLOPs per sample of the attention cores (scores and weighted values) of
    /// layer `i`: what selective recomputation runs again.
    pub fn attention_core_flops(&self, i: usize, itm: bool) -> f64 {
        let (av, at) = (
            self.vision_attn_width() as f64,
            self.text_attn_width() as f64,
        );
        let nv = self.vision_seq_len() as f64;
        let tu = self.text_seq_len() as f64;
        let t = self.max_text_len as f64;
        let n = self.memory_len() as f64;
        let copies = if itm { 2.0 } else { 1.0 };
        let mut f = match self.layer_kind(i) {
            LayerKind::Vision => 4.0 * nv * nv * av,
            LayerKind::Unimodal => 4.0 * tu * tu * at,
            LayerKind::Multimodal => {
                copies
                    * match self.fusion {
                        Fusion::Prefix => 4.0 * (t + n) * (t + n) * at,
                        _ => 4.0 * t * t * at + 4.0 * t * n * at,
                    }
            }
        };
        if i + 1 == self.vision_layers && self.vision_pool == VisionPool::Attentional {
            f += 4.0 * self.attn_pool_queries as f64 * nv * self.attn_pool_width() as f64;
        }
        f
    }

    /// What a parallel layout must divide (heads, split widths, layers).
    pub fn limits(&self) -> ModelLimits {
        let mut heads = vec![
            ("model.vision_heads".into(), self.vision_heads),
            ("model.text_heads".into(), self.text_heads),
        ];
        if self.vision_pool == VisionPool::Attentional {
            heads.push(("model.attn_pool_heads".into(), self.attn_pool_heads));
        }
        ModelLimits {
            heads,
            split_widths: vec![
                (
                    "the vision MLP width".into(),
                    self.mlp_ratio * self.vision_width,
                ),
                (
                    "the text MLP width".into(),
                    self.mlp_ratio * self.text_width,
                ),
                ("model.vocab_size".into(), self.vocab_size),
            ],
            layers: self.num_layers(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_vision_then_unimodal_then_multimodal() {
        let c = ModelConfig::flavor("debug").unwrap();
        let kinds: Vec<LayerKind> = (0..c.num_layers()).map(|i| c.layer_kind(i)).collect();
        assert_eq!(
            kinds,
            [
                LayerKind::Vision,
                LayerKind::Vision,
                LayerKind::Unimodal,
                LayerKind::Unimodal,
                LayerKind::Multimodal,
                LayerKind::Multimodal
            ]
        );
        let costs = c.layer_costs(true, 2.0);
        assert_eq!(costs.len(), 6);
        assert!(costs.iter().all(|x| *x > 0.0));
        // Matching doubles the multimodal layers' work; vision_cost scales the image blocks.
        let plain = c.layer_costs(false, 1.0);
        assert_eq!(costs[5], 2.0 * plain[5]);
        assert_eq!(costs[0], 2.0 * plain[0]);
        assert_eq!(costs[2], plain[2]);
        assert_eq!(c.limits().layers, 6);
    }

    #[test]
    fn layer_flops_add_up_to_the_model() {
        let mut configs: Vec<ModelConfig> = ModelConfig::FLAVORS
            .iter()
            .map(|f| ModelConfig::flavor(f).unwrap())
            .collect();
        for fusion in Fusion::ALL {
            configs.push(ModelConfig {
                fusion,
                ..ModelConfig::flavor("small").unwrap()
            });
        }
        // Attention narrower than the stream (`model.*_head_dim`), pooler included.
        let narrow = ModelConfig {
            vision_head_dim: Some(16),
            text_heads: 4,
            text_head_dim: Some(32),
            attn_pool_head_dim: Some(16),
            ..ModelConfig::flavor("openclip-coca-b32").unwrap()
        };
        let wide = ModelConfig::flavor("openclip-coca-b32").unwrap();
        assert!(narrow.forward_flops_per_sample(false) < wide.forward_flops_per_sample(false));
        assert!(narrow.num_params() < wide.num_params());
        configs.push(narrow);
        for c in configs {
            for itm in [false, true] {
                let sum: f64 = (0..c.num_layers()).map(|i| c.layer_flops(i, itm)).sum();
                let want = c.forward_flops_per_sample(itm);
                assert!(
                    (sum - want).abs() <= 1e-9 * want,
                    "{} {:?}: {sum} vs {want}",
                    c.flavor,
                    c.fusion
                );
                for i in 0..c.num_layers() {
                    assert!(c.attention_core_flops(i, itm) < c.layer_flops(i, itm));
                }
            }
        }
    }

    #[test]
    fn layer_params_add_up_to_the_model() {
        for flavor in ModelConfig::FLAVORS {
            let c = ModelConfig::flavor(flavor).unwrap();
            let sum: u64 = (0..c.num_layers()).map(|i| c.layer_params(i).total()).sum();
            assert_eq!(sum, c.num_params(), "{flavor}");
        }
        for fusion in Fusion::ALL {
            let c = ModelConfig {
                fusion,
                ..ModelConfig::flavor("debug").unwrap()
            };
            let sum: u64 = (0..c.num_layers()).map(|i| c.layer_params(i).total()).sum();
            assert_eq!(sum, c.num_params(), "{fusion:?}");
        }
        // A vision block of the small model (width 256, MLP 1024) in the middle of its
        // tower: q, k, v, o and the MLP split, the norms and the two row-split biases whole.
        let c = ModelConfig::flavor("small").unwrap();
        let p = c.layer_params(1);
        let (d, h) = (256, 1024);
        assert_eq!(p.sharded, 3 * (d * d + d) + d * d + (d * h + h) + h * d);
        assert_eq!(p.replicated, 4 * d + d + d);
        assert_eq!(p.local(2), p.sharded / 2 + p.replicated);
    }
}
