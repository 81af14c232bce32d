// CPU gather/scatter of page runs: one memcpy per (layer, kv, page) run, runs split across
// threads in the gathered buffer's order (so each thread writes, or reads, one contiguous
// stretch of the buffer). Large gathers prefetch each next run's pages while copying one.
#include <string.h>

#include "kvops/abi.h"
#include "kvops/index.h"
#include "parallel.h"
#include "stream_copy.h"

namespace kvops {
namespace {

template <bool kGather>
int copy_pages(const kvops_pages* pages, int64_t elem_bytes, char* buf,  // [runs, page]
               const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || elem_bytes <= 0) return kBadArgument;
  const PagedGeom g = geom_of(*pages);
  const int64_t run_bytes = g.page_elems * elem_bytes;
  const bool streaming = num_runs(g) * run_bytes >= kStreamingMinBytes;
  // NOTE: only a gather's source jumps between runs; a scatter reads the buffer in order.
  const bool prefetch = kGather && streaming && run_bytes <= kPrefetchMaxRunBytes;
  auto cache_run = [&](int64_t layer, int64_t kv, int64_t page) {  // in [blocks, ...] of layer
    return static_cast<char*>(pages->layer_ptrs[layer]) +
           cache_run_offset(g, pages->block_ids[page], kv) * elem_bytes;
  };
  parallel_for(num_runs(g), exec->num_threads, [&](int64_t begin, int64_t end) {
    int64_t layer, kv, page;
    run_coords(g, begin, &layer, &kv, &page);
    for (int64_t run = begin; run < end; ++run) {
      char* cache = cache_run(layer, kv, page);
      char* flat = buf + gathered_run_offset(g, layer, kv, page) * elem_bytes;
      if (run + 1 < end) run_coords(g, run + 1, &layer, &kv, &page);  // the next run's
      char* dst = kGather ? flat : cache;
      const char* src = kGather ? cache : flat;
      if (!streaming) {
        memcpy(dst, src, run_bytes);
      } else if (prefetch && run + 1 < end) {
        copy_streaming(dst, src, run_bytes, cache_run(layer, kv, page));
      } else {
        copy_streaming(dst, src, run_bytes);
      }
    }
    if (streaming) store_fence();
  });
  return kOk;
}

}  // namespace
}  // namespace kvops

extern "C" int kvops_gather_pages(const kvops_pages* pages, int64_t elem_bytes, void* out,
                                  const kvops_exec* exec) {
  return kvops::copy_pages<true>(pages, elem_bytes, static_cast<char*>(out), exec);
}

extern "C" int kvops_scatter_pages(const kvops_pages* pages, int64_t elem_bytes,
                                   const void* buf, const kvops_exec* exec) {
  // NOTE: the cast only lets one template serve both directions; a scatter never writes buf.
  return kvops::copy_pages<false>(pages, elem_bytes,
                                  const_cast<char*>(static_cast<const char*>(buf)), exec);
}
