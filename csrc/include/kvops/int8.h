// Symmetric INT8 quantization of one group, shared by the CPU and the CUDA implementation so
// that both produce the same bytes.
//
// Per group of group_size contiguous values: scale = amax / 127 (fp32), q = round(x / scale)
// to nearest even, in [-127, 127]. Error bound: |x - q * scale| <= scale / 2 (plus fp32
// rounding of the division), i.e. at most amax / 254 per element. A group of zeros gets
// scale 0 and q 0 (no division). A group holding inf or NaN gets scale NaN and q 0, and is
// counted so that the caller can reject the input.
#pragma once

#include <stdint.h>

#include "kvops/index.h"

namespace kvops {

constexpr float kInt8Max = 127.0f;

// Largest finite float; anything not <= this (inf, NaN) is "not finite".
constexpr float kFloatMax = 3.40282347e+38f;

KVOPS_HD float abs_f(float x) { return x < 0.0f ? -x : x; }

// scale of a group from its largest magnitude (amax >= 0, finite).
KVOPS_HD float group_scale(float amax) { return amax / kInt8Max; }

// round(x / scale) to nearest even, for scale > 0 and finite (callers write 0 for zero and
// non-finite groups, outside their inner loops). NOTE: 1.5 * 2^23 added and subtracted rounds any |r| <
// 2^22 to an integer under the default rounding mode; unlike rintf it vectorizes with plain
// SSE2 and gives the same result on host and device (|r| <= 127 here).
KVOPS_HD int8_t quantize_one(float x, float scale) {
  float r = x / scale;
  r = (r + 12582912.0f) - 12582912.0f;
  r = r > kInt8Max ? kInt8Max : (r < -kInt8Max ? -kInt8Max : r);
  return static_cast<int8_t>(r);
}

}  // namespace kvops
