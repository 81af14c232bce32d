// copy_hash.h built with -mavx2 (csrc/CMakeLists.txt); used only where the CPU has AVX2.
#include "copy_hash.h"

extern "C" uint64_t kvops_copy_hash_avx2(char* dst, const char* src, size_t num_bytes) {
  return copy_hash(dst, src, num_bytes);
}

extern "C" uint64_t kvops_copy_hash_split_avx2(char* dst, const char* src, size_t num_bytes) {
  return copy_hash_split(dst, src, num_bytes);
}
