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

// hyper (fp64 [G, kHyperFields], per param group); coef (fp32 [S, kCoefFields], per parameter slot: the slot's
// group's hyperparameters with the slot's own bias corrections, the gradient scale = clip factor x (-1 if
// maximize), and whether the slot is updated this step); control (fp32 [kControlFields]).
enum HyperField : int64_t { kHLr = 0, kHBeta1, kHBeta2, kHEps, kHWd, kHMaxNorm, kHGradSign, kHyperFields };
enum CoefField : int64_t {
  kCBeta1 = 0, kCBeta2, kCEps, kCDecay, kCStepSize, kCInvSqrtBc2, kCOneMinusBeta1, kCOneMinusBeta2, kCGradScale,
  kCApply, kCoefFields
};
// skip: this step's active gradients were non-finite; clip: the clip factor; norm: the active-gradient L2 norm;
// skipped: steps skipped so far (accumulated, never reset by the scalars op).
enum ControlField : int64_t { kKSkip = 0, kKClip, kKNorm, kKSkipped, kControlFields };

constexpr int kQBlock = 256;  // 8-bit state: elements per absmax block

struct AdamCoef {
  float beta1, beta2, eps, decay, step_size, inv_sqrt_bc2, one_minus_beta1, one_minus_beta2, grad_scale, apply;
};

MU_FAST_HD AdamCoef load_coef(const float* coef, int64_t slot) {
  const float* c = coef + slot * kCoefFields;
  return AdamCoef{c[kCBeta1],         c[kCBeta2],         c[kCEps],        c[kCDecay],  c[kCStepSize],
                  c[kCInvSqrtBc2],    c[kCOneMinusBeta1], c[kCOneMinusBeta2], c[kCGradScale], c[kCApply]};
}

// Per-slot coefficients of one step (fp64 in, fp32 out), shared by the CPU and CUDA scalars ops. h: the slot's
// group row of hyper; t: the slot's step number after this step; scale: clip factor (fp64); apply: 1 to update
// the slot, 0 to leave it untouched (no gradient, or a skipped step).
MU_FAST_HD void write_coef(float* c, const double* h, double t, double scale, float apply) {
  const double bc1 = 1.0 - pow(h[kHBeta1], t), bc2 = 1.0 - pow(h[kHBeta2], t);
  c[kCBeta1] = static_cast<float>(h[kHBeta1]);
  c[kCBeta2] = static_cast<float>(h[kHBeta2]);
  c[kCEps] = static_cast<float>(h[kHEps]);
  c[kCDecay] = static_cast<float>(1.0 - h[kHLr] * h[kHWd]);
  c[kCStepSize] = static_cast<float>(h[kHLr] / bc1);
  c[kCInvSqrtBc2] = static_cast<float>(1.0 / sqrt(bc2));
  // 1 - beta in fp64: fp32(0.999) is off by 1e-8, which is 1.3e-5 of 1 - 0.999.
  c[kCOneMinusBeta1] = static_cast<float>(1.0 - h[kHBeta1]);
  c[kCOneMinusBeta2] = static_cast<float>(1.0 - h[kHBeta2]);
  c[kCGradScale] = static_cast<float>(scale * h[kHGradSign]);
  c[kCApply] = apply;
}

// The control vector from the fp64 sum of squared active gradients; returns the clip factor (fp64). Finite
// fp32/bf16/fp16 gradients never overflow an fp64 sum of squares, so only a NaN/inf gradient sets skip.
MU_FAST_HD double write_control(float* k, double total, double max_norm, bool has_stats, bool check_finite) {
  const double norm = sqrt(total);
  const float skip = (check_finite && !(total <= 1.7976931348623157e308)) ? 1.f : 0.f;  // NaN or inf
  double clip = 1.0;
  if (has_stats && max_norm > 0) {
    clip = max_norm / (norm + 1e-6);
    clip = clip < 1.0 ? clip : 1.0;
  }
  k[kKSkip] = skip;
  k[kKClip] = static_cast<float>(clip);
  k[kKNorm] = static_cast<float>(norm);
  k[kKSkipped] += skip;
  return clip;
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
