// Symmetric INT8 quantization of one group, shared by the CPU and the CUDA implementation so
// that both produce the same bytes.
//
// Per group of group_size contiguous values: scale = amax / 127 (fp32), and
// q = round(x * (127 / amax)) to nearest even, in [-127, 127] (a multiply by the fp32 inverse
// rather than a divide by scale: 30% faster on the CPU, and the same on both devices). Error
// bound: |x - q * scale| <= scale / 2 plus fp32 rounding (about 127 * 2^-22 * scale), i.e.
// about amax / 254 per element. A group of zeros (amax < 2^-120) gets
// scale 0 and q 0 (no division). A group holding inf or NaN gets scale NaN and q 0, and is
// counted so that the caller can reject the input.
#pragma once

#include <stdint.h>

#include "kvops/dtypes.h"
#include "kvops/index.h"

namespace kvops {

constexpr float kInt8Max = 127.0f;

// A value's magnitude as integer bits of its own type. NOTE: for non-negative IEEE values the
// bit patterns order like the values, so the group maximum is an integer max (vectorizes
// without fast-math, and for 16-bit types takes twice the lanes of a float max), and any
// pattern above kMaxFinite is inf or NaN, so the same reduction finds non-finite groups.
template <typename T> struct Magnitude;

template <> struct Magnitude<f16> {
  using Bits = int16_t;
  static constexpr Bits kMaxFinite = 0x7BFF;
  static KVOPS_HD Bits of(f16 x) { return static_cast<Bits>(x.bits & 0x7FFF); }
  static KVOPS_HD float value(Bits b) { return to_float(f16{static_cast<uint16_t>(b)}); }
};

template <> struct Magnitude<bf16> {
  using Bits = int16_t;
  static constexpr Bits kMaxFinite = 0x7F7F;
  static KVOPS_HD Bits of(bf16 x) { return static_cast<Bits>(x.bits & 0x7FFF); }
  static KVOPS_HD float value(Bits b) { return to_float(bf16{static_cast<uint16_t>(b)}); }
};

template <> struct Magnitude<float> {
  using Bits = int32_t;
  static constexpr Bits kMaxFinite = 0x7F7FFFFF;
  static KVOPS_HD Bits of(float x) { return static_cast<Bits>(float_bits(x) & 0x7FFFFFFFu); }
  static KVOPS_HD float value(Bits b) { return bits_float(static_cast<uint32_t>(b)); }
};

// Groups whose largest magnitude is below this are stored as zeros with scale 0: 127 / amax
// would overflow near the bottom of the float range. The error this adds is below 2^-120.
constexpr float kMinAmax = 0x1.0p-120f;

KVOPS_HD bool group_is_zero(float amax) { return amax < kMinAmax; }

// scale of a group from its largest magnitude (amax >= kMinAmax, finite).
KVOPS_HD float group_scale(float amax) { return amax / kInt8Max; }

// what x is multiplied by before rounding (amax >= kMinAmax, finite).
KVOPS_HD float group_inv_scale(float amax) { return kInt8Max / amax; }

// round(x * inv_scale) to nearest even, for inv_scale = group_inv_scale(amax) (callers write 0
// for zero and non-finite groups, outside their inner loops).
// NOTE: 1.5 * 2^23 added and subtracted rounds any |r| < 2^22 to an integer under the default
// rounding mode; unlike rintf it vectorizes with plain SSE2 and gives the same result on host
// and device. Every build compiles this without FMA contraction (-ffp-contract=off,
// --fmad=false): fusing x * inv_scale into the add would round once instead of twice.
KVOPS_HD int8_t quantize_one(float x, float inv_scale) {
  float r = x * inv_scale;
  r = (r + 12582912.0f) - 12582912.0f;
  // NOTE: no clamp: |x| <= amax, and the two roundings (127 / amax, then the product) give
  // |r| <= 127 * (1 + 2^-23) < 127.5 before rounding, so |r| <= 127 after. (A clamp here costs
  // a third of the loop's time: compilers cannot turn it into min/max without fast-math.)
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

}  // namespace kvops
