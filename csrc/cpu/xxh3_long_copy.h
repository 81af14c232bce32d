// The stripe loop of XXH3_hashLong_64b (xxhash.h's XXH3_hashLong_internal_loop and
// XXH3_mergeAccs, default secret, same constants) for a copy that hashes what it stores: one
// routine for the fused copy + hash (copy_hash.h: one contiguous source) and the fused
// gather + hash (block_copy_hash.cpp: a row gathered from runs). The caller says how a stripe
// is accumulated and stored (SSE2 or AVX2, plain or non-temporal stores) and where the
// source's bytes are.
//
// Needs xxhash.h included with XXH_INLINE_ALL before it.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace {

// Bytes of one XXH3 block (16 stripes with the default secret): the accumulators are
// scrambled after each.
constexpr size_t kXxh3BlockBytes =
    XXH_STRIPE_LEN * ((sizeof(XXH3_kSecret) - XXH_STRIPE_LEN) / XXH_SECRET_CONSUME_RATE);

// Copies len > XXH3_MIDSIZE_MAX bytes to dst and returns the XXH3-64 (seed 0) digest of
// them, every 64-byte stripe going through stripe(acc, in, out, secret) (an XXH3 accumulate
// step on in[0, 64) that also stores those bytes to out). Covers every byte: whole 1 KiB
// blocks, the stripes of the last partial block, then the last 64 bytes (which may overlap
// the stripes before: stored twice, hashed as the reference does).
//
// Source: block(offset) is the address of source byte ``offset`` when the whole block
// [offset, offset + 1 KiB) is contiguous there, else nullptr; at(offset) the address of byte
// offset whose stripe [offset, offset + 64) is contiguous. NOTE: two calls rather than one
// per stripe: a gather's at() divides by the run length, which per 64 bytes would cost about
// as much as the copy; block() is asked once per block.
template <typename Source, typename Stripe>
inline uint64_t xxh3_long_copy(char* dst, size_t len, const Source& source,
                               const Stripe& stripe) {
  const uint8_t* const secret = XXH3_kSecret;
  constexpr size_t kSecretBytes = sizeof(XXH3_kSecret);
  constexpr size_t kBlockBytes = kXxh3BlockBytes;
  constexpr size_t kStripesPerBlock = kBlockBytes / XXH_STRIPE_LEN;
  XXH_ALIGN(XXH_ACC_ALIGN) uint64_t acc[XXH_ACC_NB] = XXH3_INIT_ACC;
  const size_t num_blocks = (len - 1) / kBlockBytes;
  for (size_t n = 0; n < num_blocks; ++n) {
    const size_t base = n * kBlockBytes;
    const char* const in = source.block(base);
    // NOTE: two loops, not one choosing per stripe: the contiguous one is the hot path and
    // should compile to straight-line stripes (a fused gather with one loop measured below
    // the code before this header, with two at or above it: bench/RESULTS.md "Issue 15m")
    if (in != nullptr) {
      for (size_t s = 0; s < kStripesPerBlock; ++s) {
        stripe(acc, in + s * XXH_STRIPE_LEN, dst + base + s * XXH_STRIPE_LEN,
               secret + s * XXH_SECRET_CONSUME_RATE);
      }
    } else {
      for (size_t s = 0; s < kStripesPerBlock; ++s) {
        const size_t offset = base + s * XXH_STRIPE_LEN;
        stripe(acc, source.at(offset), dst + offset, secret + s * XXH_SECRET_CONSUME_RATE);
      }
    }
    XXH3_scrambleAcc(acc, secret + kSecretBytes - XXH_STRIPE_LEN);
  }
  const size_t base = num_blocks * kBlockBytes;
  const size_t num_stripes = ((len - 1) - base) / XXH_STRIPE_LEN;
  for (size_t s = 0; s < num_stripes; ++s) {
    const size_t offset = base + s * XXH_STRIPE_LEN;
    stripe(acc, source.at(offset), dst + offset, secret + s * XXH_SECRET_CONSUME_RATE);
  }
  stripe(acc, source.at(len - XXH_STRIPE_LEN), dst + len - XXH_STRIPE_LEN,
         secret + kSecretBytes - XXH_STRIPE_LEN - XXH_SECRET_LASTACC_START);
  return XXH3_mergeAccs(acc, secret + XXH_SECRET_MERGEACCS_START,
                        static_cast<uint64_t>(len) * XXH_PRIME64_1);
}

// A Source of xxh3_long_copy: one contiguous buffer.
struct ContiguousSource {
  const char* src;
  const char* block(size_t offset) const { return src + offset; }
  const char* at(size_t offset) const { return src + offset; }
};

}  // namespace
