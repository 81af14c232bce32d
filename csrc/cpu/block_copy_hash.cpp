// Fused gather + XXH3-64: block_copy.cpp's gathers (paged cache or token-major tensors into
// per-block rows) that also return each row's XXH3-64 (seed 0) digest, the checksum a put
// records (kvstore/client/checksum.py), so a reserved put's commit need not read the rows
// back. One thread per row (a row's digest is sequential); rows spread over the threads.
//
// Two ways, one digest:
// - stripes (every run a multiple of 64 bytes, rows over 240 bytes: the usual KV pages):
//   copy_hash.h's scheme over the row's runs: each 64-byte stripe loaded once into
//   registers, stored to the row with non-temporal stores (as block_copy.cpp) and fed to
//   XXH3's accumulators, so the bytes cross DRAM once each way and are never read back;
// - otherwise: memcpy the runs in order and hash every kHashChunkBytes just written while
//   they are still in L1 (xxhash.h's streaming state gives the one-shot digest).
// The stripe loop is xxh3_long_copy.h's, shared with copy_hash.h.
#include <string.h>

#include <vector>

#define XXH_INLINE_ALL
#include "xxhash.h"
#if defined(__SSE2__)
#include "xxh3_stripe_sse2.h"
#include "xxh3_long_copy.h"
#endif

#include "kvops/abi.h"
#include "kvops/index.h"
#include "parallel.h"
#include "stream_copy.h"

namespace kvops {
namespace {

// Bytes copied between hash updates: small enough to stay in L1 beside the source stream.
constexpr int64_t kHashChunkBytes = 16 * 1024;

// Copies runs into one row front to back and hashes the row's bytes as they are written.
class RowHasher {
 public:
  explicit RowHasher(char* row) : row_(row) { XXH3_64bits_reset(&state_); }

  // Appends src[0, num_bytes) at the row's write position.
  void append(const char* src, int64_t num_bytes) {
    while (num_bytes > 0) {
      const int64_t piece = num_bytes < kHashChunkBytes ? num_bytes : kHashChunkBytes;
      memcpy(row_ + written_, src, piece);
      written_ += piece;
      src += piece;
      num_bytes -= piece;
      if (written_ - hashed_ >= kHashChunkBytes) flush();
    }
  }

  uint64_t digest() {
    flush();
    return XXH3_64bits_digest(&state_);
  }

 private:
  void flush() {
    if (written_ > hashed_) {
      XXH3_64bits_update(&state_, row_ + hashed_, static_cast<size_t>(written_ - hashed_));
      hashed_ = written_;
    }
  }

  XXH3_state_t state_;
  char* row_;
  int64_t written_ = 0;
  int64_t hashed_ = 0;
};

#if defined(__SSE2__)
// The Source (xxh3_long_copy.h) of a row gathered from runs[k], run_bytes each (a multiple of
// 64): the row's byte at offset o is runs[o / run_bytes][o % run_bytes].
struct RunsSource {
  const std::vector<const char*>& runs;
  size_t run_bytes;
  const char* block(size_t offset) const {
    // NOTE: a block never spans runs when run_bytes % 1 KiB == 0 (the usual KV pages)
    return offset % run_bytes + kXxh3BlockBytes <= run_bytes
               ? at(offset)
               : nullptr;
  }
  const char* at(size_t offset) const { return runs[offset / run_bytes] + offset % run_bytes; }
};

// The row's copy + digest by stripes (len = runs.size() * run_bytes > 240, a multiple of 64,
// so the last stripe is exactly the row's last 64 bytes, stored once).
template <bool kStream>
uint64_t copy_hash_runs(char* dst, const std::vector<const char*>& runs, int64_t run_bytes) {
  return xxh3_long_copy(dst, runs.size() * static_cast<size_t>(run_bytes),
                        RunsSource{runs, static_cast<size_t>(run_bytes)},
                        [](uint64_t* acc, const char* in, char* out, const uint8_t* secret) {
                          accumulate_stripe_sse2<kStream>(acc, in, out, secret);
                        });
}
#endif  // __SSE2__

// The row's digest from its runs (each run_bytes, in row order), by stripes where it can.
uint64_t gather_row(char* row, const std::vector<const char*>& runs, int64_t run_bytes) {
#if defined(__SSE2__)
  if (run_bytes % XXH_STRIPE_LEN == 0 &&
      static_cast<int64_t>(runs.size()) * run_bytes > XXH3_MIDSIZE_MAX) {
    if (reinterpret_cast<uintptr_t>(row) % 16 == 0) {
      return copy_hash_runs<true>(row, runs, run_bytes);
    }
    return copy_hash_runs<false>(row, runs, run_bytes);
  }
#endif
  RowHasher hasher(row);
  for (const char* run : runs) hasher.append(run, run_bytes);
  return hasher.digest();
}

int gather_blocks_hash(const kvops_pages* pages, int64_t elem_bytes, char* const* rows,
                       uint64_t* digests, const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || rows == nullptr || digests == nullptr ||
      elem_bytes <= 0) {
    return kBadArgument;
  }
  const PagedGeom g = geom_of(*pages);
  const int64_t run_bytes = g.page_elems * elem_bytes;
  parallel_for(pages->num_pages, exec->num_threads, [&](int64_t begin, int64_t end) {
    std::vector<const char*> runs;
    for (int64_t page = begin; page < end; ++page) {
      runs.clear();
      for (int64_t layer = 0; layer < g.num_layers; ++layer) {
        for (int64_t kv = 0; kv < g.num_kv; ++kv) {
          runs.push_back(static_cast<const char*>(pages->layer_ptrs[layer]) +
                         cache_run_offset(g, pages->block_ids[page], kv) * elem_bytes);
        }
      }
      digests[page] = gather_row(rows[page], runs, run_bytes);
    }
    store_fence();
  });
  return kOk;
}

int gather_tokens_hash(const kvops_tokens* t, int64_t elem_bytes, char* const* rows,
                       uint64_t* digests, const kvops_exec* exec) {
  if (t == nullptr || exec == nullptr || rows == nullptr || digests == nullptr ||
      elem_bytes <= 0) {
    return kBadArgument;
  }
  const int64_t run_bytes = t->head_dim * elem_bytes;
  parallel_for(t->num_blocks, exec->num_threads, [&](int64_t begin, int64_t end) {
    std::vector<const char*> runs;
    for (int64_t j = begin; j < end; ++j) {
      runs.clear();
      const int64_t first_token = t->block_ids[j] * t->block_size;
      for (int64_t tensor = 0; tensor < t->num_tensors; ++tensor) {
        const char* base = static_cast<const char*>(t->tensor_ptrs[tensor]);
        for (int64_t token = 0; token < t->block_size; ++token) {
          for (int64_t head = 0; head < t->num_heads; ++head) {
            runs.push_back(base + (head * t->head_stride + (first_token + token) *
                                   t->token_stride) * elem_bytes);
          }
        }
      }
      digests[j] = gather_row(rows[j], runs, run_bytes);
    }
    store_fence();
  });
  return kOk;
}

}  // namespace
}  // namespace kvops

extern "C" int kvops_gather_blocks_hash(const kvops_pages* pages, int64_t elem_bytes,
                                        void* const* rows, uint64_t* digests,
                                        const kvops_exec* exec) {
  return kvops::gather_blocks_hash(pages, elem_bytes, reinterpret_cast<char* const*>(rows),
                                   digests, exec);
}

extern "C" int kvops_gather_tokens_hash(const kvops_tokens* tokens, int64_t elem_bytes,
                                        void* const* rows, uint64_t* digests,
                                        const kvops_exec* exec) {
  return kvops::gather_tokens_hash(tokens, elem_bytes, reinterpret_cast<char* const*>(rows),
                                   digests, exec);
}
