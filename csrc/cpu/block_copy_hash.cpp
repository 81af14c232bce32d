// Fused gather + XXH3-64: block_copy.cpp's gathers (paged cache or token-major tensors into
// per-block rows) that also return each row's XXH3-64 (seed 0) digest, the checksum a put
// records (kvstore/client/checksum.py), so a reserved put's commit need not read the rows
// back. Each row is written in order; every kHashChunkBytes just written are hashed while
// they are still in L1/L2 (xxhash.h's streaming state gives the one-shot digest), so the
// bytes cross DRAM once. NOTE: regular stores, not block_copy.cpp's streaming ones: a
// non-temporal store would push the bytes to DRAM and the hash would read them back.
// One thread per row (a row's digest is sequential); rows spread over the threads.
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#include "kvops/abi.h"
#include "kvops/index.h"
#include "parallel.h"

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

int gather_blocks_hash(const kvops_pages* pages, int64_t elem_bytes, char* const* rows,
                       uint64_t* digests, const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || rows == nullptr || digests == nullptr ||
      elem_bytes <= 0) {
    return kBadArgument;
  }
  const PagedGeom g = geom_of(*pages);
  const int64_t run_bytes = g.page_elems * elem_bytes;
  parallel_for(pages->num_pages, exec->num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t page = begin; page < end; ++page) {
      RowHasher row(rows[page]);
      for (int64_t layer = 0; layer < g.num_layers; ++layer) {
        for (int64_t kv = 0; kv < g.num_kv; ++kv) {
          const char* cache = static_cast<const char*>(pages->layer_ptrs[layer]) +
                              cache_run_offset(g, pages->block_ids[page], kv) * elem_bytes;
          row.append(cache, run_bytes);
        }
      }
      digests[page] = row.digest();
    }
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
    for (int64_t j = begin; j < end; ++j) {
      RowHasher row(rows[j]);
      const int64_t first_token = t->block_ids[j] * t->block_size;
      for (int64_t tensor = 0; tensor < t->num_tensors; ++tensor) {
        const char* base = static_cast<const char*>(t->tensor_ptrs[tensor]);
        for (int64_t token = 0; token < t->block_size; ++token) {
          for (int64_t head = 0; head < t->num_heads; ++head) {
            row.append(base + (head * t->head_stride + (first_token + token) * t->token_stride) *
                                  elem_bytes,
                       run_bytes);
          }
        }
      }
      digests[j] = row.digest();
    }
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
