// The few libtorch calls tch 0.24 does not expose, for the optimizer over flat buffers and
// the segmented backward (worker/src/shim.rs is the Rust side; see its module docs).
//
// Every function takes tch's tensor handles (`at::Tensor*`), never throws across the C
// boundary (a C++ exception becomes a message the caller frees with weaver_free_error), and
// returns nullptr on success.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

char* error_of(const char* what) {
  char* out = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) {
    std::strcpy(out, what);
  }
  return out;
}

std::vector<at::Tensor> list_of(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return error_of(e.what());
  } catch (...) {
    return error_of("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

void weaver_free_error(char* e) { std::free(e); }

// AdamW (decoupled decay) over n tensors with one step count (a 1-element f32 tensor on
// their device), optionally dividing every gradient by grad_scale (a 1-element f32 tensor)
// first: at::_fused_adamw_, one multi-tensor kernel on CUDA, one vectorised parallel pass
// per tensor on CPU.
char* weaver_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                         at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs, size_t n,
                         const at::Tensor* step, double lr, double beta1, double beta2,
                         double weight_decay, double eps, const at::Tensor* grad_scale) {
  return guarded([&] {
    std::vector<at::Tensor> steps(n, *step);
    std::optional<at::Tensor> scale;
    if (grad_scale != nullptr) {
      scale = *grad_scale;
    }
    at::_fused_adamw_(list_of(params, n), list_of(grads, n), list_of(exp_avgs, n),
                      list_of(exp_avg_sqs, n), {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, scale, std::nullopt);
  });
}

// The 2-norm of each of n tensors, as n new 0-dim tensors written to out (the caller owns
// them).
char* weaver_foreach_norm(at::Tensor* const* ts, size_t n, at::Tensor** out) {
  return guarded([&] {
    std::vector<at::Tensor> norms = at::_foreach_norm(list_of(ts, n), 2);
    for (size_t i = 0; i < n; ++i) {
      out[i] = new at::Tensor(std::move(norms[i]));
    }
  });
}

// Makes `grad` the gradient of `param` (PyTorch DDP's gradient_as_bucket_view): autograd then
// adds into it in place.
char* weaver_set_grad(const at::Tensor* param, const at::Tensor* grad) {
  return guarded([&] { param->mutable_grad() = *grad; });
}

// Points `param` at `data`'s storage (`param.data = data`), keeping its autograd identity.
char* weaver_set_data(const at::Tensor* param, const at::Tensor* data) {
  return guarded([&] { param->set_data(*data); });
}

// One autograd pass from n tensors seeded with their gradients (torch.autograd.backward).
char* weaver_backward(at::Tensor* const* outputs, at::Tensor* const* grads, size_t n) {
  return guarded([&] {
    torch::autograd::backward(list_of(outputs, n), list_of(grads, n));
  });
}

}  // extern "C"
