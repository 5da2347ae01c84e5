// tch's `autocast` switches CUDA autocast on and off but cannot choose its dtype, and
// libtorch's default is float16, which would need loss scaling. This sets bfloat16, which has
// float32's exponent range and needs none. Exceptions must not cross into Rust.
#include <ATen/autocast_mode.h>

extern "C" int ferry_autocast_cuda_bf16() {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    return 0;
  } catch (...) {
    return 1;
  }
}
