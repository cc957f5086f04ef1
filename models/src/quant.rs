//! INT8 linear layers: per-output-channel symmetric int8 weights with f32 scales, run two
//! ways (the schemes of `weaver ckpt quantize`):
//!
//! - [`Int8Mode::WeightOnly`] (`int8-weight`): the weight stays int8 in memory and is
//!   dequantized to the activations' dtype for each product (`y = (x · qᵀ) ⊙ s + b`): a
//!   quarter of the f32 weight memory, f32/bf16 arithmetic.
//! - [`Int8Mode::Dynamic`] (`int8-dynamic`): the activations are quantized too, per token at
//!   run time (symmetric, scale `max |x_t| / 127`), and the product is an int8 × int8 matrix
//!   multiply accumulating in int32 (libtorch's `_int_mm`: oneDNN's VNNI kernels on a CPU,
//!   cuBLASLt on CUDA), rescaled by the token and channel scales (Dettmers et al. 2022,
//!   "LLM.int8()", without the outlier decomposition; Xiao et al. 2023, "SmoothQuant", for
//!   the optional per-input-channel smoothing factors found by calibration, which move
//!   activation outliers into the weights before both are quantized).
//!
//! On CUDA, `_int_mm` needs more than 16 rows and both other dimensions multiples of 8:
//! fewer rows are padded; other shapes fall back to a float product of the int8 values
//! (exact while `k · 127² < 2²⁴`), which is an emulation, not an int8 kernel.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// How an int8 linear layer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Mode {
    /// int8 weights dequantized for each product; float activations.
    WeightOnly,
    /// int8 weights and per-token int8 activations, int32 accumulation.
    Dynamic,
}

/// An int8 weight `[out, in]` with its per-output-channel scales.
#[derive(Debug)]
pub struct Int8Weight {
    /// `round(w / scale)` in `[-127, 127]`, `[out, in]` int8.
    pub q: Tensor,
    /// `max |w_row| / 127`, `[out]` f32.
    pub scale: Tensor,
    /// SmoothQuant factors `[in]` f32 (the weight was multiplied by them before
    /// quantization; activations are divided by them): `None` when not smoothed.
    pub smooth: Option<Tensor>,
    /// How it computes.
    pub mode: Int8Mode,
}

/// Quantizes `w` `[out, in]` per output channel: `(q int8, scale f32 [out])`.
pub fn quantize_per_channel(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let w = w.f_to_kind(Kind::Float)?;
    let scale = w
        .f_abs()?
        .f_amax([1i64].as_slice(), false)?
        .f_clamp_min(1e-12)?
        .f_div_scalar(127.0)?;
    let q = w
        .f_div(&scale.f_unsqueeze(1)?)?
        .f_round()?
        .f_clamp(-127.0, 127.0)?
        .f_to_kind(Kind::Int8)?;
    Ok((q, scale))
}

/// SmoothQuant's factors for a layer whose inputs reach `act_max` `[in]` in absolute value
/// and whose weight `[out, in]` is `w`: `s_j = act_max_j^α / max_i |w_ij|^(1 − α)`.
pub fn smoothing_factors(act_max: &Tensor, w: &Tensor, alpha: f64) -> Result<Tensor> {
    let w_max = w
        .f_to_kind(Kind::Float)?
        .f_abs()?
        .f_amax([0i64].as_slice(), false)?
        .f_clamp_min(1e-5)?;
    let a = act_max.f_to_kind(Kind::Float)?.f_clamp_min(1e-5)?;
    Ok(a.f_pow_tensor_scalar(alpha)?
        .f_div(&w_max.f_pow_tensor_scalar(1.0 - alpha)?)?
        .f_clamp(1e-5, 1e5)?)
}

/// `a` `[m, k]` int8 times `b` `[k, n]` int8, accumulated in int32 (`_int_mm`).
pub fn int8_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = (a.size()[0], a.size()[1]);
    let n = b.size()[1];
    match a.device() {
        Device::Cpu => Ok(a.f_internal_int_mm(b)?),
        _ if k % 8 == 0 && n % 8 == 0 => {
            if m > 16 {
                Ok(a.f_internal_int_mm(b)?)
            } else {
                let padded = a.f_constant_pad_nd([0, 0, 0, 17 - m])?;
                Ok(padded.f_internal_int_mm(b)?.f_narrow(0, 0, m)?)
            }
        }
        // Emulated: the products of int8 values in f32 (exact below 2^24).
        _ => Ok(a
            .f_to_kind(Kind::Float)?
            .f_matmul(&b.f_to_kind(Kind::Float)?)?
            .f_round()?
            .f_to_kind(Kind::Int)?),
    }
}

/// Per-token symmetric int8 quantization of `x` `[m, k]`: `(q int8, scale f32 [m, 1])`.
pub fn quantize_per_token(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = x.f_to_kind(Kind::Float)?;
    let scale = x
        .f_abs()?
        .f_amax([1i64].as_slice(), true)?
        .f_clamp_min(1e-12)?
        .f_div_scalar(127.0)?;
    let q = x
        .f_div(&scale)?
        .f_round()?
        .f_clamp(-127.0, 127.0)?
        .f_to_kind(Kind::Int8)?;
    Ok((q, scale))
}

impl Int8Weight {
    /// `x Wᵀ (+ bias)` for `x` `[.., in]`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let kind = x.kind();
        match self.mode {
            Int8Mode::WeightOnly => {
                let x = match &self.smooth {
                    Some(s) => x.f_div(&s.f_to_kind(kind)?)?,
                    None => x.shallow_clone(),
                };
                let w = self.q.f_to_kind(kind)?;
                let y = x
                    .f_linear::<Tensor>(&w, None)?
                    .f_mul(&self.scale.f_to_kind(kind)?)?;
                Ok(match bias {
                    Some(b) => y.f_add(b)?,
                    None => y,
                })
            }
            Int8Mode::Dynamic => {
                let s = x.size();
                let (inner, out) = (s[s.len() - 1], self.q.size()[0]);
                let mut x2 = x.f_reshape([-1, inner])?.f_to_kind(Kind::Float)?;
                if let Some(sm) = &self.smooth {
                    x2 = x2.f_div(sm)?;
                }
                let (xq, xs) = quantize_per_token(&x2)?;
                let acc = int8_matmul(&xq, &self.q.f_tr()?)?;
                // y = acc · s_token · s_channel (+ b), in f32.
                let y = acc
                    .f_to_kind(Kind::Float)?
                    .f_mul(&xs)?
                    .f_mul(&self.scale.f_unsqueeze(0)?)?;
                let y = match bias {
                    Some(b) => y.f_add(&b.f_to_kind(Kind::Float)?)?,
                    None => y,
                };
                let mut shape = s[..s.len() - 1].to_vec();
                shape.push(out);
                Ok(y.f_reshape(shape.as_slice())?.f_to_kind(kind)?)
            }
        }
    }

    /// The weight as floats `[out, in]` (what the int8 values stand for, smoothing undone).
    pub fn dequantize(&self) -> Result<Tensor> {
        let w = self
            .q
            .f_to_kind(Kind::Float)?
            .f_mul(&self.scale.f_unsqueeze(1)?)?;
        Ok(match &self.smooth {
            Some(s) => w.f_div(&s.f_unsqueeze(0)?)?,
            None => w,
        })
    }
}

/// Running per-input-channel maximum of `|x|` over every input a layer sees (calibration).
#[derive(Debug, Default)]
pub struct Observer(Mutex<Option<Tensor>>);

impl Observer {
    /// Folds `x` `[.., in]` into the maximum.
    pub fn observe(&self, x: &Tensor) -> Result<()> {
        let inner = x.size().last().copied().unwrap_or(1);
        let m = tch::no_grad(|| {
            x.f_detach()?
                .f_reshape([-1, inner])?
                .f_to_kind(Kind::Float)?
                .f_abs()?
                .f_amax([0i64].as_slice(), false)
        })?;
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *guard = Some(match guard.take() {
            Some(prev) => prev.f_maximum(&m)?,
            None => m,
        });
        Ok(())
    }

    /// The maximum so far (`None` if the layer saw no input).
    pub fn take(&self) -> Option<Tensor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_products_match_float_within_the_quantization_error() {
        tch::manual_seed(0);
        let w = Tensor::randn([48, 40], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([48], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 5, 40], (Kind::Float, Device::Cpu));
        let want = x.linear(&w, Some(&b));
        let (q, scale) = quantize_per_channel(&w).unwrap();
        // Per-channel rounding error is at most half a step.
        let back = q.to_kind(Kind::Float) * scale.unsqueeze(1);
        let step = (&back - &w).abs().max().double_value(&[]);
        assert!(step <= scale.max().double_value(&[]) * 0.5 + 1e-6);
        for mode in [Int8Mode::WeightOnly, Int8Mode::Dynamic] {
            let l = Int8Weight {
                q: q.shallow_clone(),
                scale: scale.shallow_clone(),
                smooth: None,
                mode,
            };
            let got = l.forward(&x, Some(&b)).unwrap();
            assert_eq!(got.size(), want.size());
            let rel = (&got - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
            // Weight rounding alone: ~0.5 %; activations too: ~1 %.
            assert!(rel < 0.02, "{mode:?}: relative error {rel}");
            assert!(rel > 0.0, "{mode:?}: suspiciously exact");
        }
        // The int32 accumulation is exact.
        let a = Tensor::randint_low(-127, 128, [7, 40], (Kind::Int8, Device::Cpu));
        let got = int8_matmul(&a, &q.tr()).unwrap();
        let want = a.to_kind(Kind::Int64).matmul(&q.tr().to_kind(Kind::Int64));
        assert!(got.to_kind(Kind::Int64).equal(&want));
    }

    #[test]
    fn smoothing_is_exact_in_float_and_helps_with_an_outlier_channel() {
        tch::manual_seed(1);
        let w = Tensor::randn([32, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([64, 16], (Kind::Float, Device::Cpu));
        // One input channel 50× larger than the rest (what LayerNorm outputs often have).
        let _ = x.narrow(1, 3, 1).f_mul_scalar_(50.0).unwrap();
        let want = x.linear::<Tensor>(&w, None);
        let obs = Observer::default();
        obs.observe(&x).unwrap();
        let s = smoothing_factors(&obs.take().unwrap(), &w, 0.5).unwrap();
        let err = |smooth: Option<&Tensor>| {
            let ws = match smooth {
                Some(s) => &w * s.unsqueeze(0),
                None => w.shallow_clone(),
            };
            let (q, scale) = quantize_per_channel(&ws).unwrap();
            let l = Int8Weight {
                q,
                scale,
                smooth: smooth.map(|s| s.shallow_clone()),
                mode: Int8Mode::Dynamic,
            };
            let d = l.dequantize().unwrap();
            assert!((&d - &w).abs().max().double_value(&[]) < 0.1);
            (l.forward(&x, None).unwrap() - &want)
                .norm()
                .double_value(&[])
        };
        let (plain, smoothed) = (err(None), err(Some(&s)));
        assert!(smoothed < plain, "smoothed {smoothed} vs plain {plain}");
    }
}
