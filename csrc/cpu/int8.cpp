// CPU INT8 quantize / dequantize, standalone and fused with the page gather / scatter.
// Group math lives in kvops/int8.h (shared with CUDA); this file walks the groups.
#include <string.h>

#include <atomic>

#include "kvops/abi.h"
#include "kvops/dtypes.h"
#include "kvops/index.h"
#include "kvops/int8.h"
#include "parallel.h"
#include "stream_copy.h"

namespace kvops {
namespace {

// NOTE: the group loops are compiled for AVX-512 and AVX2 besides the baseline, and the loader
// picks one at run time (GCC/clang function multiversioning): the install is portable, and
// quantization runs 2-3x faster on the CPUs that have them.
// (GCC only: clang spells the AVX-512 clone differently, and x86-64-v4 is GCC 11+.)
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11
#define KVOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__linux__)
#define KVOPS_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define KVOPS_CPU_CLONES
#endif

// Quantizes num_groups groups; returns how many held inf or NaN. With next (not null), also
// prefetches next[0, num_groups * group_size), group by group (see copy_streaming).
template <typename T>
__attribute__((always_inline)) inline int32_t quantize_groups_impl(
    const T* x,       // [num_groups, group_size]
    int64_t num_groups, int64_t group_size,
    int8_t* q,        // [num_groups, group_size]
    float* scales,    // [num_groups]
    const T* next) {  // [num_groups, group_size] or null
  int32_t num_nonfinite = 0;
  const int64_t group_bytes = group_size * static_cast<int64_t>(sizeof(T));
  for (int64_t g = 0; g < num_groups; ++g) {
    if (next != nullptr) {
      const char* ahead = reinterpret_cast<const char*>(next + g * group_size);
      for (int64_t b = 0; b < group_bytes; b += 64) prefetch_l2(ahead + b);
    }
    const T* xg = x + g * group_size;
    int8_t* qg = q + g * group_size;
    using M = Magnitude<T>;
    typename M::Bits amax_bits = 0;
    for (int64_t i = 0; i < group_size; ++i) {
      const typename M::Bits a = M::of(xg[i]);
      amax_bits = a > amax_bits ? a : amax_bits;
    }
    if (amax_bits > M::kMaxFinite) {
      ++num_nonfinite;
      scales[g] = bits_float(0x7FC00000u);  // NaN: a skipped check cannot pass for data
      memset(qg, 0, group_size);
      continue;
    }
    const float amax = M::value(amax_bits);
    if (group_is_zero(amax)) {
      scales[g] = 0.0f;
      memset(qg, 0, group_size);
      continue;
    }
    scales[g] = group_scale(amax);
    const float inv_scale = group_inv_scale(amax);
    for (int64_t i = 0; i < group_size; ++i) qg[i] = quantize_one(to_float(xg[i]), inv_scale);
  }
  return num_nonfinite;
}

template <typename T>
__attribute__((always_inline)) inline void dequantize_groups_impl(
    const int8_t* q,      // [num_groups, group_size]
    const float* scales,  // [num_groups]
    int64_t num_groups, int64_t group_size,
    T* out) {             // [num_groups, group_size]
  for (int64_t g = 0; g < num_groups; ++g) {
    const float scale = scales[g];
    const int8_t* qg = q + g * group_size;
    T* og = out + g * group_size;
    for (int64_t i = 0; i < group_size; ++i) {
      og[i] = from_float<T>(static_cast<float>(qg[i]) * scale);
    }
  }
}

// One multiversioned overload per element type (target_clones does not apply to templates).
#define KVOPS_GROUP_KERNELS(T)                                                                 \
  KVOPS_CPU_CLONES int32_t quantize_groups(const T* x, int64_t num_groups, int64_t group_size, \
                                           int8_t* q, float* scales, const T* next) {          \
    return quantize_groups_impl(x, num_groups, group_size, q, scales, next);                   \
  }                                                                                            \
  KVOPS_CPU_CLONES void dequantize_groups(const int8_t* q, const float* scales,                \
                                          int64_t num_groups, int64_t group_size, T* out) {    \
    dequantize_groups_impl(q, scales, num_groups, group_size, out);                            \
  }
KVOPS_GROUP_KERNELS(f16)
KVOPS_GROUP_KERNELS(bf16)
KVOPS_GROUP_KERNELS(float)
#undef KVOPS_GROUP_KERNELS

bool valid_groups(int64_t num_groups, int64_t group_size, const kvops_exec* exec) {
  return num_groups >= 0 && group_size > 0 && exec != nullptr;
}

bool valid_pages(const kvops_pages* pages, int64_t group_size, const kvops_exec* exec) {
  return pages != nullptr && exec != nullptr && group_size > 0 &&
         pages->page_elems % group_size == 0;
}

}  // namespace
}  // namespace kvops

using namespace kvops;

extern "C" int kvops_quantize_int8(const void* x, int dtype, int64_t num_groups,
                                   int64_t group_size, int8_t* q, float* scales,
                                   int32_t* num_nonfinite, const kvops_exec* exec) {
  if (!valid_groups(num_groups, group_size, exec) || num_nonfinite == nullptr) return kBadArgument;
  std::atomic<int32_t> bad{0};
  KVOPS_DISPATCH_FLOATING(dtype, {
    const scalar_t* xs = static_cast<const scalar_t*>(x);
    parallel_for(num_groups, exec->num_threads, [&](int64_t begin, int64_t end) {
      bad += quantize_groups(xs + begin * group_size, end - begin, group_size,
                             q + begin * group_size, scales + begin, nullptr);
    });
  });
  *num_nonfinite += bad.load();
  return kOk;
}

extern "C" int kvops_dequantize_int8(const int8_t* q, const float* scales, int64_t num_groups,
                                     int64_t group_size, int dtype, void* out,
                                     const kvops_exec* exec) {
  if (!valid_groups(num_groups, group_size, exec)) return kBadArgument;
  KVOPS_DISPATCH_FLOATING(dtype, {
    scalar_t* os = static_cast<scalar_t*>(out);
    parallel_for(num_groups, exec->num_threads, [&](int64_t begin, int64_t end) {
      dequantize_groups(q + begin * group_size, scales + begin, end - begin, group_size,
                        os + begin * group_size);
    });
  });
  return kOk;
}

extern "C" int kvops_gather_quantize(const kvops_pages* pages, int dtype, int64_t group_size,
                                     int8_t* q, float* scales, int32_t* num_nonfinite,
                                     const kvops_exec* exec) {
  if (!valid_pages(pages, group_size, exec) || num_nonfinite == nullptr) return kBadArgument;
  const PagedGeom g = geom_of(*pages);
  const int64_t groups_per_run = g.page_elems / group_size;
  std::atomic<int32_t> bad{0};
  KVOPS_DISPATCH_FLOATING(dtype, {
    const int64_t run_bytes = g.page_elems * static_cast<int64_t>(sizeof(scalar_t));
    // NOTE: the same rule as copy_pages' (stream_copy.h): each next run's source is fetched
    // while this one is quantized, where runs are random and fit L2 twice over.
    const bool prefetch = num_runs(g) * run_bytes >= kStreamingMinBytes &&
                          run_bytes <= kPrefetchMaxRunBytes;
    auto cache_run = [&](int64_t layer, int64_t kv, int64_t page) {
      return static_cast<const scalar_t*>(pages->layer_ptrs[layer]) +
             cache_run_offset(g, pages->block_ids[page], kv);
    };
    parallel_for(num_runs(g), exec->num_threads, [&](int64_t begin, int64_t end) {
      int32_t local_bad = 0;
      int64_t layer, kv, page;
      run_coords(g, begin, &layer, &kv, &page);
      for (int64_t run = begin; run < end; ++run) {
        const scalar_t* cache = cache_run(layer, kv, page);
        float* run_scales = scales + gathered_scale_offset(g, layer, kv, page, group_size);
        int8_t* run_q = q + gathered_run_offset(g, layer, kv, page);
        const bool has_next = run + 1 < end;
        if (has_next) run_coords(g, run + 1, &layer, &kv, &page);  // the next run's
        const scalar_t* next = prefetch && has_next ? cache_run(layer, kv, page) : nullptr;
        local_bad += quantize_groups(cache, groups_per_run, group_size, run_q, run_scales,
                                     next);
      }
      bad += local_bad;
    });
  });
  *num_nonfinite += bad.load();
  return kOk;
}

extern "C" int kvops_dequantize_scatter(const kvops_pages* pages, int dtype, int64_t group_size,
                                        const int8_t* q, const float* scales,
                                        const kvops_exec* exec) {
  if (!valid_pages(pages, group_size, exec)) return kBadArgument;
  const PagedGeom g = geom_of(*pages);
  const int64_t groups_per_run = g.page_elems / group_size;
  KVOPS_DISPATCH_FLOATING(dtype, {
    parallel_for(num_runs(g), exec->num_threads, [&](int64_t begin, int64_t end) {
      for (int64_t run = begin; run < end; ++run) {
        int64_t layer, kv, page;
        run_coords(g, run, &layer, &kv, &page);
        scalar_t* cache = static_cast<scalar_t*>(pages->layer_ptrs[layer]) +
                          cache_run_offset(g, pages->block_ids[page], kv);
        dequantize_groups(q + gathered_run_offset(g, layer, kv, page),
                          scales + gathered_scale_offset(g, layer, kv, page, group_size),
                          groups_per_run, group_size, cache);
      }
    });
  });
  return kOk;
}
