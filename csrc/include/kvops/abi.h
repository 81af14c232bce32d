// The C ABI of the kernel libraries (_kvops_cpu and _kvops_cuda export the same names).
// kvstore/ops/_lib.py loads them with ctypes and mirrors these structs; it validates every
// argument first (dtype, shapes, ids in range, buffer sizes), so the entry points only guard
// against what would be a bug there. Every entry point returns a kvops::Status.
#pragma once

#include <stdint.h>

#include "kvops/index.h"

namespace kvops {

enum Status : int {
  kOk = 0,
  kBadDtype = 1,     // dtype code outside DtypeCode
  kBadArgument = 2,  // a size or pointer that validation should have caught
  kLaunchFailed = 3  // CUDA launch error; the message is in kvops_last_error()
};

}  // namespace kvops

extern "C" {

// The pages to move, as seen by every layer. Pointers are host pointers for the CPU library;
// for the CUDA library layer_ptrs is a host array of device pointers and block_ids a device
// pointer.
struct kvops_pages {
  void* const* layer_ptrs;   // [num_layers] base pointer of each layer's cache tensor
  const int64_t* block_ids;  // [num_pages] validated: in range (and unique for scatters)
  int64_t num_layers;
  int64_t num_kv;
  int64_t num_pages;
  int64_t page_elems;
  int64_t block_stride;  // elements
  int64_t kv_stride;     // elements
};

// Where and how to run: num_threads for the CPU library; device index and stream
// (cudaStream_t) for the CUDA library.
struct kvops_exec {
  int64_t num_threads;
  int64_t device;
  void* stream;
};

int kvops_abi_version();

// Copy pages into / out of a gathered buffer [num_layers, num_kv, num_pages, page_elems].
int kvops_gather_pages(const kvops_pages* pages, int64_t elem_bytes, void* out,
                       const kvops_exec* exec);
int kvops_scatter_pages(const kvops_pages* pages, int64_t elem_bytes, const void* buf,
                        const kvops_exec* exec);

// CPU library only: copy pages into / out of per-block rows, row j at rows[j], laid out
// [num_layers, num_kv, page_elems] (kvstore.engine.blocks' stored form).
int kvops_gather_blocks(const kvops_pages* pages, int64_t elem_bytes, void* const* rows,
                        const kvops_exec* exec);
int kvops_scatter_blocks(const kvops_pages* pages, int64_t elem_bytes, const void* const* rows,
                         const kvops_exec* exec);

// Token-major tensors [heads, seq, head_dim] (one per layer and K/V, in row order; the same
// strides for all, head_dim dense) as seen by a copy into / out of per-block rows.
struct kvops_tokens {
  void* const* tensor_ptrs;  // [num_tensors]
  const int64_t* block_ids;  // [num_blocks] row j <-> tokens [block_ids[j]*block_size, +block_size)
  int64_t num_tensors;
  int64_t num_blocks;
  int64_t block_size;
  int64_t num_heads;
  int64_t head_dim;
  int64_t head_stride;   // elements
  int64_t token_stride;  // elements
};

// CPU library only: rows j laid out [num_tensors, block_size, heads, head_dim].
int kvops_gather_tokens(const kvops_tokens* tokens, int64_t elem_bytes, void* const* rows,
                        const kvops_exec* exec);
int kvops_scatter_tokens(const kvops_tokens* tokens, int64_t elem_bytes,
                         const void* const* rows, const kvops_exec* exec);

// CPU library only: the scatters above, row j only when its XXH3-64 (seed 0) equals
// expected[j]; ok[j] = 1 when it did, 0 when it did not match (its pages were not written).
int kvops_scatter_blocks_verified(const kvops_pages* pages, int64_t elem_bytes,
                                  const void* const* rows, const uint64_t* expected,
                                  uint8_t* ok, const kvops_exec* exec);
int kvops_scatter_tokens_verified(const kvops_tokens* tokens, int64_t elem_bytes,
                                  const void* const* rows, const uint64_t* expected,
                                  uint8_t* ok, const kvops_exec* exec);

// INT8 of num_groups groups of group_size contiguous values (see kvops/int8.h). The quantizing
// entry points add the number of non-finite groups to *num_nonfinite (host or device memory,
// as the library's other pointers).
int kvops_quantize_int8(const void* x, int dtype, int64_t num_groups, int64_t group_size,
                        int8_t* q, float* scales, int32_t* num_nonfinite,
                        const kvops_exec* exec);
int kvops_dequantize_int8(const int8_t* q, const float* scales, int64_t num_groups,
                          int64_t group_size, int dtype, void* out, const kvops_exec* exec);

// Fused forms: the gathered buffer is q [num_layers, num_kv, num_pages, page_elems] with
// scales [num_layers, num_kv, num_pages, page_elems / group_size].
int kvops_gather_quantize(const kvops_pages* pages, int dtype, int64_t group_size, int8_t* q,
                          float* scales, int32_t* num_nonfinite, const kvops_exec* exec);
int kvops_dequantize_scatter(const kvops_pages* pages, int dtype, int64_t group_size,
                             const int8_t* q, const float* scales, const kvops_exec* exec);

// Message of the last failed call on this thread ("" if none).
const char* kvops_last_error();
}

namespace kvops {

// The geometry of the index header, from the ABI struct.
inline PagedGeom geom_of(const kvops_pages& p) {
  return PagedGeom{p.num_layers, p.num_kv, p.num_pages, p.page_elems, p.block_stride,
                   p.kv_stride};
}

}  // namespace kvops
