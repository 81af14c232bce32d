// A minimal parallel-for on std::thread for the CPU kernels.
//
// NOTE: std::thread rather than OpenMP: torch ships its own OpenMP runtime, and two runtimes in
// one process oversubscribe cores and misbehave after fork. Threads are started per call; that
// costs tens of microseconds, so callers ask for one thread when the work is small.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <thread>
#include <vector>

namespace kvops {

// Calls fn(begin, end) over [0, num_items) split into num_threads contiguous chunks, the last
// one on the calling thread. Returns when every chunk is done.
template <typename Fn>
void parallel_for(int64_t num_items, int64_t num_threads, const Fn& fn) {
  num_threads = std::max<int64_t>(1, std::min(num_threads, num_items));
  if (num_threads == 1) {
    if (num_items > 0) fn(int64_t{0}, num_items);
    return;
  }
  const int64_t chunk = (num_items + num_threads - 1) / num_threads;
  std::vector<std::thread> workers;
  workers.reserve(num_threads - 1);
  for (int64_t t = 0; t + 1 < num_threads; ++t) {
    const int64_t begin = t * chunk;
    const int64_t end = std::min(num_items, begin + chunk);
    if (begin < end) workers.emplace_back([=, &fn] { fn(begin, end); });
  }
  const int64_t last = (num_threads - 1) * chunk;
  if (last < num_items) fn(last, num_items);
  for (auto& w : workers) w.join();
}

}  // namespace kvops
