// Index math of paged KV caches, shared by the CPU and the CUDA implementation.
//
// Both implementations compute every address through these functions, so what the CPU tests
// prove about indexing holds for the GPU build too. All offsets are in elements of the cache
// dtype (scale offsets: in groups); the callers multiply by the element size where they copy
// bytes.
//
// A paged cache is a list of layers. In every layer, each (block, kv) pair owns one "page run":
// page_elems contiguous elements (block_size x num_kv_heads x head_dim, or block_size x
// latent_dim for MLA). Where a run lies is given by two strides, so the three layouts are one
// case here:
//   kv_first     [2, num_blocks, block_size, heads, head_dim]: kv_stride = num_blocks*page,
//                                                            block_stride = page
//   block_first  [num_blocks, 2, block_size, heads, head_dim]: block_stride = 2*page,
//                                                            kv_stride = page
//   mla          [num_blocks, block_size, latent_dim]:         num_kv = 1, block_stride = page
// (or any strides torch gives for views of those shapes whose pages are contiguous).
//
// The gathered buffer is [num_layers, num_kv, num_pages, page_elems]: layer-major, K before V,
// pages in block_ids order.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KVOPS_HD __host__ __device__ __forceinline__
#else
#define KVOPS_HD inline
#endif

namespace kvops {

// Geometry of one paged copy; identical for every layer (the Python side checks that).
struct PagedGeom {
  int64_t num_layers;
  int64_t num_kv;        // 2 (K, V) or 1 (MLA latent)
  int64_t num_pages;     // len(block_ids)
  int64_t page_elems;    // elements in one page run
  int64_t block_stride;  // elements between block b and b+1 in a layer
  int64_t kv_stride;     // elements between K and V of one block (0 when num_kv == 1)
};

// Number of page runs a copy moves: one per (layer, kv, page).
KVOPS_HD int64_t num_runs(const PagedGeom& g) { return g.num_layers * g.num_kv * g.num_pages; }

// Decompose a run index (the gathered buffer's order) into its (layer, kv, page) coordinates.
KVOPS_HD void run_coords(const PagedGeom& g, int64_t run, int64_t* layer, int64_t* kv,
                         int64_t* page) {
  *page = run % g.num_pages;
  const int64_t layer_kv = run / g.num_pages;
  *kv = layer_kv % g.num_kv;
  *layer = layer_kv / g.num_kv;
}

// Offset of the run (block_id, kv) inside one layer's cache tensor.
KVOPS_HD int64_t cache_run_offset(const PagedGeom& g, int64_t block_id, int64_t kv) {
  return block_id * g.block_stride + kv * g.kv_stride;
}

// Offset of the run (layer, kv, page) inside the gathered buffer.
KVOPS_HD int64_t gathered_run_offset(const PagedGeom& g, int64_t layer, int64_t kv,
                                     int64_t page) {
  return ((layer * g.num_kv + kv) * g.num_pages + page) * g.page_elems;
}

// Offset of the run's first scale in the gathered scales buffer (one fp32 per group).
KVOPS_HD int64_t gathered_scale_offset(const PagedGeom& g, int64_t layer, int64_t kv,
                                       int64_t page, int64_t group_size) {
  return gathered_run_offset(g, layer, kv, page) / group_size;
}

}  // namespace kvops
