// Shared by masked_adamw_cpu.cpp and masked_adamw_cuda.cu: the table layouts (mirrors of
// mu_fast/optim/segments.py and mu_fast/optim/masked_adamw.py) and the per-element AdamW update.
#pragma once

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MU_FAST_HD __host__ __device__ __forceinline__
#else
#define MU_FAST_HD inline
#endif

// Parameter dtypes the kernels support (float64 parameters use the torch reference backend).
#define MU_FAST_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)             \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace mu_fast {

// Tile row (int64): see mu_fast/optim/segments.py.
enum TileField : int64_t {
  kSlot = 0, kGroup, kKind, kBase, kRunLen, kRunStride, kK0, kCount, kState0, kTileFields
};
constexpr int64_t kStrided = 0;
constexpr int64_t kIndexed = 1;
constexpr int64_t kColumns = 2;

// hyper (fp64 [G, kHyperFields]), coef (fp32 [G, kCoefFields]), control (fp32 [kControlFields]).
enum HyperField : int64_t { kHLr = 0, kHBeta1, kHBeta2, kHEps, kHWd, kHMaxNorm, kHyperFields };
enum CoefField : int64_t {
  kCBeta1 = 0, kCBeta2, kCEps, kCDecay, kCStepSize, kCInvSqrtBc2, kCOneMinusBeta1, kCOneMinusBeta2, kCoefFields
};
enum ControlField : int64_t { kKSkip = 0, kKClip, kKNorm, kControlFields = 4 };

constexpr int kQBlock = 256;  // 8-bit state: elements per absmax block

struct AdamCoef {
  float beta1, beta2, eps, decay, step_size, inv_sqrt_bc2, one_minus_beta1, one_minus_beta2;
};

MU_FAST_HD AdamCoef load_coef(const float* coef, int64_t group) {
  const float* c = coef + group * kCoefFields;
  return AdamCoef{c[kCBeta1],     c[kCBeta2],         c[kCEps],           c[kCDecay],
                  c[kCStepSize], c[kCInvSqrtBc2], c[kCOneMinusBeta1], c[kCOneMinusBeta2]};
}

// One AdamW step of one element, fp32: decoupled decay, moment updates, bias-corrected step.
MU_FAST_HD void adamw_element(float& p, float& m, float& v, float g, const AdamCoef& c) {
  p = p * c.decay;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) * c.inv_sqrt_bc2 + c.eps;
  p = p - c.step_size * (m / denom);
}

#ifdef __CUDACC__
// The same step with every operation IEEE round-to-nearest and none contracted into an FMA, whatever
// --use_fast_math says: the arithmetic of the torch reference. The 8-bit kernel needs it because block
// quantization feeds rounding back into the state: a 1-2 ulp difference in m / absmax flips a code at a tie
// (bf16 gradients put many normalized values exactly on midpoints), the flipped code changes the next step's m,
// and where m nearly cancels the exponentially dense map turns that into several codes. (Emulated on the CPU:
// +-2 ulp of noise on m / absmax gave up to 45 codes of difference after 3 bf16 steps, none in fp32 state.)
__device__ __forceinline__ void adamw_element_ieee(float& p, float& m, float& v, float g, const AdamCoef& c) {
  p = __fmul_rn(p, c.decay);
  m = __fadd_rn(__fmul_rn(c.beta1, m), __fmul_rn(c.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(c.beta2, v), __fmul_rn(__fmul_rn(c.one_minus_beta2, g), g));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), c.inv_sqrt_bc2), c.eps);
  p = __fsub_rn(p, __fmul_rn(c.step_size, __fdiv_rn(m, denom)));
}
#endif

// Nearest code of x in a sorted 256-entry map, from its midpoints (255 values then +inf): the number of
// midpoints strictly below x (ties go to the lower code), by an 8-step branch-free binary search.
// Written out (no inner loop) so CPU compilers vectorize a loop of calls with gathers.
MU_FAST_HD int quantize_code(float x, const float* mids) {
  int pos = 0;
  pos += (mids[pos + 127] < x) ? 128 : 0;
  pos += (mids[pos + 63] < x) ? 64 : 0;
  pos += (mids[pos + 31] < x) ? 32 : 0;
  pos += (mids[pos + 15] < x) ? 16 : 0;
  pos += (mids[pos + 7] < x) ? 8 : 0;
  pos += (mids[pos + 3] < x) ? 4 : 0;
  pos += (mids[pos + 1] < x) ? 2 : 0;
  pos += (mids[pos] < x) ? 1 : 0;
  return pos;
}

}  // namespace mu_fast
