// Helpers shared by the CUDA kernels: the layer-pointer chunk passed by value, the reused
// vectorized copy, a warp max, the device guard and launch-error reporting.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "kvops/abi.h"
#include "kvops/index.h"

namespace kvops {

// Layer base pointers travel in the kernel's parameters, so no pointer array is uploaded (and
// nothing synchronizes). A launch covers at most this many layers; the host wrapper loops.
constexpr int kMaxLayersPerLaunch = 64;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;

struct LayerChunk {
  void* ptrs[kMaxLayersPerLaunch];
  int64_t first_layer;  // index of ptrs[0] in the whole list (the gathered buffer's order)
};

// Records a message for kvops_last_error() (thread-local; defined in module.cpp).
void set_last_error(const char* message);

// Returns kOk, or kLaunchFailed after recording cudaGetLastError()'s message.
inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return kOk;
  set_last_error(cudaGetErrorString(err));
  return kLaunchFailed;
}

// Makes exec->device current for the call and restores the caller's device after, like
// torch's device guard (the stream belongs to that device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Calls launch(chunk, num_layers_in_chunk) for successive chunks of the layer list.
template <typename Launch>
int for_layer_chunks(const kvops_pages& pages, const Launch& launch) {
  for (int64_t first = 0; first < pages.num_layers; first += kMaxLayersPerLaunch) {
    LayerChunk chunk{};
    chunk.first_layer = first;
    const int64_t count =
        pages.num_layers - first < kMaxLayersPerLaunch ? pages.num_layers - first
                                                       : kMaxLayersPerLaunch;
    for (int64_t i = 0; i < count; ++i) chunk.ptrs[i] = pages.layer_ptrs[first + i];
    launch(chunk, count);
    const int status = launch_status();
    if (status != kOk) return status;
  }
  return kOk;
}

template <typename V>
__device__ __forceinline__ void copy_as(char* dst, const char* src, int64_t num_bytes, int tid,
                                        int num_threads) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  const int64_t n = num_bytes / static_cast<int64_t>(sizeof(V));
#pragma unroll 4
  for (int64_t i = tid; i < n; i += num_threads) d[i] = s[i];
}

// The one vectorized copy: threads [0, num_threads) of the caller copy num_bytes with the
// widest access (16 bytes, else 8, 4, 2, 1) that both pointers and the size allow. Page runs
// of real caches are 16-byte aligned, so the 16-byte path is the one that runs.
__device__ __forceinline__ void copy_run(char* dst, const char* src, int64_t num_bytes, int tid,
                                         int num_threads) {
  const uint64_t align = reinterpret_cast<uint64_t>(dst) | reinterpret_cast<uint64_t>(src) |
                         static_cast<uint64_t>(num_bytes);
  if ((align & 15) == 0) {
    copy_as<uint4>(dst, src, num_bytes, tid, num_threads);
  } else if ((align & 7) == 0) {
    copy_as<uint2>(dst, src, num_bytes, tid, num_threads);
  } else if ((align & 3) == 0) {
    copy_as<uint32_t>(dst, src, num_bytes, tid, num_threads);
  } else if ((align & 1) == 0) {
    copy_as<uint16_t>(dst, src, num_bytes, tid, num_threads);
  } else {
    copy_as<uint8_t>(dst, src, num_bytes, tid, num_threads);
  }
}

__device__ __forceinline__ int32_t warp_max(int32_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int32_t other = __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

}  // namespace kvops
