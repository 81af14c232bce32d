// CPU gather/scatter between a paged cache and per-block rows: the stored form of
// kvstore.engine.blocks, where block j's row is [num_layers, num_kv, page_elems] at its own
// address (a staging row, or the object's range in a mapped shm segment). One memcpy per
// (page, layer, kv) run, in the rows' order, so each thread writes (or reads) whole rows in
// sequence; no gathered buffer in between. Same index math and copy routine as paged_copy.cpp.
//
// The verified scatters (kvops_scatter_*_verified) take each row's expected XXH3-64 (seed 0:
// the checksum the store recorded, kvstore/client/checksum.py) and scatter a row only when
// its digest matches, so a cache never receives a byte that failed verification. One thread
// per row: it hashes the row (one read from DRAM; a row is a block of every layer, a few
// hundred KiB, so it stays in L2), then copies it into the cache from L2. NOTE: why not hash
// as the copy streams (block_copy_hash.cpp's scheme): the pages would hold the row's bytes
// before its digest was known, and a mismatch would leave a half-written block in the cache.
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h"

#include "kvops/abi.h"
#include "kvops/index.h"
#include "parallel.h"
#include "stream_copy.h"

namespace kvops {
namespace {

// One run of a row copy: non-temporal stores when the whole call moves more than the caches
// hold (copy_streaming; the caller fences), else memcpy.
inline void copy_run(char* dst, const char* src, int64_t num_bytes, bool streaming) {
  if (streaming) {
    copy_streaming(dst, src, static_cast<size_t>(num_bytes));
  } else {
    memcpy(dst, src, static_cast<size_t>(num_bytes));
  }
}

// True when row_bytes bytes at row hash (XXH3-64, seed 0) to expected.
inline bool row_matches(const char* row, int64_t row_bytes, uint64_t expected) {
  return XXH3_64bits(row, static_cast<size_t>(row_bytes)) == expected;
}

// Run layer_kv (layer * num_kv + kv) of row j: between rows[j] and page block_ids[j].
template <bool kGather>
inline void copy_block_run(const kvops_pages& pages, const PagedGeom& g, int64_t elem_bytes,
                           char* const* rows, int64_t j, int64_t layer_kv, bool streaming) {
  const int64_t run_bytes = g.page_elems * elem_bytes;
  char* cache = static_cast<char*>(pages.layer_ptrs[layer_kv / g.num_kv]) +
                cache_run_offset(g, pages.block_ids[j], layer_kv % g.num_kv) * elem_bytes;
  char* row = rows[j] + layer_kv * run_bytes;
  copy_run(kGather ? row : cache, kGather ? cache : row, run_bytes, streaming);
}

template <bool kGather>
int copy_blocks(const kvops_pages* pages, int64_t elem_bytes, char* const* rows,
                const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || rows == nullptr || elem_bytes <= 0) {
    return kBadArgument;
  }
  const PagedGeom g = geom_of(*pages);
  const int64_t run_bytes = g.page_elems * elem_bytes;
  const int64_t runs_per_row = g.num_layers * g.num_kv;
  const bool streaming = num_runs(g) * run_bytes >= kStreamingMinBytes;
  parallel_for(num_runs(g), exec->num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t run = begin; run < end; ++run) {
      copy_block_run<kGather>(*pages, g, elem_bytes, rows, run / runs_per_row,
                              run % runs_per_row, streaming);
    }
    if (streaming) store_fence();
  });
  return kOk;
}

// The verified scatter of a paged cache (see the file comment): ok[j] = 1 when row j
// matched expected[j] and was scattered, else 0 and its page was not touched.
int scatter_blocks_verified(const kvops_pages* pages, int64_t elem_bytes, char* const* rows,
                            const uint64_t* expected, uint8_t* ok, const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || rows == nullptr || expected == nullptr ||
      ok == nullptr || elem_bytes <= 0) {
    return kBadArgument;
  }
  const PagedGeom g = geom_of(*pages);
  const int64_t runs_per_row = g.num_layers * g.num_kv;
  const int64_t row_bytes = runs_per_row * g.page_elems * elem_bytes;
  const bool streaming = g.num_pages * row_bytes >= kStreamingMinBytes;
  parallel_for(g.num_pages, exec->num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      ok[j] = row_matches(rows[j], row_bytes, expected[j]) ? 1 : 0;
      if (!ok[j]) continue;
      for (int64_t layer_kv = 0; layer_kv < runs_per_row; ++layer_kv) {
        copy_block_run<false>(*pages, g, elem_bytes, rows, j, layer_kv, streaming);
      }
    }
    if (streaming) store_fence();
  });
  return kOk;
}

}  // namespace
}  // namespace kvops

extern "C" int kvops_gather_blocks(const kvops_pages* pages, int64_t elem_bytes,
                                   void* const* rows, const kvops_exec* exec) {
  return kvops::copy_blocks<true>(pages, elem_bytes, reinterpret_cast<char* const*>(rows),
                                  exec);
}

extern "C" int kvops_scatter_blocks(const kvops_pages* pages, int64_t elem_bytes,
                                    const void* const* rows, const kvops_exec* exec) {
  // NOTE: the cast only lets one template serve both directions; a scatter never writes rows.
  return kvops::copy_blocks<false>(
      pages, elem_bytes, const_cast<char* const*>(reinterpret_cast<const char* const*>(rows)),
      exec);
}

// Per-block rows from / to per-(layer, kv) token-major tensors [heads, seq, head_dim] (a
// transformers cache's [1, H, S, D] tensors): row j holds tokens [b*block_size, +block_size)
// of block b = block_ids[j] as [num_tensors, block_size, heads, head_dim], so each run is one
// token of one head (head_dim elements).
namespace kvops {
namespace {

// Tensor `tensor` of row j: block_size x heads runs between rows[j] and the tensor.
template <bool kGather>
inline void copy_token_item(const kvops_tokens& t, int64_t elem_bytes, char* const* rows,
                            int64_t j, int64_t tensor, bool streaming) {
  const int64_t run_bytes = t.head_dim * elem_bytes;
  const int64_t tensor_bytes = t.block_size * t.num_heads * run_bytes;  // in a row
  char* base = static_cast<char*>(t.tensor_ptrs[tensor]);
  char* row = rows[j] + tensor * tensor_bytes;
  const int64_t first_token = t.block_ids[j] * t.block_size;
  for (int64_t token = 0; token < t.block_size; ++token) {
    for (int64_t head = 0; head < t.num_heads; ++head) {
      char* cache = base + (head * t.head_stride + (first_token + token) * t.token_stride) *
                               elem_bytes;
      char* stored = row + (token * t.num_heads + head) * run_bytes;
      copy_run(kGather ? stored : cache, kGather ? cache : stored, run_bytes, streaming);
    }
  }
}

inline int64_t token_row_bytes(const kvops_tokens& t, int64_t elem_bytes) {
  return t.num_tensors * t.block_size * t.num_heads * t.head_dim * elem_bytes;
}

template <bool kGather>
int copy_tokens(const kvops_tokens* t, int64_t elem_bytes, char* const* rows,
                const kvops_exec* exec) {
  if (t == nullptr || exec == nullptr || rows == nullptr || elem_bytes <= 0) {
    return kBadArgument;
  }
  const bool streaming = t->num_blocks * token_row_bytes(*t, elem_bytes) >= kStreamingMinBytes;
  // NOTE: split over (block, tensor) pairs: each is block_size x heads runs, so one thread
  // writes (gather) or reads (scatter) one contiguous stretch of a row at a time
  parallel_for(t->num_blocks * t->num_tensors, exec->num_threads,
               [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      copy_token_item<kGather>(*t, elem_bytes, rows, item / t->num_tensors,
                               item % t->num_tensors, streaming);
    }
    if (streaming) store_fence();
  });
  return kOk;
}

// The verified scatter into token-major tensors (see the file comment); ok as
// scatter_blocks_verified.
int scatter_tokens_verified(const kvops_tokens* t, int64_t elem_bytes, char* const* rows,
                            const uint64_t* expected, uint8_t* ok, const kvops_exec* exec) {
  if (t == nullptr || exec == nullptr || rows == nullptr || expected == nullptr ||
      ok == nullptr || elem_bytes <= 0) {
    return kBadArgument;
  }
  const int64_t row_bytes = token_row_bytes(*t, elem_bytes);
  const bool streaming = t->num_blocks * row_bytes >= kStreamingMinBytes;
  parallel_for(t->num_blocks, exec->num_threads, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      ok[j] = row_matches(rows[j], row_bytes, expected[j]) ? 1 : 0;
      if (!ok[j]) continue;
      for (int64_t tensor = 0; tensor < t->num_tensors; ++tensor) {
        copy_token_item<false>(*t, elem_bytes, rows, j, tensor, streaming);
      }
    }
    if (streaming) store_fence();
  });
  return kOk;
}

}  // namespace
}  // namespace kvops

extern "C" int kvops_gather_tokens(const kvops_tokens* tokens, int64_t elem_bytes,
                                   void* const* rows, const kvops_exec* exec) {
  return kvops::copy_tokens<true>(tokens, elem_bytes, reinterpret_cast<char* const*>(rows),
                                  exec);
}

extern "C" int kvops_scatter_tokens(const kvops_tokens* tokens, int64_t elem_bytes,
                                    const void* const* rows, const kvops_exec* exec) {
  return kvops::copy_tokens<false>(
      tokens, elem_bytes,
      const_cast<char* const*>(reinterpret_cast<const char* const*>(rows)), exec);
}

extern "C" int kvops_scatter_blocks_verified(const kvops_pages* pages, int64_t elem_bytes,
                                             const void* const* rows, const uint64_t* expected,
                                             uint8_t* ok, const kvops_exec* exec) {
  return kvops::scatter_blocks_verified(
      pages, elem_bytes, const_cast<char* const*>(reinterpret_cast<const char* const*>(rows)),
      expected, ok, exec);
}

extern "C" int kvops_scatter_tokens_verified(const kvops_tokens* tokens, int64_t elem_bytes,
                                             const void* const* rows, const uint64_t* expected,
                                             uint8_t* ok, const kvops_exec* exec) {
  return kvops::scatter_tokens_verified(
      tokens, elem_bytes, const_cast<char* const*>(reinterpret_cast<const char* const*>(rows)),
      expected, ok, exec);
}
