//! AdamW with f32 master weights, the warmup + cosine learning-rate schedule, and
//! gradient-norm clipping.
//!
//! The update follows PyTorch's single-tensor AdamW step for step (decoupled decay, `lerp`
//! for the first moment, bias corrections as in `torch.optim.AdamW`); it matches PyTorch up
//! to rounding, since tch's `addcmul_`/`addcdiv_` take no scalar and the scale is folded
//! into an operand. When parameters compute in bf16, the optimizer keeps an f32 master
//! copy of each, updates it, and writes it back rounded (Micikevicius et al. 2018).

use tch::{Kind, Tensor};
use weaver_models::nn::Param;

/// Hyper-parameters of AdamW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// epsilon.
    pub eps: f64,
    /// Decoupled weight decay (applied to parameters marked `decay`).
    pub weight_decay: f64,
}

/// Per-parameter state.
#[derive(Debug)]
pub struct ParamState {
    /// f32 master copy when the parameter itself is not f32.
    pub master: Option<Tensor>,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of parameters (the order of the store).
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Updates taken so far.
    pub step: u64,
    /// State of each parameter, in the store's order.
    pub states: Vec<ParamState>,
}

impl AdamW {
    /// Fresh state for `params`.
    pub fn new(cfg: AdamWConfig, params: &[Param]) -> Result<AdamW, tch::TchError> {
        let states = params
            .iter()
            .map(|p| {
                let t = &p.tensor;
                let master = if t.kind() == Kind::Float {
                    None
                } else {
                    Some(t.f_detach()?.f_to_kind(Kind::Float)?)
                };
                Ok(ParamState {
                    master,
                    exp_avg: t.f_zeros_like()?.f_to_kind(Kind::Float)?,
                    exp_avg_sq: t.f_zeros_like()?.f_to_kind(Kind::Float)?,
                })
            })
            .collect::<Result<Vec<_>, tch::TchError>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            states,
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone
    /// (as PyTorch does).
    pub fn step(&mut self, params: &[Param], lr: f64) -> Result<(), tch::TchError> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for (p, s) in params.iter().zip(self.states.iter_mut()) {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.f_to_kind(Kind::Float)?;
                let mut master = match &s.master {
                    Some(m) => m.shallow_clone(),
                    None => p.tensor.shallow_clone(),
                };
                if p.decay && c.weight_decay != 0.0 {
                    let _ = master.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                // In place, one temporary (the denominator): these passes over every
                // parameter are memory-bound, and each temporary costs a full pass more.
                let _ = s.exp_avg.f_lerp_(&grad, 1.0 - c.beta1)?;
                let _ = s.exp_avg_sq.f_mul_scalar_(c.beta2)?;
                let _ = s
                    .exp_avg_sq
                    .f_addcmul_(&grad, &grad.f_mul_scalar(1.0 - c.beta2)?)?;
                if lr != 0.0 {
                    let mut denom = s.exp_avg_sq.f_sqrt()?;
                    let _ = denom.f_div_scalar_(bc2_sqrt)?;
                    let _ = denom.f_add_scalar_(c.eps)?;
                    // p − (lr / bc1) · m / denom  =  p + m / (denom · (−bc1 / lr))
                    let _ = denom.f_mul_scalar_(-bc1 / lr)?;
                    let _ = master.f_addcdiv_(&s.exp_avg, &denom)?;
                }
                if s.master.is_some() {
                    let mut dst = p.tensor.shallow_clone();
                    dst.f_copy_(&master)?;
                }
            }
            Ok(())
        })
    }
}

/// Warmup then cosine decay: `lr·(s+1)/warmup` for the first `warmup` steps, then from `lr`
/// down to `lr·min_ratio` at the last step.
pub fn lr_at(step: u64, total: u64, warmup: u64, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min = lr * min_ratio;
    min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Sum of squared gradient entries of `params` (f64 accumulation of f32 partial sums), for
/// the global norm; parameters without a gradient count as zero.
pub fn grad_sq_sum<'a>(params: impl Iterator<Item = &'a Param>) -> Result<f64, tch::TchError> {
    let mut total = 0.0;
    for p in params {
        let g = p.tensor.grad();
        if g.defined() {
            let n = g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Float)?;
            total += n.f_double_value(&[])?;
        }
    }
    Ok(total)
}

/// Scales every gradient by `clip / (norm + 1e-6)` when the global norm exceeds `clip`
/// (PyTorch's `clip_grad_norm_`); returns the factor applied.
pub fn clip_grads(params: &[Param], norm: f64, clip: f64) -> Result<f64, tch::TchError> {
    if clip <= 0.0 {
        return Ok(1.0);
    }
    let coef = clip / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok(1.0);
    }
    tch::no_grad(|| -> Result<(), tch::TchError> {
        for p in params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(coef)?;
            }
        }
        Ok(())
    })?;
    Ok(coef)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weaver_models::nn::{Init, ParamStore, Shard};

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(50, 100, 10, 1.0, 0.1) < 1.0);
    }

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float, 0);
        let w = store
            .root()
            .param("w", &[2], Shard::FULL, Init::Const(1.0), true)
            .unwrap();
        (&w * Tensor::from_slice(&[2.0f32, -4.0]))
            .sum(Kind::Float)
            .backward();
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(cfg, store.params()).unwrap();
        opt.step(store.params(), 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr·g/|g| = ±lr; decay first: 1 − lr·wd.
        let expect = [1.0 - 0.01 * 0.1 - 0.01, 1.0 - 0.01 * 0.1 + 0.01];
        let got: Vec<f32> = Vec::try_from(&w).unwrap();
        for (g, e) in got.iter().zip(expect) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_bound() {
        let mut store = ParamStore::new(tch::Device::Cpu, Kind::Float, 0);
        let w = store
            .root()
            .param("w", &[2], Shard::FULL, Init::Const(1.0), true)
            .unwrap();
        (&w * Tensor::from_slice(&[3.0f32, 4.0]))
            .sum(Kind::Float)
            .backward();
        let norm = grad_sq_sum(store.params().iter()).unwrap().sqrt();
        assert!((norm - 5.0).abs() < 1e-9);
        clip_grads(store.params(), norm, 1.0).unwrap();
        let n2 = grad_sq_sum(store.params().iter()).unwrap().sqrt();
        assert!((n2 - 1.0).abs() < 1e-5);
    }
}
