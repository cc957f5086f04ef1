//! The libtorch calls tch 0.24 does not expose, through a small C++ shim compiled by
//! `build.rs` (`csrc/shim.cpp`): ATen's fused AdamW and `_foreach_norm` over many tensors at
//! once, a parameter's gradient set to a view of a flat bucket (autograd then accumulates
//! into the bucket in place, as PyTorch DDP's `gradient_as_bucket_view` does), a
//! parameter's storage moved into a flat buffer (`param.data = view`), and a backward pass
//! seeded with explicit gradients (`torch.autograd.backward(outputs, grads)`).
//!
//! tch's tensors are handles to `at::Tensor` objects (`Tensor::as_ptr`); the shim reads them
//! and never keeps them. Errors (a C++ exception) come back as `TchError::Torch` with
//! libtorch's message.

use std::ffi::{c_char, CStr};

use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn weaver_free_error(e: *mut c_char);
    #[allow(clippy::too_many_arguments)]
    fn weaver_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        n: usize,
        step: *const C_tensor,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const C_tensor,
    ) -> *mut c_char;
    fn weaver_foreach_norm(
        ts: *const *const C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn weaver_set_grad(param: *const C_tensor, grad: *const C_tensor) -> *mut c_char;
    fn weaver_set_data(param: *const C_tensor, data: *const C_tensor) -> *mut c_char;
    fn weaver_backward(
        outputs: *const *const C_tensor,
        grads: *const *const C_tensor,
        n: usize,
    ) -> *mut c_char;
}

/// Turns the shim's return value into a result (and frees the message).
fn check(e: *mut c_char) -> Result<(), TchError> {
    if e.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim, read once
    // here and then freed by the shim's own deallocator.
    let msg = unsafe {
        let m = CStr::from_ptr(e).to_string_lossy().into_owned();
        weaver_free_error(e);
        m
    };
    Err(TchError::Torch(msg))
}

fn ptrs(ts: &[Tensor]) -> Vec<*const C_tensor> {
    ts.iter().map(|t| t.as_ptr()).collect()
}

/// Hyper-parameters of one fused AdamW call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWArgs {
    /// Learning rate.
    pub lr: f64,
    /// beta1.
    pub beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// Decoupled weight decay of these tensors.
    pub weight_decay: f64,
    /// epsilon.
    pub eps: f64,
}

/// One AdamW update of `params` in place (`at::_fused_adamw_`): decay `p ← p·(1 − lr·wd)`,
/// `m ← lerp(m, g, 1 − β1)`, `v ← β2·v + (1 − β2)·g²`,
/// `p ← p − (lr / bc1)·m / (√v / √bc2 + ε)` with the bias corrections of step `step` (a
/// one-element f32 tensor on the tensors' device, not advanced here). With `grad_scale`, each
/// gradient is divided by it first (and stored back divided). The four lists have equal
/// lengths and matching shapes, dtypes and devices.
pub fn fused_adamw(
    params: &[Tensor],
    grads: &[Tensor],
    exp_avgs: &[Tensor],
    exp_avg_sqs: &[Tensor],
    step: &Tensor,
    args: AdamWArgs,
    grad_scale: Option<&Tensor>,
) -> Result<(), TchError> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        return Err(TchError::Shape(format!(
            "fused_adamw: {n} params, {} grads, {} exp_avgs, {} exp_avg_sqs",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    // ATen's CPU kernel trusts its inputs (it walks `param.numel()` elements of every
    // tensor): check what it does not.
    let device = params[0].device();
    for i in 0..n {
        let t = [&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]];
        for x in t {
            if x.size() != params[i].size()
                || x.kind() != params[i].kind()
                || x.device() != device
                || !x.is_contiguous()
            {
                return Err(TchError::Shape(format!(
                    "fused_adamw: tensor {i}: param {:?} {:?} on {:?}; got {:?} {:?} on {:?} (contiguous: {})",
                    params[i].size(),
                    params[i].kind(),
                    device,
                    x.size(),
                    x.kind(),
                    x.device(),
                    x.is_contiguous()
                )));
            }
        }
    }
    for (what, s) in std::iter::once(("step", step)).chain(grad_scale.map(|g| ("grad_scale", g))) {
        if s.numel() != 1 || s.kind() != tch::Kind::Float || s.device() != device {
            return Err(TchError::Shape(format!(
                "fused_adamw: {what} must be one f32 element on {device:?}, got {:?} {:?} on {:?}",
                s.size(),
                s.kind(),
                s.device()
            )));
        }
    }
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let scale = grad_scale.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a live tch tensor borrowed for the duration of the call (the
    // slices and `step`/`grad_scale` outlive it); the four arrays hold `n` entries each; the
    // shim only reads the handles and catches every C++ exception.
    check(unsafe {
        weaver_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            n,
            step.as_ptr(),
            args.lr,
            args.beta1,
            args.beta2,
            args.weight_decay,
            args.eps,
            scale,
        )
    })
}

/// The 2-norm of each tensor (`torch._foreach_norm`: one multi-tensor kernel on CUDA), as
/// 0-dim tensors on their device (no host read).
pub fn foreach_norm(ts: &[Tensor]) -> Result<Vec<Tensor>, TchError> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let p = ptrs(ts);
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); ts.len()];
    // SAFETY: `p` holds `ts.len()` live handles; `out` has room for as many results, which
    // the shim fills with new heap tensors on success only.
    check(unsafe { weaver_foreach_norm(p.as_ptr(), p.len(), out.as_mut_ptr()) })?;
    Ok(out
        .into_iter()
        // SAFETY: each entry is a tensor the shim allocated for us; tch takes ownership and
        // frees it on drop.
        .map(|t| unsafe { Tensor::from_ptr(t) })
        .collect())
}

/// Makes `grad` the gradient of `param`: later backward passes add into it in place. The
/// caller keeps `grad`'s storage as the gradient's home (a view of a flat bucket).
pub fn set_grad(param: &Tensor, grad: &Tensor) -> Result<(), TchError> {
    // SAFETY: both handles are live for the call; the shim assigns the gradient slot of
    // `param`'s tensor implementation, which every handle to that parameter shares.
    check(unsafe { weaver_set_grad(param.as_ptr(), grad.as_ptr()) })
}

/// Points `param` at `data`'s storage (same shape and dtype), keeping its autograd identity:
/// every handle to the parameter (the model's layers hold shallow clones) sees the move.
pub fn set_data(param: &Tensor, data: &Tensor) -> Result<(), TchError> {
    if param.size() != data.size() || param.kind() != data.kind() {
        return Err(TchError::Shape(format!(
            "set_data: parameter {:?} {:?}, data {:?} {:?}",
            param.size(),
            param.kind(),
            data.size(),
            data.kind()
        )));
    }
    // SAFETY: both handles are live for the call; `set_data` swaps the storage of `param`'s
    // implementation for `data`'s (shape and dtype checked above).
    check(unsafe { weaver_set_data(param.as_ptr(), data.as_ptr()) })
}

/// One autograd pass from `outputs`, each seeded with its gradient (same shape; converted to
/// the output's dtype here). Outputs that do not require grad are skipped.
pub fn backward(pairs: &[(Tensor, Tensor)]) -> Result<(), TchError> {
    let mut outs = Vec::with_capacity(pairs.len());
    let mut grads = Vec::with_capacity(pairs.len());
    for (o, g) in pairs {
        if !o.requires_grad() {
            continue;
        }
        let g = if g.kind() == o.kind() {
            g.shallow_clone()
        } else {
            g.f_to_kind(o.kind())?
        };
        outs.push(o.shallow_clone());
        grads.push(g);
    }
    if outs.is_empty() {
        return Ok(());
    }
    let (o, g) = (ptrs(&outs), ptrs(&grads));
    // SAFETY: `outs` and `grads` keep `o.len()` live handles each for the call.
    check(unsafe { weaver_backward(o.as_ptr(), g.as_ptr(), o.len()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn autograd_accumulates_into_a_bucket_view_in_place() {
        let flat = Tensor::zeros([6], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([2, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        set_grad(&w, &flat.narrow(0, 0, 6).view([2, 3])).unwrap();
        for _ in 0..2 {
            (&w * 2.0).sum(Kind::Float).backward();
        }
        assert_eq!(Vec::<f32>::try_from(&flat).unwrap(), vec![4.0; 6]);
    }

    #[test]
    fn bf16_parameters_accumulate_into_an_f32_bucket() {
        let flat = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([4], (Kind::BFloat16, Device::Cpu)).set_requires_grad(true);
        set_grad(&w, &flat).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 1.0 / 3.0, 1e-3, 3.0]).to_kind(Kind::BFloat16);
        for _ in 0..3 {
            (&w * &x).sum(Kind::Float).backward();
        }
        // Each bf16 gradient is added to the f32 buffer: three bf16 contributions, summed
        // in f32 (a bf16 running sum would round after each).
        let once = x.to_kind(Kind::Float);
        let want = &once + &once + &once;
        assert!(flat.equal(&want), "{flat:?} vs {want:?}");
        assert_eq!(w.grad().kind(), Kind::Float);
    }

    #[test]
    fn set_data_moves_a_parameter_into_a_flat_buffer() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let alias = w.shallow_clone();
        let flat = Tensor::zeros([5], (Kind::Float, Device::Cpu));
        let view = flat.narrow(0, 3, 2);
        tch::no_grad(|| view.shallow_clone().copy_(&w));
        set_data(&w, &view).unwrap();
        let _ = tch::no_grad(|| flat.shallow_clone().fill_(7.0));
        assert_eq!(Vec::<f32>::try_from(&alias).unwrap(), vec![7.0, 7.0]);
        assert!(alias.requires_grad());
    }

    #[test]
    fn seeded_backward_equals_the_product_trick() {
        let x = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let y = x.square();
        let g = Tensor::from_slice(&[0.3f32, 0.1, -4.0]);
        backward(&[(y, g.shallow_clone())]).unwrap();
        let x2 = x.detach().set_requires_grad(true);
        (x2.square() * &g).sum(Kind::Float).backward();
        assert!(x.grad().equal(&x2.grad()));
    }

    #[test]
    fn foreach_norm_matches_norm() {
        let a = Tensor::from_slice(&[3.0f32, 4.0]);
        let b = Tensor::from_slice(&[1.0f32]);
        let n = foreach_norm(&[a, b]).unwrap();
        assert_eq!(n[0].double_value(&[]), 5.0);
        assert_eq!(n[1].double_value(&[]), 1.0);
    }

    #[test]
    fn mismatched_adamw_inputs_are_refused_before_the_kernel() {
        let a = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let step = Tensor::from_slice(&[1.0f32]);
        let args = AdamWArgs {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            eps: 1e-8,
        };
        let e = fused_adamw(
            &[a.shallow_clone()],
            &[b],
            &[a.shallow_clone()],
            &[a],
            &step,
            args,
            None,
        );
        assert!(matches!(e, Err(TchError::Shape(_))), "{e:?}");
    }

    #[test]
    fn shim_errors_are_torch_errors() {
        let ints = Tensor::from_slice(&[1i64, 2]);
        let e = foreach_norm(&[ints]);
        assert!(matches!(e, Err(TchError::Torch(_))), "{e:?}");
    }
}
