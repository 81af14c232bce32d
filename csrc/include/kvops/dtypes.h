// Element types of the kernels, their float conversions, and the dtype dispatch.
//
// fp16 and bf16 are carried as 16-bit patterns (no torch or CUDA headers needed on the host).
// Conversions round to nearest even, like torch's, so that CPU results equal a torch reference
// bit for bit; the host versions are branch-free so that loops over them vectorize.
#pragma once

#include <stdint.h>
#include <string.h>

#include "kvops/index.h"

namespace kvops {

// Dtype codes of the C ABI; kvstore/ops/_lib.py holds the same table.
enum DtypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

KVOPS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

KVOPS_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// IEEE half -> float. NOTE: the branch-free formulation of the FP16 library (M. Dukhan, MIT),
// the one c10 uses: normals by rebiasing the exponent, subnormals with a magic-number subtract.
KVOPS_HD float to_float(f16 h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  // NOTE: signed compares on values below 2^31 (here and in from_float<f16>): SSE2 and AVX2
  // have no unsigned 32-bit vector compare, and with one these loops would not vectorize.
  // (w & 0x7FFFFFFF) < 2^26 is two_w < 2^27: a subnormal or zero half.
  const bool subnormal = static_cast<int32_t>(w & 0x7FFFFFFFu) < (1 << 26);
  const uint32_t magnitude = subnormal ? float_bits(denormalized) : float_bits(normalized);
  return bits_float(sign | magnitude);
}

KVOPS_HD float to_float(bf16 h) { return bits_float(static_cast<uint32_t>(h.bits) << 16); }
KVOPS_HD float to_float(float x) { return x; }

template <typename T> KVOPS_HD T from_float(float x);

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN (FP16 library).
template <> KVOPS_HD f16 from_float<f16>(float f) {
  float base = (f < 0 ? -f : f) * 0x1.0p+112f * 0x1.0p-110f;
  const uint32_t w = float_bits(f);
  const uint32_t sign = w & 0x80000000u;
  // exponent bits, kept >= 0x38800000 (= (0x71000000 >> 1): the subnormal-half threshold)
  int32_t exponent = static_cast<int32_t>(w & 0x7F800000u);
  exponent = exponent < 0x38800000 ? 0x38800000 : exponent;
  base = bits_float(static_cast<uint32_t>(exponent) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const bool is_nan = static_cast<int32_t>(w & 0x7FFFFFFFu) > 0x7F800000;
  return f16{static_cast<uint16_t>((sign >> 16) | (is_nan ? 0x7E00u : nonsign))};
}

// float -> bfloat16, round to nearest even; NaN is kept quiet rather than rounded to inf.
template <> KVOPS_HD bf16 from_float<bf16>(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;
  return bf16{static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded)};
}

template <> KVOPS_HD float from_float<float>(float f) { return f; }

}  // namespace kvops

// Dispatch on the floating set {fp16, bf16, fp32}: runs BODY with `scalar_t` bound to the
// element type of CODE; an unknown code makes the enclosing function return kBadDtype.
#define KVOPS_DISPATCH_FLOATING(CODE, ...)                  \
  switch (CODE) {                                           \
    case ::kvops::kFloat16: {                               \
      using scalar_t = ::kvops::f16;                        \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::kvops::kBFloat16: {                              \
      using scalar_t = ::kvops::bf16;                       \
      __VA_ARGS__;                                          \
    } break;                                                \
    case ::kvops::kFloat32: {                               \
      using scalar_t = float;                               \
      __VA_ARGS__;                                          \
    } break;                                                \
    default:                                                \
      return ::kvops::kBadDtype;                            \
  }
