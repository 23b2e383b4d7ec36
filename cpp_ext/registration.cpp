// Schemas of the hallolive_kv operators. Device kernels register separately (kv_cache_cpu.cpp always,
// kv_cache_cuda.cu when CUDA is built); the fake (meta) kernels that torch.compile and opcheck need are
// registered in Python, in the module named by set_python_module below.
//
// `Tensor(a!) cache` tells the dispatcher, functionalization and torch.compile that the op writes into
// `cache` in place and returns nothing; every other tensor argument is read only.
#include <torch/library.h>

TORCH_LIBRARY(hallolive_kv, m) {
  m.set_python_module("hallolive_rt.kvcache.ops");
  // cache [B, S, H, D] <- src [B, N, H, D] at logical slots offset[0] + n, n < N (see map_slot in checks.h).
  m.def("write_block(Tensor(a!) cache, Tensor src, Tensor offset, int ring_start, int ring_size) -> ()");
  // Same, with interleaved-pair RoPE applied to src on the way in (fp32 math, one pass over memory).
  m.def(
      "rope_write_block(Tensor(a!) cache, Tensor src, Tensor cos, Tensor sin, Tensor offset, "
      "int ring_start, int ring_size) -> ()");
  // Rotate cached, already-rotated rows [start, start + length) by a per-row position delta in place.
  m.def("rerotate(Tensor(a!) cache, Tensor cos_delta, Tensor sin_delta, int start, int length) -> ()");
}
