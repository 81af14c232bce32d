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

namespace {

#if defined(__SSE2__)
// One XXH3 accumulate step (XXH3_accumulate_512 of xxhash.h) on the stripe in[0, 64) that
// also stores the stripe to out. NOTE: the stored bytes are the very registers hashed, so the
// digest vouches for what the reader received even if the source changes meanwhile; a
// separate copy then hash would read the bytes twice (the second time from cache at best).
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

// XXH3_hashLong_64b with the default secret (xxhash.h's XXH3_hashLong_internal_loop and
// XXH3_mergeAccs, same constants), every stripe through accumulate_copy_stripe. Covers
// every byte: whole 1 KiB blocks, the stripes of the last partial block, then the last 64
// bytes (which may overlap the stripes before: stored twice, hashed as the reference does).
inline uint64_t copy_hash_long(char* dst, const char* src, size_t len) {
  const uint8_t* const secret = XXH3_kSecret;
  constexpr size_t kSecretBytes = sizeof(XXH3_kSecret);
  constexpr size_t kStripesPerBlock = (kSecretBytes - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE;
  constexpr size_t kBlockBytes = XXH_STRIPE_LEN * kStripesPerBlock;
  XXH_ALIGN(XXH_ACC_ALIGN) uint64_t acc[XXH_ACC_NB] = XXH3_INIT_ACC;
  const size_t num_blocks = (len - 1) / kBlockBytes;
  for (size_t n = 0; n < num_blocks; ++n) {
    const size_t base = n * kBlockBytes;
    for (size_t s = 0; s < kStripesPerBlock; ++s) {
      accumulate_copy_stripe(acc, src + base + s * XXH_STRIPE_LEN, dst + base + s * XXH_STRIPE_LEN,
                             secret + s * XXH_SECRET_CONSUME_RATE);
    }
    XXH3_scrambleAcc(acc, secret + kSecretBytes - XXH_STRIPE_LEN);
  }
  const size_t base = num_blocks * kBlockBytes;
  const size_t num_stripes = ((len - 1) - base) / XXH_STRIPE_LEN;
  for (size_t s = 0; s < num_stripes; ++s) {
    accumulate_copy_stripe(acc, src + base + s * XXH_STRIPE_LEN, dst + base + s * XXH_STRIPE_LEN,
                           secret + s * XXH_SECRET_CONSUME_RATE);
  }
  accumulate_copy_stripe(acc, src + len - XXH_STRIPE_LEN, dst + len - XXH_STRIPE_LEN,
                         secret + kSecretBytes - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);
  return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START,
                        static_cast<uint64_t>(len) * XXH_PRIME64_1);
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
