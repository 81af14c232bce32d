// Non-temporal copies for the CPU kernels' large transfers.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace kvops {

// Copies at least this many bytes in total use non-temporal stores (see copy_streaming).
#ifndef KVOPS_STREAMING_MIN_BYTES
#define KVOPS_STREAMING_MIN_BYTES (int64_t{8} << 20)  // beyond a typical L2 + L3 share
#endif
constexpr int64_t kStreamingMinBytes = KVOPS_STREAMING_MIN_BYTES;

// Runs of at most this many bytes prefetch the next run's source while they copy (see
// copy_streaming): the next run must fit in L2 beside the current one.
#ifndef KVOPS_PREFETCH_MAX_RUN_BYTES
#define KVOPS_PREFETCH_MAX_RUN_BYTES (int64_t{256} << 10)
#endif
constexpr int64_t kPrefetchMaxRunBytes = KVOPS_PREFETCH_MAX_RUN_BYTES;

// Prefetches, into L2, the cache line at p (a hint: never faults, whatever p is).
inline void prefetch_l2(const char* p) {
#if defined(__SSE2__)
  _mm_prefetch(p, _MM_HINT_T1);
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// memcpy with non-temporal stores; with next (not null), also prefetches next[0, num_bytes),
// one line per line copied. NOTE: a copy much larger than the caches gains nothing from
// caching its destination, and plain stores would first read every destination line (and
// evict the cache for it); glibc's memcpy does the same for large single copies, which our
// runs of a few KiB each never are. A gather's runs start at random places, where the
// hardware prefetcher has to warm up again for every run: prefetching the next run while
// this one copies keeps loads in flight across run boundaries (1.1-1.4x the bytes per
// CPU-second on 32 KiB runs, bench/RESULTS.md "Kernels against the best copy"). The caller
// issues a fence before the data is shared.
inline void copy_streaming(char* dst, const char* src, size_t num_bytes,
                           const char* next = nullptr) {
#if defined(__SSE2__)
  const size_t head = ((16 - reinterpret_cast<uintptr_t>(dst) % 16) % 16);
  if (num_bytes < head + 64) {
    memcpy(dst, src, num_bytes);
    return;
  }
  memcpy(dst, src, head);
  dst += head;
  src += head;
  num_bytes -= head;
  const size_t body = num_bytes & ~size_t{63};
  for (size_t i = 0; i < body; i += 64) {
    if (next != nullptr) prefetch_l2(next + head + i);
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  memcpy(dst + body, src + body, num_bytes - body);
#else
  (void)next;
  memcpy(dst, src, num_bytes);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
#endif
}

}  // namespace kvops
