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

#include <memory>

#define XXH_INLINE_ALL
#include "xxhash.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE2__)
#include "xxh3_stripe_sse2.h"
#endif
#include "xxh3_long_copy.h"
#include "copy_split.h"

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

// A Source of xxh3_long_copy for a copy shared with a helper (copy_split.h): the head and
// the chunks this thread claims come from src (copied and hashed), a chunk the helper took is
// hashed where the helper stored it, in dst (after its flag; storing those bytes again is
// harmless: nobody else writes there). Chunks are claimed in order as the hash reaches them.
struct SplitSource {
  kvsplit::SplitState* state;
  mutable size_t num_resolved = 0;           // chunks claimed or waited for so far
  mutable bool mine[kvsplit::kMaxChunks] = {};

  const char* resolve(size_t offset) const {
    if (offset < state->split) return state->src + offset;
    const size_t c = state->chunk_of(offset);
    while (num_resolved <= c) {
      mine[num_resolved] = kvsplit::claim(*state, num_resolved);
      if (!mine[num_resolved]) kvsplit::wait_helper(*state, num_resolved);
      ++num_resolved;
    }
    return (mine[c] ? state->src : state->dst) + offset;
  }
  const char* block(size_t offset) const { return resolve(offset); }
  const char* at(size_t offset) const { return resolve(offset); }
};

// copy_hash_long with the tail from state->split shared with a helper (started by the
// caller; copy_split.h); the same digest as one thread's. NOTE: the helper's stores are
// plain (memcpy), so its chunks are still cached when this thread hashes them, and storing
// them again to their own place costs no memory traffic.
inline uint64_t copy_hash_long_split(kvsplit::SplitState& state) {
  return xxh3_long_copy(state.dst, state.len, SplitSource{&state},
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

namespace {

// Values from this size on are copied and hashed by two threads (copy_hash_split). NOTE:
// starting a thread costs ~20-50 us; 2 MiB is ~130 us of one thread's copy + hash here.
constexpr size_t kSplitMinBytes = size_t{2} << 20;
// The caller's share (the head) of a shared copy + hash. NOTE: under half: the caller also
// hashes the helper's chunks (from cache, ~1/4 of a copy's time each), so with a head of
// 7/16 both threads finish at about the same time.
constexpr size_t kSplitHeadSixteenths = 7;

// copy_hash with a helper thread for num_bytes >= kSplitMinBytes (copy_hash below): the same
// digest, in less time where a second core is free. NOTE: plain stores, as copy_hash: a
// put's copy + hash with non-temporal stores measured no faster (bench/put_copy_bench.py,
// bench/RESULTS.md "Same-host 4 MiB put")
inline uint64_t copy_hash_split(char* dst, const char* src, size_t num_bytes) {
#if defined(__SSE2__)
  if (num_bytes >= kSplitMinBytes) {
    const size_t split = num_bytes / 16 * kSplitHeadSixteenths / kXxh3BlockBytes *
                         kXxh3BlockBytes;
    auto state = kvsplit::make_split(dst, src, num_bytes, split, kXxh3BlockBytes);
    kvsplit::start_helper(state, [](char* d, const char* s, size_t n) { memcpy(d, s, n); });
    return copy_hash_long_split(*state);
  }
#endif
  return copy_hash(dst, src, num_bytes);
}

}  // namespace

