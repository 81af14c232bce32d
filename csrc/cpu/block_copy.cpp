// CPU gather/scatter between a paged cache and per-block rows: the stored form of
// kvstore.engine.blocks, where block j's row is [num_layers, num_kv, page_elems] at its own
// address (a staging row, or the object's range in a mapped shm segment). One memcpy per
// (page, layer, kv) run, in the rows' order, so each thread writes (or reads) whole rows in
// sequence; no gathered buffer in between. Same index math and copy routine as paged_copy.cpp.
#include <string.h>

#include "kvops/abi.h"
#include "kvops/index.h"
#include "parallel.h"
#include "stream_copy.h"

namespace kvops {
namespace {

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
      const int64_t page = run / runs_per_row;
      const int64_t layer_kv = run % runs_per_row;
      const int64_t layer = layer_kv / g.num_kv;
      const int64_t kv = layer_kv % g.num_kv;
      char* cache = static_cast<char*>(pages->layer_ptrs[layer]) +
                    cache_run_offset(g, pages->block_ids[page], kv) * elem_bytes;
      char* row = rows[page] + layer_kv * run_bytes;
      char* dst = kGather ? row : cache;
      const char* src = kGather ? cache : row;
      if (streaming) {
        copy_streaming(dst, src, run_bytes);
      } else {
        memcpy(dst, src, run_bytes);
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

template <bool kGather>
int copy_tokens(const kvops_tokens* t, int64_t elem_bytes, char* const* rows,
                const kvops_exec* exec) {
  if (t == nullptr || exec == nullptr || rows == nullptr || elem_bytes <= 0) {
    return kBadArgument;
  }
  const int64_t run_bytes = t->head_dim * elem_bytes;
  const int64_t tensor_bytes = t->block_size * t->num_heads * run_bytes;  // in a row
  const int64_t total_bytes = t->num_blocks * t->num_tensors * tensor_bytes;
  const bool streaming = total_bytes >= kStreamingMinBytes;
  // NOTE: split over (block, tensor) pairs: each is block_size x heads runs, so one thread
  // writes (gather) or reads (scatter) one contiguous stretch of a row at a time
  parallel_for(t->num_blocks * t->num_tensors, exec->num_threads,
               [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / t->num_tensors;
      const int64_t tensor = item % t->num_tensors;
      char* base = static_cast<char*>(t->tensor_ptrs[tensor]);
      char* row = rows[j] + tensor * tensor_bytes;
      const int64_t first_token = t->block_ids[j] * t->block_size;
      for (int64_t token = 0; token < t->block_size; ++token) {
        for (int64_t head = 0; head < t->num_heads; ++head) {
          char* cache = base + (head * t->head_stride + (first_token + token) * t->token_stride) *
                                   elem_bytes;
          char* stored = row + (token * t->num_heads + head) * run_bytes;
          char* dst = kGather ? stored : cache;
          const char* src = kGather ? cache : stored;
          if (streaming) {
            copy_streaming(dst, src, run_bytes);
          } else {
            memcpy(dst, src, run_bytes);
          }
        }
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
