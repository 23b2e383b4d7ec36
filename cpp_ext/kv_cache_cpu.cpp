// CPU kernels of hallolive_kv: always built, so CPU CI checks the exact semantics the CUDA kernels follow.
//
// Unlike CUDA, the CPU kernel can read the offset without a device sync, so it also refuses a plain
// (ring_size == 0) write that would run past the end of the cache, or a negative offset.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace hallolive_kv {
namespace {

// Rows are (b, n, h) head vectors of D elements; one grain is enough rows to amortise a task.
constexpr int64_t kGrainRows = 256;

// Rotates D/2 interleaved pairs of `in` into `out` with per-pair cos/sin (may alias: pair-local math).
template <typename T>
inline void rotate_row(const T* in, T* out, const float* c, const float* s, int64_t half) {
  for (int64_t k = 0; k < half; ++k) {
    const float x0 = static_cast<float>(in[2 * k]);
    const float x1 = static_cast<float>(in[2 * k + 1]);
    out[2 * k] = static_cast<T>(x0 * c[k] - x1 * s[k]);
    out[2 * k + 1] = static_cast<T>(x0 * s[k] + x1 * c[k]);
  }
}

int64_t checked_offset(const char* op, const at::Tensor& offset, int64_t n, int64_t s, int64_t ring_size) {
  const int64_t off = offset.data_ptr<int64_t>()[0];
  TORCH_CHECK(off >= 0, op, ": `offset` must be >= 0, got ", off);
  TORCH_CHECK(ring_size > 0 || off + n <= s, op, ": without a ring (ring_size=0) the block [offset=", off,
              ", offset+N=", off + n, ") must fit in the cache's S=", s, " slots");
  return off;
}

// Shared body of write_block and rope_write_block; cos/sin are null for the plain write.
void write_rows(const at::Tensor& cache, const at::Tensor& src, const float* cos,
                const float* sin, int64_t off, int64_t ring_start, int64_t ring_size) {
  const int64_t B = src.size(0), N = src.size(1), H = src.size(2), D = src.size(3);
  const int64_t S = cache.size(1), half = D / 2;
  const int64_t sb = src.stride(0), sn = src.stride(1), sh = src.stride(2);
  dispatch_cache_dtype("hallolive_kv::write_rows", cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* dst_base = cache.data_ptr<scalar_t>();
    const scalar_t* src_base = src.data_ptr<scalar_t>();
    at::parallel_for(0, B * N * H, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t h = r % H, n = (r / H) % N, b = r / (H * N);
        const int64_t slot = map_slot(off + n, ring_start, ring_size);
        const scalar_t* in = src_base + b * sb + n * sn + h * sh;
        scalar_t* out = dst_base + ((b * S + slot) * H + h) * D;
        if (cos == nullptr) {
          std::copy(in, in + D, out);
        } else {
          rotate_row(in, out, cos + n * half, sin + n * half, half);
        }
      }
    });
  });
}

void write_block_cpu(at::Tensor& cache, const at::Tensor& src, const at::Tensor& offset, int64_t ring_start,
                     int64_t ring_size) {
  constexpr const char* op = "hallolive_kv::write_block";
  validate_write_block(op, cache, src, offset, ring_start, ring_size);
  const int64_t off = checked_offset(op, offset, src.size(1), cache.size(1), ring_size);
  write_rows(cache, src, nullptr, nullptr, off, ring_start, ring_size);
}

void rope_write_block_cpu(at::Tensor& cache, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& offset, int64_t ring_start, int64_t ring_size) {
  constexpr const char* op = "hallolive_kv::rope_write_block";
  validate_rope_write_block(op, cache, src, cos, sin, offset, ring_start, ring_size);
  const int64_t off = checked_offset(op, offset, src.size(1), cache.size(1), ring_size);
  write_rows(cache, src, cos.data_ptr<float>(), sin.data_ptr<float>(), off, ring_start, ring_size);
}

void rerotate_cpu(at::Tensor& cache, const at::Tensor& cos_delta, const at::Tensor& sin_delta, int64_t start,
                  int64_t length) {
  constexpr const char* op = "hallolive_kv::rerotate";
  validate_rerotate(op, cache, cos_delta, sin_delta, start, length);
  const int64_t B = cache.size(0), S = cache.size(1), H = cache.size(2), D = cache.size(3), half = D / 2;
  const float* c = cos_delta.data_ptr<float>();
  const float* s = sin_delta.data_ptr<float>();
  dispatch_cache_dtype(op, cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = cache.data_ptr<scalar_t>();
    at::parallel_for(0, B * length * H, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t h = r % H, i = (r / H) % length, b = r / (H * length);
        scalar_t* row = base + ((b * S + start + i) * H + h) * D;
        rotate_row(row, row, c + i * half, s + i * half, half);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hallolive_kv, CPU, m) {
  m.impl("write_block", &write_block_cpu);
  m.impl("rope_write_block", &rope_write_block_cpu);
  m.impl("rerotate", &rerotate_cpu);
}

}  // namespace hallolive_kv
