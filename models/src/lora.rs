//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
//! a linear layer `y = x Wᵀ + b` becomes `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ` with `A` `[r, in]`,
//! `B` `[out, r]` and `s = alpha / r`; `B` starts at zero, so the adapted model starts as
//! the base model, and the base weights stay frozen while `A` and `B` train.
//!
//! Which layers get adapters is `train.lora_targets` (see `weaver_config::finetune`); the
//! factors are parameters named `<layer>.lora_a` and `<layer>.lora_b` beside the layer's
//! `weight`, created by [`crate::nn::Linear::new`] when the store carries a [`LoraSpec`].
//!
//! Under tensor parallelism the factors follow the base layer's split so that the adapter
//! needs no collective of its own:
//! - column-parallel base (output features split): `A` whole, `B` split on its output (dim
//!   0), so `s (x Aᵀ) B_jᵀ` is exactly this rank's slice of the output;
//! - row-parallel base (input features split): `A` split on its input (dim 1), `B` whole, so
//!   `s (x_j A_jᵀ) Bᵀ` is a partial sum that the base layer's reduction adds up.
//!
//! The whole factor (`A` of a column-parallel layer, `B` of a row-parallel one) is the same
//! on every TP rank but each rank's backward sees only its part of the product, so its
//! gradient is a partial sum over the TP group: the trainer sums those gradients over the
//! group before the optimizer step ([`tp_partial_grad`]).

use tch::{Kind, Tensor};

use weaver_config::config::TrainSection;
use weaver_config::finetune::{is_lora, LORA_A, LORA_B};

use crate::error::Result;
use crate::nn::{Param, Split};

/// What adapters a model gets.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// `r`.
    pub rank: i64,
    /// `alpha` (the adapter's output is scaled by `alpha / r`).
    pub alpha: f64,
    /// Targets (`attn.q`, `mlp.fc1`, …).
    pub targets: Vec<String>,
}

impl LoraSpec {
    /// The adapters `[train]` asks for (`None` when `lora_rank` is 0).
    pub fn of(train: &TrainSection) -> Option<LoraSpec> {
        (train.lora_rank > 0).then(|| LoraSpec {
            rank: train.lora_rank as i64,
            alpha: train.lora_alpha,
            targets: train.lora_targets.clone(),
        })
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One layer's adapter: this rank's parts of `A` and `B`.
#[derive(Debug)]
pub struct Lora {
    /// `[r, in]` (`[r, in / tp]` under a row-parallel base).
    pub a: Tensor,
    /// `[out, r]` (`[out / tp, r]` under a column-parallel base).
    pub b: Tensor,
    /// `alpha / r`.
    pub scale: f64,
    /// The base layer's split.
    pub split: Split,
}

impl Lora {
    /// `s · (x Aᵀ) Bᵀ` for this rank's input `x` (the base layer's local input).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = x
            .f_linear::<&Tensor>(&self.a, None)?
            .f_mul_scalar(self.scale)?;
        Ok(u.f_linear::<&Tensor>(&self.b, None)?)
    }
}

/// `W + s · B A` (global tensors), computed in f32 and returned in `weight`'s dtype: the
/// weight of the merged layer, whose output equals the adapted layer's.
pub fn merge(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let delta = b
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(scale)?
        .f_matmul(&a.f_to_kind(Kind::Float)?)?;
    Ok(weight
        .f_to_kind(Kind::Float)?
        .f_add(&delta)?
        .f_to_kind(weight.kind())?)
}

/// The parameters `named` (global tensors) with every adapter merged into its layer's
/// weight and the adapter factors dropped: the state of a model without adapters that
/// computes what the adapted one does.
pub fn merge_all(named: Vec<(String, Tensor)>, scale: f64) -> Result<Vec<(String, Tensor)>> {
    let find = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, t)| t);
    let mut out = Vec::with_capacity(named.len());
    for (name, t) in &named {
        if is_lora(name) {
            continue;
        }
        let layer = name.strip_suffix(".weight");
        let factors = layer.and_then(|l| {
            Some((
                find(&format!("{l}.{LORA_A}"))?,
                find(&format!("{l}.{LORA_B}"))?,
            ))
        });
        match factors {
            Some((a, b)) => out.push((name.clone(), merge(t, a, b, scale)?)),
            None => out.push((name.clone(), t.shallow_clone())),
        }
    }
    Ok(out)
}

/// Whether checkpoint tensor `name` is a LoRA factor (the parameter names of
/// [`crate::nn::Linear`]'s adapters).
pub fn is_adapter(name: &str) -> bool {
    is_lora(name)
}

/// Whether `p`'s gradient is a partial sum over the TP group (see the module docs): a
/// LoRA factor held whole while its layer is split.
pub fn tp_partial_grad(p: &Param, tp: usize) -> bool {
    tp > 1 && p.shard.world == 1 && is_lora(&p.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn merged_weight_computes_the_adapted_output() {
        tch::manual_seed(0);
        let o = (Kind::Float, Device::Cpu);
        let (w, bias) = (Tensor::randn([6, 5], o), Tensor::randn([6], o));
        let lora = Lora {
            a: Tensor::randn([2, 5], o),
            b: Tensor::randn([6, 2], o),
            scale: 1.5,
            split: Split::Column,
        };
        let x = Tensor::randn([3, 5], o);
        let adapted = x.linear(&w, Some(&bias)) + lora.forward(&x).unwrap();
        let m = merge(&w, &lora.a, &lora.b, lora.scale).unwrap();
        let merged = x.linear(&m, Some(&bias));
        // f32 sums of 5 and 2 products in another order: a few ulps of values ~ 10.
        assert!(adapted.allclose(&merged, 1e-5, 1e-5, false));
        let named = vec![
            ("l.weight".to_string(), w.shallow_clone()),
            ("l.lora_a".to_string(), lora.a.shallow_clone()),
            ("l.lora_b".to_string(), lora.b.shallow_clone()),
            ("l.bias".to_string(), bias.shallow_clone()),
        ];
        let out = merge_all(named, 1.5).unwrap();
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["l.weight", "l.bias"]);
        assert!(out[0].1.equal(&m));
    }
}
