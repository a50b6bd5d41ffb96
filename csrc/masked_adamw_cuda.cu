// Masked AdamW on CUDA: one thread block per tile of the segment table, one launch for all tensors of a dtype.
//
// Semantics, table layouts and the per-element math are those of mu_fast/optim/masked_adamw.py and
// masked_adamw_common.h. Parameter and gradient addresses travel in the kernel's by-value argument (SlotPtrs, up
// to kMaxSlots tensors per launch; more slots take one launch per chunk, each skipping the tiles of other chunks),
// so the step holds no host-side state and is CUDA-graph capturable. Learning rate, bias corrections, gradient
// scale (clip factor, sign) and whether a parameter is updated at all are read from device memory, one coef row
// per parameter (a parameter without a gradient, or every parameter on a skipped step, has apply = 0 and its
// tiles return at once). Reductions (per-tile fp64 sums of squares, 8-bit block absmax) use a fixed order, so
// results do not depend on scheduling.
//
// Memory access: tiles of contiguous, 8-aligned strided runs (whole tensors, row blocks, head blocks, runs of >= 8
// adjacent columns; see vectorizable()) move 8 elements per access (16 B of bf16, 2 x 16 B of fp32 state) with
// two vectors in flight per thread; the fp32 state uses streaming (evict-first) accesses. Other tiles (scattered
// columns, element masks, unaligned shapes or views) take the scalar path, four elements in flight per thread.
//
// Limit: element addressing inside a strided run is 32-bit (segments.py keeps runs below 2^30 elements).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "masked_adamw_common.h"

namespace mu_fast {
namespace {

constexpr int kThreads = 256;  // == kQBlock: one 8-bit block per pass of a thread block
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010
constexpr int kMaxSlots = 900;  // 14.4 KB of pointers: CUDA >= 12.1 allows 32 KB of kernel parameters
#else
constexpr int kMaxSlots = 200;  // within the classic 4 KB parameter limit
#endif

template <typename T>
struct SlotPtrs {
  T* param[kMaxSlots];
  const T* grad[kMaxSlots];
  int64_t slot_begin;
  int64_t slot_end;
};

struct TileInfo {
  int64_t slot, group, kind, base, run_len, stride, k0, count, state0, r0;
  int c0;
};

__device__ __forceinline__ TileInfo load_tile(const int64_t* __restrict__ tiles, int64_t t) {
  const int64_t* row = tiles + t * kTileFields;
  TileInfo info;
  info.slot = row[kSlot];
  info.group = row[kGroup];
  info.kind = row[kKind];
  info.base = row[kBase];
  info.run_len = row[kRunLen];
  info.stride = row[kRunStride];
  info.k0 = row[kK0];
  info.count = row[kCount];
  info.state0 = row[kState0];
  info.r0 = info.k0 / info.run_len;
  info.c0 = static_cast<int>(info.k0 - info.r0 * info.run_len);
  return info;
}

__device__ __forceinline__ int64_t flat_of(const TileInfo& t, int j, const int32_t* __restrict__ index) {
  if (t.kind == kIndexed) return index[t.base + t.k0 + j];
  const unsigned local = static_cast<unsigned>(t.c0 + j), run = static_cast<unsigned>(t.run_len);
  const unsigned r = local / run, c = local - r * run;
  if (t.kind == kColumns) return (t.r0 + r) * t.stride + index[t.base + c];
  return t.base + (t.r0 + r) * t.stride + c;
}

// Fixed-order block reductions (warp shuffles, then one warp over the warp results), of float or double.
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V x, Op op) {
  __shared__ V warp_vals[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(0xffffffffu, x, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_vals[warp] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_vals[threadIdx.x] : V(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_down_sync(0xffffffffu, x, o));
  __syncthreads();  // warp_vals is reused by the next call
  return x;         // valid in thread 0
}
struct Add {
  template <typename V>
  __device__ V operator()(V a, V b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, bool COMPACT>
__device__ __forceinline__ float load_grad(const T* g, const float* cgrad, int64_t flat, int64_t st) {
  if (COMPACT) return cgrad[st];
  return g != nullptr ? static_cast<float>(g[flat]) : 0.f;
}

// ------------------------------------------------------------------------------------------ vector accesses
// A tile is vectorizable when it is strided, every aligned group of kVec elements lies inside one run and is
// 16-byte aligned in the parameter, the gradient and the state (segments.py aligns the state of such segments),
// and the tensors' base addresses are 16-byte aligned. Such tiles move 16 B per bf16 access instead of 2 B.
constexpr int kVec = 8;           // elements per vector: 16 B of bf16/fp16 (one access), 32 B of fp32 (two)
constexpr int kVecPerThread = 2;  // vectors in flight per thread (4096-element tiles: one pass of 256 threads)
constexpr int kUnroll = 4;        // scalar path: elements in flight per thread

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ bool vectorizable(const TileInfo& t, const void* p, const void* g) {
  const bool one_run = t.k0 + t.count <= t.run_len;  // the stride is never used inside the first run
  return t.kind == kStrided && ((t.base | t.run_len | t.k0 | t.count | t.state0) & (kVec - 1)) == 0 &&
         (one_run || (t.stride & (kVec - 1)) == 0) && aligned16(p) && aligned16(g);
}

// Flat offset of vector vi (elements k0 + kVec*vi ...) of a vectorizable tile: one 32-bit division per vector.
__device__ __forceinline__ int64_t vec_flat(const TileInfo& t, int vi) {
  const unsigned local = static_cast<unsigned>(t.c0 + vi * kVec), run = static_cast<unsigned>(t.run_len);
  const unsigned r = local / run, c = local - r * run;
  return t.base + (t.r0 + r) * t.stride + c;
}

template <typename T>
__device__ __forceinline__ void load8(const T* src, float (&x)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(src)[0], b = reinterpret_cast<const float4*>(src)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = static_cast<float>(h[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* dst, const float (&x)[kVec]) {
  if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
    uint4 raw;
    T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] = static_cast<T>(x[i]);
    *reinterpret_cast<uint4*>(dst) = raw;
  }
}

// fp32 state touched once per step: streaming (evict-first) accesses keep L2 for the gradients, which the
// statistics pass has just read and the update reads again.
__device__ __forceinline__ void load8_stream(const float* src, float (&x)[kVec]) {
  const float4 a = __ldcs(reinterpret_cast<const float4*>(src)), b = __ldcs(reinterpret_cast<const float4*>(src) + 1);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}

__device__ __forceinline__ void store8_stream(float* dst, const float (&x)[kVec]) {
  __stcs(reinterpret_cast<float4*>(dst), make_float4(x[0], x[1], x[2], x[3]));
  __stcs(reinterpret_cast<float4*>(dst) + 1, make_float4(x[4], x[5], x[6], x[7]));
}

template <typename T, bool COMPACT>
__device__ __forceinline__ void load8_grad(const T* g, const float* cgrad, int64_t flat, int64_t st,
                                           float (&x)[kVec]) {
  if (COMPACT) {
    load8<float>(cgrad + st, x);
  } else if (g != nullptr) {
    load8<T>(g + flat, x);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = 0.f;
  }
}

template <typename T, bool COMPACT>
__global__ void __launch_bounds__(kThreads)
    grad_sumsq_kernel(const int64_t* __restrict__ tiles, const int32_t* __restrict__ index, const SlotPtrs<T> ptrs,
                      const float* __restrict__ cgrad, double* __restrict__ partial) {
  // Squares are summed in fp64: a finite gradient (|g| < 3.4e38) never overflows the statistic, so only a NaN/inf
  // gradient trips the non-finite skip, and the clip norm stays exact for huge gradients.
  // Tiles in reverse order: the update walks them forward, so it starts on the gradients read last, which are
  // still in L2 (all of them when the active gradients fit in L2, ~22 MB for 5% of a Llama-3-8B layer).
  const int64_t tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const TileInfo t = load_tile(tiles, tile);
  if (t.slot < ptrs.slot_begin || t.slot >= ptrs.slot_end) return;  // another chunk's tile (uniform per block)
  const T* g = ptrs.grad[t.slot - ptrs.slot_begin];
  double acc = 0.0;
  if (!COMPACT && g == nullptr) {
    // a parameter without .grad: zero gradient, nothing to read
  } else if (COMPACT ? ((t.k0 | t.count | t.state0) & (kVec - 1)) == 0 && aligned16(cgrad) : vectorizable(t, g, g)) {
    // Compact gradients are contiguous in state order whatever the tile's kind: only the state alignment matters.
    const int nvec = static_cast<int>(t.count / kVec);
    for (int v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kVecPerThread) {
      float x[kVecPerThread][kVec];
#pragma unroll
      for (int u = 0; u < kVecPerThread; ++u) {
        const int vi = v0 + u * kThreads;
        if (vi < nvec) {
          const int64_t st = t.state0 + t.k0 + static_cast<int64_t>(vi) * kVec;
          load8_grad<T, COMPACT>(g, cgrad, COMPACT ? 0 : vec_flat(t, vi), st, x[u]);
        } else {
#pragma unroll
          for (int i = 0; i < kVec; ++i) x[u][i] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kVecPerThread; ++u)
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc += static_cast<double>(x[u][i]) * x[u][i];
    }
  } else {
    for (int j0 = threadIdx.x; j0 < t.count; j0 += kThreads * kUnroll) {
      float x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kThreads;
        x[u] = j < t.count ? load_grad<T, COMPACT>(g, cgrad, COMPACT ? 0 : flat_of(t, j, index), t.state0 + t.k0 + j)
                           : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc += static_cast<double>(x[u]) * x[u];
    }
  }
  acc = block_reduce(acc, Add());
  if (threadIdx.x == 0) partial[tile] = acc;
}

// One block: the fixed-order fp64 reduction of the per-tile sums, the control vector (thread 0), then one
// coefficient row per parameter slot (threads over slots: each slot has its own step count and bias corrections).
__global__ void __launch_bounds__(kThreads)
    scalars_kernel(const double* __restrict__ hyper, const int64_t* __restrict__ slot_group,
                   double* __restrict__ slot_step, const float* __restrict__ present, int64_t n_slots,
                   const double* __restrict__ partial, int64_t n_partial, float* __restrict__ coef,
                   float* __restrict__ control, int64_t groups, bool has_stats, bool check_finite) {
  __shared__ double s_clip;
  __shared__ float s_keep;
  double acc = 0.0;
  if (has_stats)
    for (int64_t i = threadIdx.x; i < n_partial; i += kThreads) acc += partial[i];
  const double total = block_reduce(acc, Add());
  if (threadIdx.x == 0) {
    s_clip = write_control(control, total, groups ? hyper[kHMaxNorm] : 0.0, has_stats, check_finite);
    s_keep = 1.f - control[kKSkip];
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < n_slots; s += kThreads) {
    const float apply = present[s] * s_keep;
    write_coef(coef + s * kCoefFields, hyper + slot_group[s] * kHyperFields, slot_step[s] + 1.0, s_clip, apply);
    slot_step[s] += apply;
  }
}

template <typename T, bool COMPACT, bool MASTER>
__global__ void __launch_bounds__(kThreads, 3)  // <= 85 registers: 3 blocks (768 threads) per SM
    update_kernel(const int64_t* __restrict__ tiles, const int32_t* __restrict__ index, const SlotPtrs<T> ptrs,
                  const float* __restrict__ cgrad, float* __restrict__ m, float* __restrict__ v,
                  float* __restrict__ master, const float* __restrict__ coef) {
  const TileInfo t = load_tile(tiles, blockIdx.x);
  if (t.slot < ptrs.slot_begin || t.slot >= ptrs.slot_end) return;
  const AdamCoef c = load_coef(coef, t.slot);
  if (c.apply == 0.f) return;  // no gradient for this parameter, or a skipped step: touch nothing
  const float scale = c.grad_scale;  // clip factor, negated for maximize
  T* p = ptrs.param[t.slot - ptrs.slot_begin];
  const T* g = ptrs.grad[t.slot - ptrs.slot_begin];
  const uintptr_t state_bases = reinterpret_cast<uintptr_t>(m) | reinterpret_cast<uintptr_t>(v) |
                                (MASTER ? reinterpret_cast<uintptr_t>(master) : 0) |
                                (COMPACT ? reinterpret_cast<uintptr_t>(cgrad) : 0);
  if ((state_bases & 15u) == 0 && vectorizable(t, p, COMPACT ? p : (g != nullptr ? g : p))) {
    const int nvec = static_cast<int>(t.count / kVec);
    for (int v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kVecPerThread) {
      float pv[kVecPerThread][kVec], gv[kVecPerThread][kVec], mv[kVecPerThread][kVec], vv[kVecPerThread][kVec];
      int64_t flat[kVecPerThread], st[kVecPerThread];
#pragma unroll
      for (int u = 0; u < kVecPerThread; ++u) {  // every load of the batch first: 80 B in flight per vector
        const int vi = v0 + u * kThreads;
        if (vi >= nvec) continue;
        flat[u] = vec_flat(t, vi);
        st[u] = t.state0 + t.k0 + static_cast<int64_t>(vi) * kVec;
        load8_grad<T, COMPACT>(g, cgrad, flat[u], st[u], gv[u]);
        if (MASTER) load8_stream(master + st[u], pv[u]);
        else load8<T>(p + flat[u], pv[u]);
        load8_stream(m + st[u], mv[u]);
        load8_stream(v + st[u], vv[u]);
      }
#pragma unroll
      for (int u = 0; u < kVecPerThread; ++u) {
        if (v0 + u * kThreads >= nvec) continue;
#pragma unroll
        for (int i = 0; i < kVec; ++i) adamw_element(pv[u][i], mv[u][i], vv[u][i], gv[u][i] * scale, c);
        store8_stream(m + st[u], mv[u]);
        store8_stream(v + st[u], vv[u]);
        if (MASTER) store8_stream(master + st[u], pv[u]);
        store8<T>(p + flat[u], pv[u]);
      }
    }
    return;
  }
  for (int j0 = threadIdx.x; j0 < t.count; j0 += kThreads * kUnroll) {
    float pv[kUnroll], gv[kUnroll], mv[kUnroll], vv[kUnroll];
    int64_t flat[kUnroll], st[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kThreads;
      if (j >= t.count) continue;
      flat[u] = flat_of(t, j, index);
      st[u] = t.state0 + t.k0 + j;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * kThreads >= t.count) continue;
      gv[u] = load_grad<T, COMPACT>(g, cgrad, flat[u], st[u]);
      pv[u] = MASTER ? master[st[u]] : static_cast<float>(p[flat[u]]);
      mv[u] = m[st[u]];
      vv[u] = v[st[u]];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (j0 + u * kThreads >= t.count) continue;
      adamw_element(pv[u], mv[u], vv[u], gv[u] * scale, c);
      m[st[u]] = mv[u];
      v[st[u]] = vv[u];
      if (MASTER) master[st[u]] = pv[u];
      p[flat[u]] = static_cast<T>(pv[u]);
    }
  }
}

template <typename T, bool COMPACT, bool MASTER>
__global__ void __launch_bounds__(kThreads)
    update8_kernel(const int64_t* __restrict__ tiles, const int32_t* __restrict__ index, const SlotPtrs<T> ptrs,
                   const float* __restrict__ cgrad, uint8_t* __restrict__ cm, uint8_t* __restrict__ cv,
                   float* __restrict__ am, float* __restrict__ av, const float* __restrict__ qmap_m,
                   const float* __restrict__ qmap_v, const float* __restrict__ mids_m,
                   const float* __restrict__ mids_v, float* __restrict__ master, const float* __restrict__ coef) {
  __shared__ float s_qm[kQBlock], s_qv[kQBlock], s_mm[kQBlock], s_mv[kQBlock];
  __shared__ float s_absmax[2];
  const TileInfo t = load_tile(tiles, blockIdx.x);
  if (t.slot < ptrs.slot_begin || t.slot >= ptrs.slot_end) return;
  const AdamCoef c = load_coef(coef, t.slot);
  if (c.apply == 0.f) return;  // uniform per block: blocks never span two parameters (segments.py)
  s_qm[threadIdx.x] = qmap_m[threadIdx.x];
  s_qv[threadIdx.x] = qmap_v[threadIdx.x];
  s_mm[threadIdx.x] = mids_m[threadIdx.x];
  s_mv[threadIdx.x] = mids_v[threadIdx.x];
  __syncthreads();
  const float scale = c.grad_scale;  // clip factor, negated for maximize
  T* p = ptrs.param[t.slot - ptrs.slot_begin];
  const T* g = ptrs.grad[t.slot - ptrs.slot_begin];
  for (int from = 0; from < t.count; from += kQBlock) {  // block-aligned: segments.py aligns segments to 256
    const int j = from + threadIdx.x;
    const bool valid = j < t.count;
    const int64_t st = t.state0 + t.k0 + j, blk = (t.state0 + t.k0 + from) / kQBlock;
    int64_t flat = 0;
    float pv = 0.f, mv = 0.f, vv = 0.f;
    if (valid) {
      flat = flat_of(t, j, index);
      const float gv = __fmul_rn(load_grad<T, COMPACT>(g, cgrad, flat, st), scale);
      pv = MASTER ? master[st] : static_cast<float>(p[flat]);
      mv = __fmul_rn(s_qm[cm[st]], am[blk]);
      vv = __fmul_rn(s_qv[cv[st]], av[blk]);
      adamw_element_ieee(pv, mv, vv, gv, c);  // IEEE ops: see masked_adamw_common.h
    }
    const float new_am = block_reduce(valid ? fabsf(mv) : 0.f, Max());
    const float new_av = block_reduce(valid ? vv : 0.f, Max());
    if (threadIdx.x == 0) s_absmax[0] = new_am, s_absmax[1] = new_av;
    __syncthreads();
    const float block_am = s_absmax[0], block_av = s_absmax[1];
    if (valid) {
      cm[st] = static_cast<uint8_t>(quantize_code(__fdiv_rn(mv, block_am > 0.f ? block_am : 1.f), s_mm));
      cv[st] = static_cast<uint8_t>(quantize_code(__fdiv_rn(vv, block_av > 0.f ? block_av : 1.f), s_mv));
      if (MASTER) master[st] = pv;
      p[flat] = static_cast<T>(pv);
    }
    if (threadIdx.x == 0) am[blk] = block_am, av[blk] = block_av;
    __syncthreads();  // s_absmax and the absmax of this block are reused by the next pass
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const int64_t* __restrict__ tiles, const int32_t* __restrict__ index, const T* __restrict__ grad,
                  float* __restrict__ out, int64_t tile_begin, bool accumulate) {
  const TileInfo t = load_tile(tiles, tile_begin + blockIdx.x);
  for (int j = threadIdx.x; j < t.count; j += kThreads) {
    const int64_t st = t.state0 + t.k0 + j;
    const float x = static_cast<float>(grad[flat_of(t, j, index)]);
    out[st] = accumulate ? out[st] + x : x;
  }
}

// ---------------------------------------------------------------------------------------------------- host
void check_cuda(const at::Tensor& t, at::ScalarType dtype, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device && t.scalar_type() == dtype && t.is_contiguous(), name, " must be a contiguous ",
              dtype, " tensor on ", device, "; got ", t.scalar_type(), " on ", t.device(),
              t.is_contiguous() ? "" : " (non-contiguous)");
}

bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Raw pointers per chunk of at most kMaxSlots parameters.
template <typename T>
std::vector<SlotPtrs<T>> slot_chunks(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                     bool compact, const at::Device& device) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(compact || static_cast<int64_t>(grads.size()) == n, "grads must hold one entry per parameter (", n,
              "); got ", grads.size());
  std::vector<SlotPtrs<T>> chunks;
  for (int64_t begin = 0; begin < n; begin += kMaxSlots) {
    SlotPtrs<T> s{};
    s.slot_begin = begin;
    s.slot_end = std::min<int64_t>(n, begin + kMaxSlots);
    for (int64_t i = begin; i < s.slot_end; ++i) {
      check_cuda(params[i], params[0].scalar_type(), "every parameter", device);
      s.param[i - begin] = params[i].data_ptr<T>();
      s.grad[i - begin] = nullptr;
      if (!compact) {
        const std::optional<at::Tensor> gi = grads[i];
        if (defined(gi)) {
          check_cuda(*gi, params[i].scalar_type(), "every gradient", device);
          TORCH_CHECK(gi->sizes() == params[i].sizes(), "grads[", i, "] has shape ", gi->sizes(),
                      " but params[", i, "] has ", params[i].sizes());
          s.grad[i - begin] = gi->data_ptr<T>();
        }
      }
    }
    chunks.push_back(s);
  }
  return chunks;
}

// Gradient pointers only (the statistics pass reads no parameter); compact gradients need no pointers.
template <typename T>
std::vector<SlotPtrs<T>> grad_chunks(const c10::List<std::optional<at::Tensor>>& grads, bool compact,
                                     at::ScalarType dtype, const at::Device& device) {
  std::vector<SlotPtrs<T>> chunks;
  const int64_t n = static_cast<int64_t>(grads.size());
  if (compact) {
    SlotPtrs<T> s{};
    s.slot_begin = 0;
    s.slot_end = INT64_MAX;
    chunks.push_back(s);
    return chunks;
  }
  for (int64_t begin = 0; begin < n; begin += kMaxSlots) {
    SlotPtrs<T> s{};
    s.slot_begin = begin;
    s.slot_end = std::min<int64_t>(n, begin + kMaxSlots);
    for (int64_t i = begin; i < s.slot_end; ++i) {
      const std::optional<at::Tensor> gi = grads[i];
      s.param[i - begin] = nullptr;
      s.grad[i - begin] = nullptr;
      if (defined(gi)) {
        check_cuda(*gi, dtype, "every gradient", device);
        s.grad[i - begin] = gi->data_ptr<T>();
      }
    }
    chunks.push_back(s);
  }
  return chunks;
}

template <typename T>
void launch_sumsq(const std::vector<SlotPtrs<T>>& chunks, int64_t n_tiles, const at::Tensor& tiles,
                  const at::Tensor& index, const float* cgrad, double* partial, cudaStream_t stream) {
  for (const auto& s : chunks) {
    if (cgrad)
      grad_sumsq_kernel<T, true><<<n_tiles, kThreads, 0, stream>>>(tiles.data_ptr<int64_t>(),
                                                                   index.data_ptr<int32_t>(), s, cgrad, partial);
    else
      grad_sumsq_kernel<T, false><<<n_tiles, kThreads, 0, stream>>>(tiles.data_ptr<int64_t>(),
                                                                    index.data_ptr<int32_t>(), s, cgrad, partial);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_table(const at::Tensor& tiles, const at::Tensor& index, const at::Device& device) {
  check_cuda(tiles, at::kLong, "tiles", device);
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(1) == kTileFields, "tiles must be [n_tiles, ", kTileFields, "]; got ",
              tiles.sizes());
  check_cuda(index, at::kInt, "index", device);
}

void masked_adamw_grad_sumsq_cuda(const c10::List<std::optional<at::Tensor>>& grads,
                                  const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                                  const at::Tensor& index, at::Tensor& partial) {
  const at::Device device = tiles.device();
  const c10::cuda::CUDAGuard guard(device);
  check_table(tiles, index, device);
  check_cuda(partial, at::kDouble, "partial", device);
  TORCH_CHECK(partial.numel() >= tiles.size(0), "partial needs one entry per tile (", tiles.size(0), ")");
  const int64_t n_tiles = tiles.size(0);
  if (n_tiles == 0) return;
  const bool compact = defined(compact_grad);
  if (compact) check_cuda(*compact_grad, at::kFloat, "compact_grad", device);
  at::ScalarType dtype = at::kFloat;
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::optional<at::Tensor> g = grads[i];
    if (defined(g)) dtype = g->scalar_type();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MU_FAST_DISPATCH_PARAM_TYPES(dtype, "masked_adamw_grad_sumsq_cuda", [&] {
    launch_sumsq<scalar_t>(grad_chunks<scalar_t>(grads, compact, dtype, device), n_tiles, tiles, index,
                           compact ? compact_grad->data_ptr<float>() : nullptr, partial.data_ptr<double>(), stream);
  });
}

void masked_adamw_scalars_cuda(const at::Tensor& hyper, const at::Tensor& slot_group, at::Tensor& slot_step,
                               const at::Tensor& present, const at::Tensor& partial, at::Tensor& coef,
                               at::Tensor& control, bool has_stats, bool check_finite) {
  const at::Device device = hyper.device();
  const c10::cuda::CUDAGuard guard(device);
  check_cuda(hyper, at::kDouble, "hyper", device);
  TORCH_CHECK(hyper.dim() == 2 && hyper.size(1) == kHyperFields, "hyper must be [G, ", kHyperFields, "]");
  const int64_t n_slots = slot_group.numel();
  check_cuda(slot_group, at::kLong, "slot_group", device);
  check_cuda(slot_step, at::kDouble, "slot_step", device);
  check_cuda(present, at::kFloat, "present", device);
  TORCH_CHECK(slot_step.numel() == n_slots && present.numel() == n_slots, "slot_step and present must hold one value "
              "per slot (", n_slots, "); got ", slot_step.numel(), " and ", present.numel());
  check_cuda(partial, at::kDouble, "partial", device);
  check_cuda(coef, at::kFloat, "coef", device);
  check_cuda(control, at::kFloat, "control", device);
  TORCH_CHECK(coef.numel() >= n_slots * kCoefFields && control.numel() >= kControlFields,
              "coef must hold [S, ", kCoefFields, "] and control [", kControlFields, "] values");
  scalars_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      hyper.data_ptr<double>(), slot_group.data_ptr<int64_t>(), slot_step.data_ptr<double>(),
      present.data_ptr<float>(), n_slots, partial.data_ptr<double>(), partial.numel(), coef.data_ptr<float>(),
      control.data_ptr<float>(), hyper.size(0), has_stats, check_finite);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_update(const std::vector<SlotPtrs<T>>& chunks, int64_t n_tiles, const at::Tensor& tiles,
                   const at::Tensor& index, const float* cgrad, float* m, float* v, float* master, const float* coef,
                   cudaStream_t stream) {
  for (const auto& s : chunks) {
#define MU_FAST_LAUNCH(COMPACT, MASTER)                                                                       \
  update_kernel<T, COMPACT, MASTER><<<n_tiles, kThreads, 0, stream>>>(tiles.data_ptr<int64_t>(),             \
                                                                       index.data_ptr<int32_t>(), s, cgrad, m, v, \
                                                                       master, coef)
    if (cgrad && master) MU_FAST_LAUNCH(true, true);
    else if (cgrad) MU_FAST_LAUNCH(true, false);
    else if (master) MU_FAST_LAUNCH(false, true);
    else MU_FAST_LAUNCH(false, false);
#undef MU_FAST_LAUNCH
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void masked_adamw_update_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                              const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                              const at::Tensor& index, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                              const std::optional<at::Tensor>& master, const at::Tensor& coef) {
  const at::Device device = tiles.device();
  const c10::cuda::CUDAGuard guard(device);
  check_table(tiles, index, device);
  check_cuda(exp_avg, at::kFloat, "exp_avg", device);
  check_cuda(exp_avg_sq, at::kFloat, "exp_avg_sq", device);
  check_cuda(coef, at::kFloat, "coef", device);
  TORCH_CHECK(coef.numel() >= static_cast<int64_t>(params.size()) * kCoefFields, "coef must hold [",
              params.size(), ", ", kCoefFields, "] values (one row per parameter)");
  const bool compact = defined(compact_grad), has_master = defined(master);
  if (compact) check_cuda(*compact_grad, at::kFloat, "compact_grad", device);
  if (has_master) check_cuda(*master, at::kFloat, "master", device);
  if (params.empty() || tiles.size(0) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MU_FAST_DISPATCH_PARAM_TYPES(params[0].scalar_type(), "masked_adamw_update_cuda", [&] {
    launch_update<scalar_t>(slot_chunks<scalar_t>(params, grads, compact, device), tiles.size(0), tiles, index,
                            compact ? compact_grad->data_ptr<float>() : nullptr, exp_avg.data_ptr<float>(),
                            exp_avg_sq.data_ptr<float>(), has_master ? master->data_ptr<float>() : nullptr,
                            coef.data_ptr<float>(), stream);
  });
}

template <typename T>
void launch_update8(const std::vector<SlotPtrs<T>>& chunks, int64_t n_tiles, const at::Tensor& tiles,
                    const at::Tensor& index, const float* cgrad, uint8_t* cm, uint8_t* cv, float* am, float* av,
                    const float* qm, const float* qv, const float* mm, const float* mv, float* master,
                    const float* coef, cudaStream_t stream) {
  for (const auto& s : chunks) {
#define MU_FAST_LAUNCH(COMPACT, MASTER)                                                                        \
  update8_kernel<T, COMPACT, MASTER><<<n_tiles, kThreads, 0, stream>>>(                                        \
      tiles.data_ptr<int64_t>(), index.data_ptr<int32_t>(), s, cgrad, cm, cv, am, av, qm, qv, mm, mv, master, \
      coef)
    if (cgrad && master) MU_FAST_LAUNCH(true, true);
    else if (cgrad) MU_FAST_LAUNCH(true, false);
    else if (master) MU_FAST_LAUNCH(false, true);
    else MU_FAST_LAUNCH(false, false);
#undef MU_FAST_LAUNCH
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void masked_adamw8bit_update_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                  const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                                  const at::Tensor& index, at::Tensor& codes_m, at::Tensor& codes_v,
                                  at::Tensor& absmax_m, at::Tensor& absmax_v, const at::Tensor& qmap_m,
                                  const at::Tensor& qmap_v, const at::Tensor& mids_m, const at::Tensor& mids_v,
                                  const std::optional<at::Tensor>& master, const at::Tensor& coef) {
  const at::Device device = tiles.device();
  const c10::cuda::CUDAGuard guard(device);
  check_table(tiles, index, device);
  check_cuda(codes_m, at::kByte, "codes_m", device);
  check_cuda(codes_v, at::kByte, "codes_v", device);
  check_cuda(absmax_m, at::kFloat, "absmax_m", device);
  check_cuda(absmax_v, at::kFloat, "absmax_v", device);
  for (const at::Tensor* t : {&qmap_m, &qmap_v, &mids_m, &mids_v}) {
    check_cuda(*t, at::kFloat, "quantization map / midpoints", device);
    TORCH_CHECK(t->numel() == kQBlock, "quantization maps and midpoint tables hold 256 values; got ", t->numel());
  }
  check_cuda(coef, at::kFloat, "coef", device);
  TORCH_CHECK(coef.numel() >= static_cast<int64_t>(params.size()) * kCoefFields, "coef must hold [",
              params.size(), ", ", kCoefFields, "] values (one row per parameter)");
  const bool compact = defined(compact_grad), has_master = defined(master);
  if (compact) check_cuda(*compact_grad, at::kFloat, "compact_grad", device);
  if (has_master) check_cuda(*master, at::kFloat, "master", device);
  if (params.empty() || tiles.size(0) == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MU_FAST_DISPATCH_PARAM_TYPES(params[0].scalar_type(), "masked_adamw8bit_update_cuda", [&] {
    launch_update8<scalar_t>(slot_chunks<scalar_t>(params, grads, compact, device), tiles.size(0), tiles, index,
                             compact ? compact_grad->data_ptr<float>() : nullptr, codes_m.data_ptr<uint8_t>(),
                             codes_v.data_ptr<uint8_t>(), absmax_m.data_ptr<float>(), absmax_v.data_ptr<float>(),
                             qmap_m.data_ptr<float>(), qmap_v.data_ptr<float>(), mids_m.data_ptr<float>(),
                             mids_v.data_ptr<float>(), has_master ? master->data_ptr<float>() : nullptr,
                             coef.data_ptr<float>(), stream);
  });
}

template <typename T>
void launch_gather(const at::Tensor& grad, const at::Tensor& tiles, const at::Tensor& index, int64_t tile_begin,
                   int64_t n, float* out, bool accumulate, cudaStream_t stream) {
  gather_kernel<T><<<n, kThreads, 0, stream>>>(tiles.data_ptr<int64_t>(), index.data_ptr<int32_t>(),
                                               grad.data_ptr<T>(), out, tile_begin, accumulate);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_gather_grad_cuda(const at::Tensor& grad, const at::Tensor& tiles, const at::Tensor& index,
                             int64_t tile_begin, int64_t tile_end, at::Tensor& compact_grad, bool accumulate) {
  const at::Device device = tiles.device();
  const c10::cuda::CUDAGuard guard(device);
  check_table(tiles, index, device);
  check_cuda(compact_grad, at::kFloat, "compact_grad", device);
  check_cuda(grad, grad.scalar_type(), "grad", device);
  TORCH_CHECK(0 <= tile_begin && tile_begin <= tile_end && tile_end <= tiles.size(0), "tile range [", tile_begin,
              ", ", tile_end, ") is outside the table's ", tiles.size(0), " tiles");
  if (tile_end == tile_begin) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  MU_FAST_DISPATCH_PARAM_TYPES(grad.scalar_type(), "masked_gather_grad_cuda", [&] {
    launch_gather<scalar_t>(grad, tiles, index, tile_begin, tile_end - tile_begin, compact_grad.data_ptr<float>(),
                            accumulate, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mu_fast, CUDA, m) {
  m.impl("masked_adamw_grad_sumsq", &masked_adamw_grad_sumsq_cuda);
  m.impl("masked_adamw_scalars", &masked_adamw_scalars_cuda);
  m.impl("masked_adamw_update", &masked_adamw_update_cuda);
  m.impl("masked_adamw8bit_update", &masked_adamw8bit_update_cuda);
  m.impl("masked_gather_grad", &masked_gather_grad_cuda);
}

}  // namespace mu_fast
