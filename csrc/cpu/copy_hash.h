// Fused copy + XXH3-64: copy a buffer and hash it in one pass, each 64-byte stripe loaded once
// into registers that are both stored to the destination and fed to the hash.
//
// Included by one translation unit per instruction set (copy_hash_sse2.cpp, copy_hash_avx2.cpp,
// the latter compiled with -mavx2); copy_hash_module.cpp picks one at load time. Everything
// here is static: each unit gets its own copy, built for its own target.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE2__)
#include "xxh3_stripe_sse2.h"
#endif
#include "xxh3_long_copy.h"

namespace {

#if defined(__SSE2__)
// One XXH3 accumulate step (XXH3_accumulate_512 of xxhash.h) on the stripe in[0, 64) that
// also stores the stripe to out. NOTE: the stored bytes are the very registers hashed, so the
// digest vouches for what the reader received even if the source changes meanwhile; a
// separate copy then hash would read the bytes twice (the second time from cache at best).
// Plain stores, not non-temporal ones: for 1-4 MiB from cold sources both gave the same
// bytes per second here (bench/RESULTS.md "Issue 15m"), unlike a plain copy (read_ranges.h).
inline void accumulate_copy_stripe(uint64_t* acc, const char* in, char* out,
                                   const uint8_t* secret) {
  XXH_PREFETCH(in + XXH_PREFETCH_DIST);  // as xxhash.h's own loop does
#if defined(__AVX2__)
  __m256i* const xacc = reinterpret_cast<__m256i*>(acc);
  for (int i = 0; i < 2; ++i) {
    const __m256i data = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in) + i);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out) + i, data);
    const __m256i key = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(secret) + i);
    const __m256i data_key = _mm256_xor_si256(data, key);
    const __m256i product = _mm256_mul_epu32(data_key, _mm256_srli_epi64(data_key, 32));
    const __m256i sum =
        _mm256_add_epi64(xacc[i], _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2)));
    xacc[i] = _mm256_add_epi64(product, sum);
  }
#else
  accumulate_stripe_sse2<false>(acc, in, out, secret);
#endif
}

// XXH3_hashLong_64b of src[0, len) (len > XXH3_MIDSIZE_MAX), every stripe through
// accumulate_copy_stripe (the shared loop of xxh3_long_copy.h).
inline uint64_t copy_hash_long(char* dst, const char* src, size_t len) {
  return xxh3_long_copy(dst, len, ContiguousSource{src},
                        [](uint64_t* acc, const char* in, char* out, const uint8_t* secret) {
                          accumulate_copy_stripe(acc, in, out, secret);
                        });
}
#endif  // __SSE2__

// Copies src[0, num_bytes) to dst (the ranges must not overlap) and returns the XXH3-64
// (seed 0) digest of the bytes stored to dst: the value xxhash.xxh3_64_intdigest gives for
// them, so it compares with the checksums the store records (kvstore/client/checksum.py).
inline uint64_t copy_hash(char* dst, const char* src, size_t num_bytes) {
#if defined(__SSE2__)
  if (num_bytes > XXH3_MIDSIZE_MAX) return copy_hash_long(dst, src, num_bytes);
#endif
  // NOTE: short values (and CPUs without SSE2): copy, then hash the copy
  memcpy(dst, src, num_bytes);
  return XXH3_64bits(dst, num_bytes);
}

}  // namespace
