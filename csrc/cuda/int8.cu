// CUDA INT8 quantize / dequantize, standalone and fused with the page gather / scatter.
//
// One warp per group: lanes load VEC contiguous values at a time (16 bytes when the data is
// 16-byte aligned, else one value), reduce the magnitude with shuffles, then quantize. The
// group math is kvops/int8.h, the same code the CPU runs, so both write the same bytes.
#include <cuda_runtime.h>

#include "common.cuh"
#include "kvops/abi.h"
#include "kvops/dtypes.h"
#include "kvops/index.h"
#include "kvops/int8.h"

namespace kvops {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Quantizes one group of group_size values (group_size % VEC == 0) with the calling warp.
template <typename T, int VEC>
__device__ __forceinline__ void quantize_group(const T* x,      // [group_size]
                                               int64_t group_size,
                                               int8_t* q,       // [group_size]
                                               float* scale,    // [1]
                                               int32_t* num_nonfinite, int lane) {
  using P = Pack<T, VEC>;
  using QP = Pack<int8_t, VEC>;
  // NOTE: magnitudes reduced as integer bits, as on the CPU (see Magnitude in kvops/int8.h).
  using M = Magnitude<T>;
  int32_t amax_bits = 0;
  for (int64_t i = lane * VEC; i < group_size; i += 32 * VEC) {
    const P p = *reinterpret_cast<const P*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int32_t a = M::of(p.v[j]);
      amax_bits = a > amax_bits ? a : amax_bits;
    }
  }
  amax_bits = warp_max(amax_bits);
  const bool nonfinite = amax_bits > M::kMaxFinite;
  const float amax = nonfinite ? 0.0f : M::value(static_cast<typename M::Bits>(amax_bits));
  const bool zero = nonfinite || group_is_zero(amax);
  if (lane == 0) {
    *scale = nonfinite ? bits_float(0x7FC00000u) : (zero ? 0.0f : group_scale(amax));
    if (nonfinite) atomicAdd(num_nonfinite, 1);
  }
  const float inv_scale = zero ? 0.0f : group_inv_scale(amax);
  for (int64_t i = lane * VEC; i < group_size; i += 32 * VEC) {
    const P p = *reinterpret_cast<const P*>(x + i);
    QP out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      out.v[j] = zero ? int8_t{0} : quantize_one(to_float(p.v[j]), inv_scale);
    }
    *reinterpret_cast<QP*>(q + i) = out;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void dequantize_group(const int8_t* q,  // [group_size]
                                                 float scale, int64_t group_size,
                                                 T* out,           // [group_size]
                                                 int lane) {
  using P = Pack<T, VEC>;
  using QP = Pack<int8_t, VEC>;
  for (int64_t i = lane * VEC; i < group_size; i += 32 * VEC) {
    const QP qp = *reinterpret_cast<const QP*>(q + i);
    P p;
#pragma unroll
    for (int j = 0; j < VEC; ++j) p.v[j] = from_float<T>(static_cast<float>(qp.v[j]) * scale);
    *reinterpret_cast<P*>(out + i) = p;
  }
}

// Grid: 1-D over blocks of kWarpsPerBlock warps; warps stride over the groups.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    quantize_kernel(const T* x, int64_t num_groups, int64_t group_size,  // x: [groups, size]
                    int8_t* q, float* scales,                           // [groups, size], [groups]
                    int32_t* num_nonfinite) {                           // [1]
  const int lane = threadIdx.x % 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; g < num_groups; g += num_warps) {
    quantize_group<T, VEC>(x + g * group_size, group_size, q + g * group_size, scales + g,
                           num_nonfinite, lane);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dequantize_kernel(const int8_t* q, const float* scales,  // [groups, size], [groups]
                      int64_t num_groups, int64_t group_size,
                      T* out) {                              // [groups, size]
  const int lane = threadIdx.x % 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t g = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; g < num_groups; g += num_warps) {
    dequantize_group<T, VEC>(q + g * group_size, scales[g], group_size, out + g * group_size,
                             lane);
  }
}

// Grid: x = page, y = kv, z = layer within the chunk; the block's warps stride over the run's
// groups.
template <typename T, int VEC, bool kQuantize>
__global__ void __launch_bounds__(kThreadsPerBlock)
    paged_int8_kernel(LayerChunk layers,        // [layers in chunk] -> [blocks.., page]
                      PagedGeom g,
                      const int64_t* block_ids,  // [num_pages]
                      int64_t group_size,
                      int8_t* q,                 // [num_layers, num_kv, num_pages, page]
                      float* scales,             // [num_layers, num_kv, num_pages, page / group]
                      int32_t* num_nonfinite) {  // [1]; unused when dequantizing
  const int64_t page = blockIdx.x;
  const int64_t kv = blockIdx.y;
  const int64_t layer = layers.first_layer + blockIdx.z;
  T* cache = static_cast<T*>(layers.ptrs[blockIdx.z]) + cache_run_offset(g, block_ids[page], kv);
  int8_t* q_run = q + gathered_run_offset(g, layer, kv, page);
  float* scale_run = scales + gathered_scale_offset(g, layer, kv, page, group_size);
  const int lane = threadIdx.x % 32;
  for (int64_t i = threadIdx.x / 32; i < g.page_elems / group_size; i += kWarpsPerBlock) {
    if (kQuantize) {
      quantize_group<T, VEC>(cache + i * group_size, group_size, q_run + i * group_size,
                             scale_run + i, num_nonfinite, lane);
    } else {
      dequantize_group<T, VEC>(q_run + i * group_size, scale_run[i], group_size,
                               cache + i * group_size, lane);
    }
  }
}

// 16-byte accesses need every group to start 16-byte aligned in every buffer.
bool aligned16(const void* p) { return (reinterpret_cast<uint64_t>(p) & 15) == 0; }

template <typename T>
int vec_for(int64_t group_size, const void* a, const void* b, const void* c) {
  constexpr int kVec = 16 / sizeof(T);
  const bool ok = group_size % kVec == 0 && aligned16(a) && aligned16(b) && aligned16(c);
  return ok ? kVec : 1;
}

template <typename T>
int vec_for_pages(const kvops_pages& p, int64_t group_size, const int8_t* q) {
  int vec = vec_for<T>(group_size, q, q, q);
  const int64_t bytes = static_cast<int64_t>(sizeof(T));
  if ((p.block_stride * bytes) % 16 || (p.kv_stride * bytes) % 16) vec = 1;
  for (int64_t i = 0; i < p.num_layers; ++i) {
    if (!aligned16(p.layer_ptrs[i])) vec = 1;
  }
  return vec;
}

// Blocks for a grid-stride kernel over num_groups warps' worth of work.
unsigned blocks_for(int64_t num_groups) {
  const int64_t blocks = (num_groups + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

template <bool kQuantize, typename T, int VEC>
int launch_paged(const kvops_pages& pages, int64_t group_size, int8_t* q, float* scales,
                 int32_t* num_nonfinite, cudaStream_t stream) {
  const PagedGeom g = geom_of(pages);
  return for_layer_chunks(pages, [&](const LayerChunk& chunk, int64_t num_layers) {
    const dim3 grid(static_cast<unsigned>(g.num_pages), static_cast<unsigned>(g.num_kv),
                    static_cast<unsigned>(num_layers));
    paged_int8_kernel<T, VEC, kQuantize><<<grid, kThreadsPerBlock, 0, stream>>>(
        chunk, g, pages.block_ids, group_size, q, scales, num_nonfinite);
  });
}

template <bool kQuantize>
int paged_int8(const kvops_pages* pages, int dtype, int64_t group_size, int8_t* q,
               float* scales, int32_t* num_nonfinite, const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || group_size <= 0 || pages->page_elems % group_size) {
    return kBadArgument;
  }
  if (pages->num_pages == 0) return kOk;
  DeviceGuard guard(static_cast<int>(exec->device));
  cudaStream_t stream = static_cast<cudaStream_t>(exec->stream);
  KVOPS_DISPATCH_FLOATING(dtype, {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec_for_pages<scalar_t>(*pages, group_size, q) == kVec) {
      return launch_paged<kQuantize, scalar_t, kVec>(*pages, group_size, q, scales,
                                                     num_nonfinite, stream);
    }
    return launch_paged<kQuantize, scalar_t, 1>(*pages, group_size, q, scales, num_nonfinite,
                                                stream);
  });
  return kOk;
}

}  // namespace
}  // namespace kvops

using namespace kvops;

extern "C" int kvops_quantize_int8(const void* x, int dtype, int64_t num_groups,
                                   int64_t group_size, int8_t* q, float* scales,
                                   int32_t* num_nonfinite, const kvops_exec* exec) {
  if (exec == nullptr || group_size <= 0 || num_groups < 0) return kBadArgument;
  if (num_groups == 0) return kOk;
  DeviceGuard guard(static_cast<int>(exec->device));
  cudaStream_t stream = static_cast<cudaStream_t>(exec->stream);
  const unsigned blocks = blocks_for(num_groups);
  KVOPS_DISPATCH_FLOATING(dtype, {
    const scalar_t* xs = static_cast<const scalar_t*>(x);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec_for<scalar_t>(group_size, x, q, q) == kVec) {
      quantize_kernel<scalar_t, kVec><<<blocks, kThreadsPerBlock, 0, stream>>>(
          xs, num_groups, group_size, q, scales, num_nonfinite);
    } else {
      quantize_kernel<scalar_t, 1><<<blocks, kThreadsPerBlock, 0, stream>>>(
          xs, num_groups, group_size, q, scales, num_nonfinite);
    }
  });
  return launch_status();
}

extern "C" int kvops_dequantize_int8(const int8_t* q, const float* scales, int64_t num_groups,
                                     int64_t group_size, int dtype, void* out,
                                     const kvops_exec* exec) {
  if (exec == nullptr || group_size <= 0 || num_groups < 0) return kBadArgument;
  if (num_groups == 0) return kOk;
  DeviceGuard guard(static_cast<int>(exec->device));
  cudaStream_t stream = static_cast<cudaStream_t>(exec->stream);
  const unsigned blocks = blocks_for(num_groups);
  KVOPS_DISPATCH_FLOATING(dtype, {
    scalar_t* os = static_cast<scalar_t*>(out);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec_for<scalar_t>(group_size, out, q, q) == kVec) {
      dequantize_kernel<scalar_t, kVec><<<blocks, kThreadsPerBlock, 0, stream>>>(
          q, scales, num_groups, group_size, os);
    } else {
      dequantize_kernel<scalar_t, 1><<<blocks, kThreadsPerBlock, 0, stream>>>(
          q, scales, num_groups, group_size, os);
    }
  });
  return launch_status();
}

extern "C" int kvops_gather_quantize(const kvops_pages* pages, int dtype, int64_t group_size,
                                     int8_t* q, float* scales, int32_t* num_nonfinite,
                                     const kvops_exec* exec) {
  if (num_nonfinite == nullptr) return kBadArgument;
  return paged_int8<true>(pages, dtype, group_size, q, scales, num_nonfinite, exec);
}

extern "C" int kvops_dequantize_scatter(const kvops_pages* pages, int dtype, int64_t group_size,
                                        const int8_t* q, const float* scales,
                                        const kvops_exec* exec) {
  // NOTE: the casts only let one kernel serve both directions; dequantizing never writes them.
  return paged_int8<false>(pages, dtype, group_size, const_cast<int8_t*>(q),
                           const_cast<float*>(scales), nullptr, exec);
}
