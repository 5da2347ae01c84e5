// libtorch's fused AdamW (`torch.optim.AdamW(fused=True)`), which tch does not expose: one
// pass over each parameter, its gradient and both moments, instead of the eight tensor ops of
// the single-tensor update. On the 22.7M parameters of a 6-layer BERT it takes 14 ms where the
// single-tensor update takes 60 ms (bench/finetune_profile.py). Exceptions must not cross into
// Rust.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <vector>

namespace {
std::vector<at::Tensor> list(void *const *tensors, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<at::Tensor *>(tensors[i]));
  }
  return out;
}
} // namespace

// Each array holds `n` at::Tensor* (tch's C_tensor): parameters, their gradients, first and
// second moments, and the step count each update uses (a float scalar tensor per parameter,
// already incremented for this step). Returns 0, or 1 if libtorch refused.
extern "C" int ferry_fused_adamw(void *const *params, void *const *grads, void *const *exp_avgs,
                                 void *const *exp_avg_sqs, void *const *steps, int64_t n,
                                 double lr, double beta1, double beta2, double weight_decay,
                                 double eps) {
  try {
    c10::NoGradGuard no_grad;
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n),
                      {}, list(steps, n), lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  } catch (...) {
    return 1;
  }
}
