//! The model's cuttable layers as the control plane sees them: how many, of which kind,
//! their relative costs for balancing pipeline stages, and what a parallel layout must
//! divide. Pure functions of [`ModelConfig`]; `weaver_models::Model` delegates to them.

use crate::config::{Fusion, ModelConfig, MultimodalBlock, VisionPool};
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
        let block = |d: f64, tokens: f64, keys: f64| {
            tokens * (8.0 * d * d + 4.0 * r * d * d) + 4.0 * tokens * keys * d
        };
        let copies = if itm { 2.0 } else { 1.0 };
        let cross_mlp = match self.multimodal_block {
            MultimodalBlock::Compact => 0.0,
            MultimodalBlock::OpenClip => t * 4.0 * r * dt * dt,
        };
        let mm = match self.fusion {
            Fusion::Prefix => block(dt, t + n, t + n),
            _ => {
                block(dt, t, t)
                    + 4.0 * t * dt * dt
                    + 4.0 * n * dm * dt
                    + 4.0 * t * n * dt
                    + cross_mlp
            }
        };
        (0..self.num_layers())
            .map(|i| match self.layer_kind(i) {
                LayerKind::Vision => vision_cost * block(dv, nv, nv),
                LayerKind::Unimodal => block(dt, tu, tu),
                LayerKind::Multimodal => copies * mm,
            })
            .collect()
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
}
