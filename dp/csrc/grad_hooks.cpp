// A hook that runs once a parameter's gradient is final in the backward pass, for the
// all-reduce overlapped with backward (dp/src/overlap.rs). tch exposes no
// autograd hooks; libtorch's post-accumulate-grad hook is the one DDP-style bucketing needs:
// it fires after AccumulateGrad has added this backward's gradient into `.grad`.
// Exceptions must not cross into Rust.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>

typedef void (*ferry_grad_ready_fn)(void *ctx, int64_t index);

namespace {
struct GradReady : torch::autograd::PostAccumulateGradHook {
  ferry_grad_ready_fn fn;
  void *ctx;
  int64_t index;
  GradReady(ferry_grad_ready_fn f, void *c, int64_t i) : fn(f), ctx(c), index(i) {}
  void operator()(const torch::autograd::Variable &) override { fn(ctx, index); }
};
} // namespace

// Sets (fn non-null) or clears (fn null) the hook of the leaf tensor `tensor` (an at::Tensor*,
// as tch's C_tensor is). A tensor holds one such hook: setting replaces the previous one.
extern "C" int ferry_set_grad_ready_hook(void *tensor, ferry_grad_ready_fn fn, void *ctx,
                                         int64_t index) {
  try {
    const at::Tensor &t = *static_cast<at::Tensor *>(tensor);
    if (fn == nullptr) {
      torch::autograd::impl::set_post_acc_grad_hooks(t, nullptr);
    } else {
      torch::autograd::impl::set_post_acc_grad_hooks(
          t, std::make_unique<GradReady>(fn, ctx, index));
    }
    return 0;
  } catch (...) {
    return 1;
  }
}
