// CUDA gather/scatter of page runs: one thread block per (page, kv, layer) run, copying it with
// 16-byte vector loads and stores.
#include <cuda_runtime.h>

#include "common.cuh"
#include "kvops/abi.h"
#include "kvops/index.h"

namespace kvops {
namespace {

template <bool kGather>
__global__ void __launch_bounds__(kThreadsPerBlock)
    copy_pages_kernel(LayerChunk layers,        // [layers in chunk] -> [blocks.., page]
                      PagedGeom g,
                      const int64_t* block_ids,  // [num_pages]
                      int64_t elem_bytes,
                      char* buf) {               // [num_layers, num_kv, num_pages, page]
  const int64_t page = blockIdx.x;
  const int64_t kv = blockIdx.y;
  const int64_t layer = layers.first_layer + blockIdx.z;
  char* cache = static_cast<char*>(layers.ptrs[blockIdx.z]) +
                cache_run_offset(g, block_ids[page], kv) * elem_bytes;
  char* flat = buf + gathered_run_offset(g, layer, kv, page) * elem_bytes;
  const int64_t run_bytes = g.page_elems * elem_bytes;
  if (kGather) {
    copy_run(flat, cache, run_bytes, threadIdx.x, blockDim.x);
  } else {
    copy_run(cache, flat, run_bytes, threadIdx.x, blockDim.x);
  }
}

template <bool kGather>
int copy_pages(const kvops_pages* pages, int64_t elem_bytes, char* buf, const kvops_exec* exec) {
  if (pages == nullptr || exec == nullptr || elem_bytes <= 0) return kBadArgument;
  if (pages->num_pages == 0) return kOk;  // an empty grid is a launch error
  DeviceGuard guard(static_cast<int>(exec->device));
  const PagedGeom g = geom_of(*pages);
  cudaStream_t stream = static_cast<cudaStream_t>(exec->stream);
  return for_layer_chunks(*pages, [&](const LayerChunk& chunk, int64_t num_layers) {
    // Grid: x = page, y = kv (K, V), z = layer within the chunk; threads stride over the run.
    const dim3 grid(static_cast<unsigned>(g.num_pages), static_cast<unsigned>(g.num_kv),
                    static_cast<unsigned>(num_layers));
    copy_pages_kernel<kGather><<<grid, kThreadsPerBlock, 0, stream>>>(chunk, g, pages->block_ids,
                                                                     elem_bytes, buf);
  });
}

}  // namespace
}  // namespace kvops

extern "C" int kvops_gather_pages(const kvops_pages* pages, int64_t elem_bytes, void* out,
                                  const kvops_exec* exec) {
  return kvops::copy_pages<true>(pages, elem_bytes, static_cast<char*>(out), exec);
}

extern "C" int kvops_scatter_pages(const kvops_pages* pages, int64_t elem_bytes,
                                   const void* buf, const kvops_exec* exec) {
  // NOTE: the cast only lets one kernel serve both directions; a scatter never writes buf.
  return kvops::copy_pages<false>(pages, elem_bytes,
                                  const_cast<char*>(static_cast<const char*>(buf)), exec);
}
