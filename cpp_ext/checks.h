// Boundary checks and the slot mapping shared by the CPU and CUDA kernels of hallolive_kv.
//
// Every check names the op, the argument, what was expected and what arrived, so a wrong call from the
// DiT fails at the op boundary with a sentence instead of a bad memory access inside a kernel. Only host
// metadata (shapes, dtypes, devices, strides, integer arguments) is inspected here: reading the `offset`
// tensor's value would be a device-to-host sync on CUDA, so range checks that need it live in the CPU
// kernel only (see kv_cache_cpu.cpp and README.md).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define HKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HKV_HOST_DEVICE inline
#endif

namespace hallolive_kv {

// "torch.float32", as Python prints a dtype, so C++ and fake-kernel messages read the same.
inline std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Logical slot -> physical slot. Slots below ring_start (the sink) are never wrapped; slots at or past
// ring_start wrap inside [ring_start, ring_start + ring_size). ring_size == 0 means no ring at all.
// The logical offset may therefore grow without bound while the physical slot stays inside the cache.
HKV_HOST_DEVICE int64_t map_slot(int64_t logical, int64_t ring_start, int64_t ring_size) {
  if (ring_size > 0 && logical >= ring_start) {
    return ring_start + (logical - ring_start) % ring_size;
  }
  return logical;
}

// [B, S, H, D] cache: contiguous (kernels index it as dense rows), floating dtype we compile, even D
// (RoPE rotates interleaved pairs (2k, 2k+1)).
inline void check_cache(const char* op, const at::Tensor& cache) {
  TORCH_CHECK(cache.dim() == 4, op, ": `cache` must be 4-D [B, S, H, D], got shape ", cache.sizes());
  const auto dt = cache.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": `cache` dtype must be float32, bfloat16 or float16, got ", dtype_name(dt));
  TORCH_CHECK(cache.is_contiguous(), op, ": `cache` must be contiguous [B, S, H, D], got strides ",
              cache.strides(), " for shape ", cache.sizes());
  TORCH_CHECK(cache.size(3) % 2 == 0, op, ": `cache` head_dim D must be even (RoPE pairs), got D=",
              cache.size(3));
}

// [B, N, H, D] block to write: B, H, D and dtype and device of the cache; any strides except the last
// (a K slice of a fused QKV output is fine), last-dim stride 1 so a head row is a dense vector.
inline void check_block(const char* op, const at::Tensor& src, const at::Tensor& cache) {
  TORCH_CHECK(src.dim() == 4, op, ": `src` must be 4-D [B, N, H, D], got shape ", src.sizes());
  TORCH_CHECK(src.size(0) == cache.size(0) && src.size(2) == cache.size(2) && src.size(3) == cache.size(3),
              op, ": `src` must have shape [B=", cache.size(0), ", N, H=", cache.size(2), ", D=", cache.size(3),
              "] to match `cache` ", cache.sizes(), ", got ", src.sizes());
  TORCH_CHECK(src.scalar_type() == cache.scalar_type(), op, ": `src` dtype must equal `cache` dtype ",
              dtype_name(cache.scalar_type()), ", got ", dtype_name(src.scalar_type()));
  TORCH_CHECK(src.device() == cache.device(), op, ": `src` must be on `cache`'s device ", cache.device(),
              ", got ", src.device());
  TORCH_CHECK(src.size(3) <= 1 || src.stride(3) == 1, op,
              ": `src` last dimension must be contiguous (stride 1), got strides ", src.strides());
}

// The slot offset lives in a device tensor so one captured graph serves every block.
inline void check_offset(const char* op, const at::Tensor& offset, const at::Tensor& cache) {
  TORCH_CHECK(offset.scalar_type() == at::kLong, op, ": `offset` dtype must be int64, got ",
              dtype_name(offset.scalar_type()));
  TORCH_CHECK(offset.dim() == 1 && offset.size(0) == 1, op, ": `offset` must have shape [1], got ",
              offset.sizes());
  TORCH_CHECK(offset.device() == cache.device(), op, ": `offset` must be on `cache`'s device ",
              cache.device(), " (a host offset cannot change between CUDA graph replays), got ",
              offset.device());
}

// Ring geometry is static (Python ints), so it is checked on every device.
inline void check_ring(const char* op, int64_t ring_start, int64_t ring_size, int64_t n, int64_t s) {
  TORCH_CHECK(ring_start >= 0 && ring_size >= 0, op,
              ": `ring_start` and `ring_size` must be >= 0, got ring_start=", ring_start,
              ", ring_size=", ring_size);
  TORCH_CHECK(ring_start + ring_size <= s, op, ": ring [ring_start=", ring_start, ", ring_start+ring_size=",
              ring_start + ring_size, ") must fit in the cache's S=", s, " slots");
  TORCH_CHECK(ring_size == 0 || n <= ring_size, op, ": a block of N=", n,
              " rows would overwrite itself in a ring of ring_size=", ring_size, " slots");
}

// cos/sin tables, already gathered per row: [rows, D/2] float32, contiguous, on the cache's device.
inline void check_table(const char* op, const char* name, const at::Tensor& t, int64_t rows,
                        const at::Tensor& cache) {
  const int64_t half = cache.size(3) / 2;
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == half, op, ": `", name,
              "` must have shape [", rows, ", ", half, "] (rows, D/2), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` dtype must be float32, got ",
              dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == cache.device(), op, ": `", name, "` must be on `cache`'s device ",
              cache.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous, got strides ", t.strides());
}

inline void check_rows(const char* op, int64_t start, int64_t length, int64_t s) {
  TORCH_CHECK(start >= 0 && length >= 0 && start + length <= s, op, ": rows [start=", start,
              ", start+length=", start + length, ") must lie inside the cache's S=", s, " slots");
}

// Calls f(T{}) for the cache dtypes we compile (float, bfloat16, half) and nothing else: unlike
// AT_DISPATCH_FLOATING_TYPES_AND2 no double kernels are instantiated for a dtype check_cache refuses.
template <typename F>
void dispatch_cache_dtype(const char* op, at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported cache dtype ", dtype_name(t));
  }
}

// Whole-op validators: the CPU and CUDA kernels call exactly these, so both devices refuse the same calls.
inline void validate_write_block(const char* op, const at::Tensor& cache, const at::Tensor& src,
                                 const at::Tensor& offset, int64_t ring_start, int64_t ring_size) {
  check_cache(op, cache);
  check_block(op, src, cache);
  check_offset(op, offset, cache);
  check_ring(op, ring_start, ring_size, src.size(1), cache.size(1));
}

inline void validate_rope_write_block(const char* op, const at::Tensor& cache, const at::Tensor& src,
                                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& offset,
                                      int64_t ring_start, int64_t ring_size) {
  validate_write_block(op, cache, src, offset, ring_start, ring_size);
  check_table(op, "cos", cos, src.size(1), cache);
  check_table(op, "sin", sin, src.size(1), cache);
}

inline void validate_rerotate(const char* op, const at::Tensor& cache, const at::Tensor& cos_delta,
                              const at::Tensor& sin_delta, int64_t start, int64_t length) {
  check_cache(op, cache);
  check_rows(op, start, length, cache.size(1));
  check_table(op, "cos_delta", cos_delta, length, cache);
  check_table(op, "sin_delta", sin_delta, length, cache);
}

}  // namespace hallolive_kv
