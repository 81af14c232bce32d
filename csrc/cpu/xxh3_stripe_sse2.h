// One XXH3 accumulate step (XXH3_accumulate_512 of xxhash.h, SSE2) on the 64-byte stripe
// in[0, 64) that also stores the stripe to out: the stored bytes are the very registers hashed.
// Shared by the fused copy + hash (copy_hash.h, its SSE2 build) and the fused gather + hash
// (block_copy_hash.cpp). kStream: non-temporal stores (out must be 16-byte aligned) instead of
// plain ones.
#pragma once

#include <stdint.h>

#include <emmintrin.h>

namespace {

template <bool kStream>
inline void accumulate_stripe_sse2(uint64_t* acc, const char* in, char* out,
                                   const uint8_t* secret) {
  __m128i* const xacc = reinterpret_cast<__m128i*>(acc);
  for (int i = 0; i < 4; ++i) {
    const __m128i data = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in) + i);
    if (kStream) {
      _mm_stream_si128(reinterpret_cast<__m128i*>(out) + i, data);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out) + i, data);
    }
    const __m128i key = _mm_loadu_si128(reinterpret_cast<const __m128i*>(secret) + i);
    const __m128i data_key = _mm_xor_si128(data, key);
    const __m128i product =
        _mm_mul_epu32(data_key, _mm_shuffle_epi32(data_key, _MM_SHUFFLE(0, 3, 0, 1)));
    const __m128i sum =
        _mm_add_epi64(xacc[i], _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2)));
    xacc[i] = _mm_add_epi64(product, sum);
  }
}

}  // namespace
