// copy_hash.h built for the baseline instruction set (SSE2 on x86-64).
#include "copy_hash.h"

extern "C" uint64_t kvops_copy_hash_base(char* dst, const char* src, size_t num_bytes) {
  return copy_hash(dst, src, num_bytes);
}

extern "C" uint64_t kvops_copy_hash_split_base(char* dst, const char* src, size_t num_bytes) {
  return copy_hash_split(dst, src, num_bytes);
}
