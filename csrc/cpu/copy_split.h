// A large copy shared with one helper thread (issue 15: a same-host 4 MiB put at the
// machine's copy bandwidth, not one core's).
//
// The range [0, len) is split at ``split``: the calling thread does [0, split) itself; the
// tail [split, len) is cut into chunks that the helper and the caller both take, in order,
// from one counter. The helper starts on the tail's first chunk at once; the caller, done with
// the head, takes whatever chunk is next (an untaken chunk it copies itself, one the helper
// took it waits for). So the call never waits on a helper that was not scheduled (a loaded
// machine): the caller then simply does the whole range, as one thread would.
//
// Lifetime: the helper is a detached std::thread holding the state by shared_ptr; it touches
// the buffers only for chunks it took, and the caller returns only after every chunk it did
// not copy itself is done, so no thread reads or writes the caller's buffers after the call.
// A helper that starts late finds every chunk taken and exits without touching them.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <memory>
#include <thread>

namespace kvsplit {

// Most chunks of one tail (the done flags are a fixed array).
constexpr size_t kMaxChunks = 64;
// Smallest chunk: NOTE: each chunk costs one atomic claim and one flag; 64 KiB is ~4 us of
// copy, far above that.
constexpr size_t kMinChunkBytes = size_t{64} << 10;

struct SplitState {
  char* dst;
  const char* src;
  size_t split;        // the tail starts here
  size_t len;
  size_t chunk_bytes;  // the last chunk also takes the rest up to len (so it is the longest)
  size_t num_chunks;
  std::atomic<size_t> next{0};                // the next chunk nobody took
  std::atomic<uint8_t> done[kMaxChunks] = {};  // set (release) by the helper per chunk copied

  size_t chunk_begin(size_t c) const { return split + c * chunk_bytes; }
  size_t chunk_end(size_t c) const {
    return c + 1 == num_chunks ? len : chunk_begin(c) + chunk_bytes;
  }
  size_t chunk_of(size_t offset) const {
    const size_t c = (offset - split) / chunk_bytes;
    return c < num_chunks ? c : num_chunks - 1;
  }
};

// A state for copying src[0, len) to dst with the tail from ``split`` (a multiple of
// ``align_bytes``, at least kMinChunkBytes before len) shared; chunks are multiples of
// ``align_bytes`` too, and the last one runs to len. NOTE: so a 64-byte stripe never spans
// two chunks that different threads copy (copy_hash.h's last stripe ends at len).
inline std::shared_ptr<SplitState> make_split(char* dst, const char* src, size_t len,
                                              size_t split, size_t align_bytes) {
  auto state = std::make_shared<SplitState>();
  state->dst = dst;
  state->src = src;
  state->split = split;
  state->len = len;
  size_t chunk = (len - split + kMaxChunks - 1) / kMaxChunks;
  if (chunk < kMinChunkBytes) chunk = kMinChunkBytes;
  chunk = (chunk + align_bytes - 1) / align_bytes * align_bytes;
  state->chunk_bytes = chunk;
  state->num_chunks = (len - split) / chunk;
  if (state->num_chunks == 0) state->num_chunks = 1;
  return state;
}

// Starts the helper: it copies, with copy_fn(dst, src, num_bytes), each chunk it takes, then
// sets its flag. Returns false (nothing started: the caller does every chunk) when no thread
// could be made.
template <typename CopyFn>
bool start_helper(const std::shared_ptr<SplitState>& state, CopyFn copy_fn) {
  try {
    std::thread([state, copy_fn] {
      for (;;) {
        const size_t c = state->next.fetch_add(1, std::memory_order_acq_rel);
        if (c >= state->num_chunks) return;
        const size_t begin = state->chunk_begin(c);
        copy_fn(state->dst + begin, state->src + begin, state->chunk_end(c) - begin);
        state->done[c].store(1, std::memory_order_release);
      }
    }).detach();
  } catch (...) {
    return false;  // NOTE: e.g. EAGAIN at a thread limit: one thread is still correct
  }
  return true;
}

// The caller's claim of chunk c, taken in order: true when it is the caller's to copy (nobody
// took it), false when the helper took it (then wait_helper before reading it in dst).
inline bool claim(SplitState& state, size_t c) {
  size_t expected = c;
  return state.next.compare_exchange_strong(expected, c + 1, std::memory_order_acq_rel);
}

// Waits until the helper has copied chunk c (which it took).
inline void wait_helper(SplitState& state, size_t c) {
  while (!state.done[c].load(std::memory_order_acquire)) {
    std::this_thread::yield();
  }
}

}  // namespace kvsplit
