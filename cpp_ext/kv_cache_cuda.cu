// CUDA kernels of hallolive_kv, launched on the caller's current stream.
//
// Graph safety: the slot offset is read by the kernel from device memory (offset[0]); nothing here reads a
// tensor value on the host, so a CUDA graph captured once serves every block while the runtime copies the
// next offset into the same tensor between replays. The flip side: a plain (ring_size == 0) write past the
// end of the cache, or a negative offset, cannot raise without a sync; such rows are DROPPED (never written
// out of bounds). The CPU kernel refuses them loudly, and the runtime's cache policy keeps them in range.
//
// Only the light c10 CUDA headers are included (c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream re-exports); ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers
// that a minimal toolkit does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "checks.h"

namespace hallolive_kv {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover anything larger

// P interleaved pairs (2P elements) moved as one aligned vector: 16 bytes for P=4 half/bf16 or P=2 float.
// P=1 is the fallback for unaligned rows and only assumes element alignment (two scalar accesses).
template <typename T, int P>
struct alignas(P == 1 ? sizeof(T) : sizeof(T) * 2 * P) Pack {
  T v[2 * P];
};

template <typename T, int P>
__device__ __forceinline__ void rotate_pack(Pack<T, P>& x, const float* __restrict__ c,
                                            const float* __restrict__ s) {
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const float x0 = static_cast<float>(x.v[2 * p]);
    const float x1 = static_cast<float>(x.v[2 * p + 1]);
    x.v[2 * p] = static_cast<T>(x0 * c[p] - x1 * s[p]);
    x.v[2 * p + 1] = static_cast<T>(x0 * s[p] + x1 * c[p]);
  }
}

// One thread per pack of a (b, n, h) row. ROPE=false ignores cos/sin (plain write_block).
template <typename T, int P, bool ROPE>
__global__ void write_block_kernel(T* __restrict__ cache, const T* __restrict__ src, const float* __restrict__ cos,
                                   const float* __restrict__ sin, const int64_t* __restrict__ offset,
                                   int64_t ring_start, int64_t ring_size, int64_t B, int64_t N, int64_t H,
                                   int64_t D, int64_t S, int64_t sb, int64_t sn, int64_t sh) {
  const int64_t packs = D / (2 * P);
  const int64_t total = B * N * H * packs;
  const int64_t base = offset[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % packs;
    const int64_t r = i / packs;
    const int64_t h = r % H, n = (r / H) % N, b = r / (H * N);
    const int64_t slot = map_slot(base + n, ring_start, ring_size);
    if (slot < 0 || slot >= S) continue;  // out of range: dropped, see the header comment
    Pack<T, P> x = *reinterpret_cast<const Pack<T, P>*>(src + b * sb + n * sn + h * sh + j * 2 * P);
    if constexpr (ROPE) {
      rotate_pack<T, P>(x, cos + n * (D / 2) + j * P, sin + n * (D / 2) + j * P);
    }
    *reinterpret_cast<Pack<T, P>*>(cache + ((b * S + slot) * H + h) * D + j * 2 * P) = x;
  }
}

template <typename T, int P>
__global__ void rerotate_kernel(T* __restrict__ cache, const float* __restrict__ cos, const float* __restrict__ sin,
                                int64_t start, int64_t length, int64_t B, int64_t H, int64_t D, int64_t S) {
  const int64_t packs = D / (2 * P);
  const int64_t total = B * length * H * packs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % packs;
    const int64_t r = i / packs;
    const int64_t h = r % H, row = (r / H) % length, b = r / (H * length);
    auto* ptr = reinterpret_cast<Pack<T, P>*>(cache + ((b * S + start + row) * H + h) * D + j * 2 * P);
    Pack<T, P> x = *ptr;
    rotate_pack<T, P>(x, cos + row * (D / 2) + j * P, sin + row * (D / 2) + j * P);
    *ptr = x;
  }
}

// Widest pack (<= 16 bytes) that divides D and every row start: base pointers and strides, in elements.
template <typename T>
int pick_pairs(int64_t D, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  for (int p = static_cast<int>(8 / sizeof(T)); p > 1; p /= 2) {
    const int64_t elems = 2 * p;
    bool ok = D % elems == 0;
    for (const void* q : ptrs) ok = ok && reinterpret_cast<uintptr_t>(q) % (elems * sizeof(T)) == 0;
    for (int64_t st : strides) ok = ok && st % elems == 0;
    if (ok) return p;
  }
  return 1;
}

int64_t grid_for(int64_t total) {
  return std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
}

template <typename T, bool ROPE>
void launch_write(const at::Tensor& cache, const at::Tensor& src, const float* cos, const float* sin,
                  const at::Tensor& offset, int64_t ring_start, int64_t ring_size) {
  const int64_t B = src.size(0), N = src.size(1), H = src.size(2), D = src.size(3), S = cache.size(1);
  const int64_t sb = src.stride(0), sn = src.stride(1), sh = src.stride(2);
  T* dst = cache.data_ptr<T>();
  const T* in = src.data_ptr<T>();
  const int p = pick_pairs<T>(D, {dst, in}, {sb, sn, sh});
  const int64_t total = B * N * H * (D / (2 * p));
  if (total == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cache.device().index()).stream();
  const int64_t* off = offset.data_ptr<int64_t>();
#define HKV_LAUNCH_WRITE(PP)                                                                          \
  write_block_kernel<T, PP, ROPE><<<grid_for(total), kThreads, 0, stream>>>(                          \
      dst, in, cos, sin, off, ring_start, ring_size, B, N, H, D, S, sb, sn, sh)
  switch (p) {
    case 4: HKV_LAUNCH_WRITE(4); break;
    case 2: HKV_LAUNCH_WRITE(2); break;
    default: HKV_LAUNCH_WRITE(1); break;
  }
#undef HKV_LAUNCH_WRITE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write_block_cuda(at::Tensor& cache, const at::Tensor& src, const at::Tensor& offset, int64_t ring_start,
                      int64_t ring_size) {
  constexpr const char* op = "hallolive_kv::write_block";
  validate_write_block(op, cache, src, offset, ring_start, ring_size);
  const c10::cuda::CUDAGuard guard(cache.device());
  dispatch_cache_dtype(op, cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_write<scalar_t, false>(cache, src, nullptr, nullptr, offset, ring_start, ring_size);
  });
}

void rope_write_block_cuda(at::Tensor& cache, const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& offset, int64_t ring_start, int64_t ring_size) {
  constexpr const char* op = "hallolive_kv::rope_write_block";
  validate_rope_write_block(op, cache, src, cos, sin, offset, ring_start, ring_size);
  const c10::cuda::CUDAGuard guard(cache.device());
  dispatch_cache_dtype(op, cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_write<scalar_t, true>(cache, src, cos.data_ptr<float>(), sin.data_ptr<float>(), offset, ring_start,
                                 ring_size);
  });
}

void rerotate_cuda(at::Tensor& cache, const at::Tensor& cos_delta, const at::Tensor& sin_delta, int64_t start,
                   int64_t length) {
  constexpr const char* op = "hallolive_kv::rerotate";
  validate_rerotate(op, cache, cos_delta, sin_delta, start, length);
  const c10::cuda::CUDAGuard guard(cache.device());
  const int64_t B = cache.size(0), S = cache.size(1), H = cache.size(2), D = cache.size(3);
  const float* c = cos_delta.data_ptr<float>();
  const float* s = sin_delta.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cache.device().index()).stream();
  dispatch_cache_dtype(op, cache.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = cache.data_ptr<scalar_t>();
    // Row starts are multiples of D from an aligned allocation, so only D and the base pointer matter.
    const int p = pick_pairs<scalar_t>(D, {base}, {});
    const int64_t total = B * length * H * (D / (2 * p));
    if (total == 0) return;
    switch (p) {
      case 4: rerotate_kernel<scalar_t, 4><<<grid_for(total), kThreads, 0, stream>>>(base, c, s, start, length, B, H, D, S); break;
      case 2: rerotate_kernel<scalar_t, 2><<<grid_for(total), kThreads, 0, stream>>>(base, c, s, start, length, B, H, D, S); break;
      default: rerotate_kernel<scalar_t, 1><<<grid_for(total), kThreads, 0, stream>>>(base, c, s, start, length, B, H, D, S); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(hallolive_kv, CUDA, m) {
  m.impl("write_block", &write_block_cuda);
  m.impl("rope_write_block", &rope_write_block_cuda);
  m.impl("rerotate", &rerotate_cuda);
}

}  // namespace hallolive_kv
