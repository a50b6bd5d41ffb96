// Masked AdamW on the CPU: tiles spread over torch's intra-op thread pool (at::parallel_for: one OpenMP runtime
// with torch, since a second libgomp next to torch's spins against it), vectorized (-O3 -mavx2 -mfma) inner loops
// over contiguous runs.
//
// Semantics, table layouts and the per-element math are those of mu_fast/optim/masked_adamw.py and
// masked_adamw_common.h. A strided tile is walked run by run: inside a run the parameter, gradient and state are
// all contiguous, so the loop is a plain `omp simd` stream. Column tiles (scattered columns, walked row by row)
// and indexed tiles (arbitrary boolean masks) gather and scatter element by element. bf16 conversions are done on the raw bits (round to nearest even, NaN kept) so the
// compiler vectorizes them; results are bit-identical to torch's float->bf16 cast.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "masked_adamw_common.h"

namespace mu_fast {
namespace {

inline float load_f(const float* x, int64_t i) { return x[i]; }
inline float load_f(const c10::Half* x, int64_t i) { return static_cast<float>(x[i]); }
inline float load_f(const c10::BFloat16* x, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, x + i, 2);
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store_f(float* x, int64_t i, float v) { x[i] = v; }
inline void store_f(c10::Half* x, int64_t i, float v) { x[i] = static_cast<c10::Half>(v); }
inline void store_f(c10::BFloat16* x, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  uint16_t bits = (v != v) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(u >> 16);
  std::memcpy(x + i, &bits, 2);
}

struct Tile {
  int64_t slot, group, kind, base, run_len, stride, k0, count, state0;
  explicit Tile(const int64_t* row)
      : slot(row[kSlot]), group(row[kGroup]), kind(row[kKind]), base(row[kBase]), run_len(row[kRunLen]),
        stride(row[kRunStride]), k0(row[kK0]), count(row[kCount]), state0(row[kState0]) {}
};

// Calls f(flat_offset, state_offset, length) for each contiguous run of a strided tile.
template <typename F>
inline void for_each_run(const Tile& t, F&& f) {
  int64_t k = t.k0;
  const int64_t end = t.k0 + t.count;
  while (k < end) {
    const int64_t r = k / t.run_len;
    const int64_t c = k - r * t.run_len;
    const int64_t len = std::min(t.run_len - c, end - k);
    f(t.base + r * t.stride + c, t.state0 + k, len);
    k += len;
  }
}

// Flat offsets of elements [from, from + n) of a tile (any kind), into out[0, n). Row by row, so each inner loop is
// branch-free and vectorizes: a per-element row/column carry made these offsets half of a column step's instructions.
inline void flat_offsets(const Tile& t, const int32_t* index, int64_t from, int64_t n, int64_t* out) {
  if (t.kind == kIndexed) {
    const int32_t* idx = index + t.base + from;
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) out[e] = idx[e];
    return;
  }
  int64_t r = from / t.run_len, c = from - r * t.run_len;
  const int32_t* cols = index + t.base;  // column tiles: the selected offsets within a row
  for (int64_t e = 0; e < n; c = 0, ++r) {
    const int64_t len = std::min(t.run_len - c, n - e);
    int64_t* o = out + e;
    if (t.kind == kColumns) {
      const int64_t row = r * t.stride;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = row + cols[c + j];
    } else {
      const int64_t start = t.base + r * t.stride + c;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = start + j;
    }
    e += len;
  }
}

constexpr int64_t kChunk = 256;  // elements per batch of gathered offsets (indexed and column tiles)

// Prefetches the cache line of every x[flat[e]], e < n: one prefetch per element, no branch (the same line
// prefetched twice costs next to nothing). always_inline: GCC 12 judged an out-of-line helper whose only effect is
// __builtin_prefetch to have no side effects and deleted every call, so no prefetch was ever emitted before (objdump
// of the extension showed none). Emitted, per-element prefetch makes 5% single columns and random elements about
// 1.3x faster on an AMD EPYC (Zen 4); prefetching the whole span [flat[0], flat[n - 1]] instead, which also fetches
// lines holding no selected element, was slower there (benchmarks/notes_optim_cpu.md).
template <typename X>
__attribute__((always_inline)) inline void prefetch_elements(const X* x, const int64_t* flat, int64_t n, int rw) {
  if (x == nullptr) return;
  for (int64_t e = 0; e < n; ++e) rw ? __builtin_prefetch(x + flat[e], 1, 2) : __builtin_prefetch(x + flat[e], 0, 2);
}

// Calls f(flat_offsets, state_offset, n) for batches of a gathered (indexed or column) tile. The offsets of the
// next batch are computed one batch ahead and their cache lines in a (read) and b (written) prefetched:
// scattered columns defeat the hardware prefetcher, and the gathers are otherwise bound by DRAM latency.
template <typename A, typename B, typename F>
inline void for_each_gathered(const Tile& t, const int32_t* index, const A* a, const B* b, F&& f) {
  int64_t flat[2][kChunk];
  int64_t n_next = std::min(kChunk, t.count);
  flat_offsets(t, index, t.k0, n_next, flat[0]);
  prefetch_elements(a, flat[0], n_next, 0);
  prefetch_elements(b, flat[0], n_next, 1);
  for (int64_t from = 0, i = 0; from < t.count; from += kChunk, i ^= 1) {
    const int64_t n = n_next;
    n_next = std::min(kChunk, t.count - from - n);
    if (n_next > 0) {
      flat_offsets(t, index, t.k0 + from + n, n_next, flat[i ^ 1]);
      prefetch_elements(a, flat[i ^ 1], n_next, 0);
      prefetch_elements(b, flat[i ^ 1], n_next, 1);
    }
    f(static_cast<const int64_t*>(flat[i]), t.state0 + t.k0 + from, n);
  }
}

void check_common(const at::Tensor& tiles, const at::Tensor& index) {
  TORCH_CHECK(tiles.device().is_cpu() && tiles.scalar_type() == at::kLong && tiles.is_contiguous() &&
                  tiles.dim() == 2 && tiles.size(1) == kTileFields,
              "tiles must be a contiguous CPU int64 tensor [n_tiles, ", kTileFields, "]; got ", tiles.scalar_type(),
              " ", tiles.sizes(), " on ", tiles.device());
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kInt && index.is_contiguous(),
              "index must be a contiguous CPU int32 tensor; got ", index.scalar_type(), " on ", index.device());
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous CPU float32 tensor; got ", t.scalar_type(), " on ", t.device());
}

// Per-slot raw pointers, validated once per call.
template <typename T>
struct Slots {
  std::vector<T*> param;
  std::vector<const T*> grad;
};

template <typename T>
Slots<T> gather_slots(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads, bool compact) {
  Slots<T> s;
  TORCH_CHECK(compact || grads.size() == params.size(), "grads must hold one entry per parameter (",
              params.size(), "); got ", grads.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == params[0].scalar_type(),
                "params[", i, "] must be a contiguous CPU tensor of dtype ", params[0].scalar_type(), "; got ",
                p.scalar_type(), " on ", p.device());
    s.param.push_back(p.data_ptr<T>());
    const T* g = nullptr;
    if (!compact) {
      std::optional<at::Tensor> gi = grads[i];
      if (gi.has_value() && gi->defined()) {
        TORCH_CHECK(gi->sizes() == p.sizes() && gi->scalar_type() == p.scalar_type() && gi->is_contiguous() &&
                        gi->device().is_cpu(),
                    "grads[", i, "] must be a contiguous CPU tensor shaped and typed like params[", i, "]");
        g = gi->data_ptr<T>();
      }
    }
    s.grad.push_back(g);
  }
  return s;
}

// Squares summed in fp64: a finite fp32 gradient of up to 3.4e38 squares to at most 1.2e77, so a finite
// gradient never overflows the statistic that decides the non-finite skip.
template <typename T>
void grad_sumsq_impl(const std::vector<const T*>& grad, const float* cgrad, const at::Tensor& tiles,
                     const int32_t* index, double* partial) {
  const int64_t n_tiles = tiles.size(0);
  const int64_t* rows = tiles.data_ptr<int64_t>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_from, int64_t tile_to) {
  for (int64_t ti = tile_from; ti < tile_to; ++ti) {
    const Tile t(rows + ti * kTileFields);
    double acc = 0.0;
    const T* g = cgrad ? nullptr : grad[t.slot];
    if (cgrad) {
      const float* src = cgrad + t.state0 + t.k0;
#pragma omp simd reduction(+ : acc)
      for (int64_t e = 0; e < t.count; ++e) acc += static_cast<double>(src[e]) * src[e];
    } else if (g != nullptr && t.kind != kStrided) {
      for_each_gathered(t, index, g, static_cast<const T*>(nullptr), [&](const int64_t* flat, int64_t, int64_t n) {
        for (int64_t e = 0; e < n; ++e) {
          const double x = load_f(g, flat[e]);
          acc += x * x;
        }
      });
    } else if (g != nullptr) {
      for_each_run(t, [&](int64_t flat, int64_t, int64_t len) {
        double part = 0.0;
#pragma omp simd reduction(+ : part)
        for (int64_t e = 0; e < len; ++e) {
          const double x = load_f(g, flat + e);
          part += x * x;
        }
        acc += part;
      });
    }
    partial[ti] = acc;
  }
  });
}

void masked_adamw_grad_sumsq_cpu(const c10::List<std::optional<at::Tensor>>& grads,
                                 const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                                 const at::Tensor& index, at::Tensor& partial) {
  check_common(tiles, index);
  TORCH_CHECK(partial.device().is_cpu() && partial.scalar_type() == at::kDouble && partial.is_contiguous(),
              "partial must be a contiguous CPU float64 tensor; got ", partial.scalar_type());
  TORCH_CHECK(partial.numel() >= tiles.size(0), "partial needs one entry per tile (", tiles.size(0), "); got ",
              partial.numel());
  const bool compact = compact_grad.has_value() && compact_grad->defined();
  if (compact) check_f32(*compact_grad, "compact_grad");
  partial.zero_();
  if (tiles.size(0) == 0) return;
  at::ScalarType dtype = at::kFloat;
  for (size_t i = 0; i < grads.size(); ++i) {
    std::optional<at::Tensor> g = grads[i];
    if (g.has_value() && g->defined()) dtype = g->scalar_type();
  }
  MU_FAST_DISPATCH_PARAM_TYPES(dtype, "masked_adamw_grad_sumsq_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (size_t i = 0; i < grads.size(); ++i) {
      std::optional<at::Tensor> g = grads[i];
      if (g.has_value() && g->defined())
        TORCH_CHECK(g->is_contiguous() && g->device().is_cpu() && g->scalar_type() == dtype,
                    "grads[", i, "] must be a contiguous CPU tensor of dtype ", dtype);
      ptrs.push_back(g.has_value() && g->defined() ? g->data_ptr<scalar_t>() : nullptr);
    }
    grad_sumsq_impl<scalar_t>(ptrs, compact ? compact_grad->data_ptr<float>() : nullptr, tiles,
                              index.data_ptr<int32_t>(), partial.data_ptr<double>());
  });
}

void masked_adamw_scalars_cpu(const at::Tensor& hyper, const at::Tensor& slot_group, at::Tensor& slot_step,
                              const at::Tensor& present, const at::Tensor& partial, at::Tensor& coef,
                              at::Tensor& control, bool has_stats, bool check_finite) {
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.is_contiguous() && hyper.dim() == 2 &&
                  hyper.size(1) == kHyperFields,
              "hyper must be a contiguous float64 tensor [G, ", kHyperFields, "]; got ", hyper.scalar_type(), " ",
              hyper.sizes());
  const int64_t slots = slot_group.numel();
  TORCH_CHECK(slot_group.scalar_type() == at::kLong && slot_group.is_contiguous(),
              "slot_group must be a contiguous int64 tensor [S]; got ", slot_group.scalar_type());
  TORCH_CHECK(slot_step.scalar_type() == at::kDouble && slot_step.is_contiguous() && slot_step.numel() == slots,
              "slot_step must be a contiguous float64 tensor [", slots, "]; got ", slot_step.scalar_type(), " ",
              slot_step.sizes());
  check_f32(present, "present");
  TORCH_CHECK(present.numel() == slots, "present must hold one value per slot (", slots, "); got ", present.numel());
  TORCH_CHECK(partial.device().is_cpu() && partial.scalar_type() == at::kDouble && partial.is_contiguous(),
              "partial must be a contiguous CPU float64 tensor; got ", partial.scalar_type());
  check_f32(coef, "coef");
  check_f32(control, "control");
  TORCH_CHECK(coef.numel() >= slots * kCoefFields && control.numel() >= kControlFields,
              "coef must hold [S, ", kCoefFields, "] and control [", kControlFields, "] values");
  const double* h = hyper.data_ptr<double>();
  const int64_t groups = hyper.size(0);
  double total = 0.0;
  if (has_stats) {
    const double* part = partial.data_ptr<double>();
    for (int64_t i = 0; i < partial.numel(); ++i) total += part[i];  // fixed order, like the GPU kernels
  }
  float* k = control.data_ptr<float>();
  const double clip = write_control(k, total, groups ? h[kHMaxNorm] : 0.0, has_stats, check_finite);
  const float keep = 1.f - k[kKSkip];
  const int64_t* group = slot_group.data_ptr<int64_t>();
  double* step = slot_step.data_ptr<double>();
  const float* has_grad = present.data_ptr<float>();
  float* c = coef.data_ptr<float>();
  for (int64_t s = 0; s < slots; ++s) {
    TORCH_CHECK(0 <= group[s] && group[s] < groups, "slot_group[", s, "] = ", group[s], " is not a group index");
    const float apply = has_grad[s] * keep;
    write_coef(c + s * kCoefFields, h + group[s] * kHyperFields, step[s] + 1.0, clip, apply);
    step[s] += apply;
  }
}

// Gradient source, a template parameter so each loop is branch-free: none (zero), dense param-typed, compact fp32.
enum GradKind { kNoGrad = 0, kDenseGrad = 1, kCompactGrad = 2 };

template <typename T, bool MASTER, int GRAD>
inline void update_run(T* __restrict__ p, const T* __restrict__ g, const float* __restrict__ cg,
                       float* __restrict__ m, float* __restrict__ v, float* __restrict__ master, int64_t len,
                       const AdamCoef& c) {
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    const float gv = (GRAD == kCompactGrad ? cg[e] : (GRAD == kDenseGrad ? load_f(g, e) : 0.f)) * c.grad_scale;
    float pv = MASTER ? master[e] : load_f(p, e);
    float mv = m[e], vv = v[e];
    adamw_element(pv, mv, vv, gv, c);
    m[e] = mv;
    v[e] = vv;
    if (MASTER) master[e] = pv;
    store_f(p, e, pv);
  }
}

template <typename T>
void update_impl(const Slots<T>& slots, const float* cgrad, const at::Tensor& tiles, const int32_t* index,
                 float* m, float* v, float* master, const float* coef) {
  const int64_t n_tiles = tiles.size(0);
  const int64_t* rows = tiles.data_ptr<int64_t>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_from, int64_t tile_to) {
  for (int64_t ti = tile_from; ti < tile_to; ++ti) {
    const Tile t(rows + ti * kTileFields);
    const AdamCoef c = load_coef(coef, t.slot);
    if (c.apply == 0.f) continue;  // no gradient for this parameter, or a skipped step: touch nothing
    T* p = slots.param[t.slot];
    const T* g = cgrad ? nullptr : slots.grad[t.slot];
    const int grad_kind = cgrad ? kCompactGrad : (g ? kDenseGrad : kNoGrad);
    if (t.kind != kStrided) {
      // Gather into local arrays, update them with the vectorized contiguous loop, scatter the parameter back.
      for_each_gathered(t, index, g, static_cast<const T*>(p), [&](const int64_t* flat, int64_t s0, int64_t n) {
        float pv[kChunk], gv[kChunk];
        for (int64_t e = 0; e < n; ++e) {
          gv[e] = grad_kind == kDenseGrad ? load_f(g, flat[e]) : 0.f;
          pv[e] = master ? 0.f : load_f(p, flat[e]);
        }
        float* mp = master ? master + s0 : pv;
        if (grad_kind == kCompactGrad) update_run<float, false, kCompactGrad>(mp, nullptr, cgrad + s0, m + s0, v + s0, nullptr, n, c);
        else update_run<float, false, kDenseGrad>(mp, gv, nullptr, m + s0, v + s0, nullptr, n, c);
        for (int64_t e = 0; e < n; ++e) store_f(p, flat[e], mp[e]);
      });
      continue;
    }
    for_each_run(t, [&](int64_t flat, int64_t st, int64_t len) {
      T* pp = p + flat;
      const T* gp = g ? g + flat : nullptr;
      const float* cp = cgrad ? cgrad + st : nullptr;
      float* mp = master ? master + st : nullptr;
#define MU_FAST_RUN(MASTER, GRAD) update_run<T, MASTER, GRAD>(pp, gp, cp, m + st, v + st, mp, len, c)
      if (master) {
        if (grad_kind == kCompactGrad) MU_FAST_RUN(true, kCompactGrad);
        else if (grad_kind == kDenseGrad) MU_FAST_RUN(true, kDenseGrad);
        else MU_FAST_RUN(true, kNoGrad);
      } else {
        if (grad_kind == kCompactGrad) MU_FAST_RUN(false, kCompactGrad);
        else if (grad_kind == kDenseGrad) MU_FAST_RUN(false, kDenseGrad);
        else MU_FAST_RUN(false, kNoGrad);
      }
#undef MU_FAST_RUN
    });
  }
  });
}

void masked_adamw_update_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                             const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                             const at::Tensor& index, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                             const std::optional<at::Tensor>& master, const at::Tensor& coef) {
  check_common(tiles, index);
  check_f32(exp_avg, "exp_avg");
  check_f32(exp_avg_sq, "exp_avg_sq");
  check_f32(coef, "coef");
  TORCH_CHECK(coef.numel() >= static_cast<int64_t>(params.size()) * kCoefFields, "coef must hold [",
              params.size(), ", ", kCoefFields, "] values (one row per parameter)");
  const bool compact = compact_grad.has_value() && compact_grad->defined();
  const bool has_master = master.has_value() && master->defined();
  if (compact) check_f32(*compact_grad, "compact_grad");
  if (has_master) check_f32(*master, "master");
  if (params.empty() || tiles.size(0) == 0) return;
  MU_FAST_DISPATCH_PARAM_TYPES(params[0].scalar_type(), "masked_adamw_update_cpu", [&] {
    const Slots<scalar_t> slots = gather_slots<scalar_t>(params, grads, compact);
    update_impl<scalar_t>(slots, compact ? compact_grad->data_ptr<float>() : nullptr, tiles,
                          index.data_ptr<int32_t>(), exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(),
                          has_master ? master->data_ptr<float>() : nullptr, coef.data_ptr<float>());
  });
}

template <typename T>
void update8_impl(const Slots<T>& slots, const float* cgrad, const at::Tensor& tiles, const int32_t* index,
                  uint8_t* cm, uint8_t* cv, float* am, float* av, const float* qm, const float* qv,
                  const float* mids_m, const float* mids_v, float* master, const float* coef) {
  const int64_t n_tiles = tiles.size(0);
  const int64_t* rows = tiles.data_ptr<int64_t>();
  at::parallel_for(0, n_tiles, 1, [&](int64_t tile_from, int64_t tile_to) {
  for (int64_t ti = tile_from; ti < tile_to; ++ti) {
    const Tile t(rows + ti * kTileFields);
    const AdamCoef c = load_coef(coef, t.slot);
    if (c.apply == 0.f) continue;  // blocks never span two parameters (segments.py), so skipping a tile is exact
    T* p = slots.param[t.slot];
    const T* g = cgrad ? nullptr : slots.grad[t.slot];
    int64_t flat[kQBlock];
    float gv[kQBlock], pv[kQBlock], mv[kQBlock], vv[kQBlock];
    int32_t code_m[kQBlock], code_v[kQBlock];
    for (int64_t from = 0; from < t.count; from += kQBlock) {
      const int64_t n = std::min<int64_t>(kQBlock, t.count - from);
      const int64_t s0 = t.state0 + t.k0 + from;  // block-aligned (segments.py aligns segments to 256)
      const int64_t blk = s0 / kQBlock;
      flat_offsets(t, index, t.k0 + from, n, flat);
      // Gathers first (scalar), then branch-free loops over the block's arrays the compiler vectorizes.
      for (int64_t e = 0; e < n; ++e) {
        gv[e] = cgrad ? cgrad[s0 + e] : (g ? load_f(g, flat[e]) : 0.f);
        pv[e] = master ? master[s0 + e] : load_f(p, flat[e]);
        code_m[e] = cm[s0 + e];
        code_v[e] = cv[s0 + e];
      }
      const float am_old = am[blk], av_old = av[blk];
      float new_am = 0.f, new_av = 0.f;
#pragma omp simd reduction(max : new_am, new_av)
      for (int64_t e = 0; e < n; ++e) {
        float p_e = pv[e], m_e = qm[code_m[e]] * am_old, v_e = qv[code_v[e]] * av_old;
        adamw_element(p_e, m_e, v_e, gv[e] * c.grad_scale, c);
        pv[e] = p_e;
        mv[e] = m_e;
        vv[e] = v_e;
        new_am = std::max(new_am, std::fabs(m_e));
        new_av = std::max(new_av, v_e);
      }
      const float safe_m = new_am > 0 ? new_am : 1.f, safe_v = new_av > 0 ? new_av : 1.f;
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) {
        code_m[e] = quantize_code(mv[e] / safe_m, mids_m);
        code_v[e] = quantize_code(vv[e] / safe_v, mids_v);
      }
      for (int64_t e = 0; e < n; ++e) {
        cm[s0 + e] = static_cast<uint8_t>(code_m[e]);
        cv[s0 + e] = static_cast<uint8_t>(code_v[e]);
        if (master) master[s0 + e] = pv[e];
        store_f(p, flat[e], pv[e]);
      }
      am[blk] = new_am;
      av[blk] = new_av;
    }
  }
  });
}

void masked_adamw8bit_update_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                 const std::optional<at::Tensor>& compact_grad, const at::Tensor& tiles,
                                 const at::Tensor& index, at::Tensor& codes_m, at::Tensor& codes_v,
                                 at::Tensor& absmax_m, at::Tensor& absmax_v, const at::Tensor& qmap_m,
                                 const at::Tensor& qmap_v, const at::Tensor& mids_m, const at::Tensor& mids_v,
                                 const std::optional<at::Tensor>& master, const at::Tensor& coef) {
  check_common(tiles, index);
  for (const at::Tensor* t : {&codes_m, &codes_v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kByte && t->is_contiguous(),
                "8-bit codes must be contiguous CPU uint8 tensors; got ", t->scalar_type());
  check_f32(absmax_m, "absmax_m");
  check_f32(absmax_v, "absmax_v");
  for (const at::Tensor* t : {&qmap_m, &qmap_v, &mids_m, &mids_v}) {
    check_f32(*t, "qmap/midpoints");
    TORCH_CHECK(t->numel() == 256, "quantization maps and midpoint tables hold 256 values; got ", t->numel());
  }
  check_f32(coef, "coef");
  TORCH_CHECK(coef.numel() >= static_cast<int64_t>(params.size()) * kCoefFields, "coef must hold [",
              params.size(), ", ", kCoefFields, "] values (one row per parameter)");
  const bool compact = compact_grad.has_value() && compact_grad->defined();
  const bool has_master = master.has_value() && master->defined();
  if (compact) check_f32(*compact_grad, "compact_grad");
  if (has_master) check_f32(*master, "master");
  if (params.empty() || tiles.size(0) == 0) return;
  MU_FAST_DISPATCH_PARAM_TYPES(params[0].scalar_type(), "masked_adamw8bit_update_cpu",
                                  [&] {
    const Slots<scalar_t> slots = gather_slots<scalar_t>(params, grads, compact);
    update8_impl<scalar_t>(slots, compact ? compact_grad->data_ptr<float>() : nullptr, tiles,
                           index.data_ptr<int32_t>(), codes_m.data_ptr<uint8_t>(), codes_v.data_ptr<uint8_t>(),
                           absmax_m.data_ptr<float>(), absmax_v.data_ptr<float>(), qmap_m.data_ptr<float>(),
                           qmap_v.data_ptr<float>(), mids_m.data_ptr<float>(), mids_v.data_ptr<float>(),
                           has_master ? master->data_ptr<float>() : nullptr, coef.data_ptr<float>());
  });
}

template <typename T>
void gather_impl(const T* g, const at::Tensor& tiles, const int32_t* idx, int64_t tile_begin, int64_t tile_end,
                 float* out, bool accumulate) {
  const int64_t* rows = tiles.data_ptr<int64_t>();
  at::parallel_for(tile_begin, tile_end, 1, [&](int64_t tile_from, int64_t tile_to) {
  for (int64_t ti = tile_from; ti < tile_to; ++ti) {
    const Tile t(rows + ti * kTileFields);
    if (t.kind != kStrided) {
      for_each_gathered(t, idx, g, static_cast<const T*>(nullptr), [&](const int64_t* flat, int64_t s0, int64_t n) {
        for (int64_t e = 0; e < n; ++e) out[s0 + e] = accumulate ? out[s0 + e] + load_f(g, flat[e]) : load_f(g, flat[e]);
      });
      continue;
    }
    for_each_run(t, [&](int64_t flat, int64_t st, int64_t len) {
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) {
        const float x = load_f(g, flat + e);
        out[st + e] = accumulate ? out[st + e] + x : x;
      }
    });
  }
  });
}

void masked_gather_grad_cpu(const at::Tensor& grad, const at::Tensor& tiles, const at::Tensor& index,
                            int64_t tile_begin, int64_t tile_end, at::Tensor& compact_grad, bool accumulate) {
  check_common(tiles, index);
  check_f32(compact_grad, "compact_grad");
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous(), "grad must be a contiguous CPU tensor");
  TORCH_CHECK(0 <= tile_begin && tile_begin <= tile_end && tile_end <= tiles.size(0), "tile range [", tile_begin,
              ", ", tile_end, ") is outside the table's ", tiles.size(0), " tiles");
  MU_FAST_DISPATCH_PARAM_TYPES(grad.scalar_type(), "masked_gather_grad_cpu", [&] {
    gather_impl<scalar_t>(grad.data_ptr<scalar_t>(), tiles, index.data_ptr<int32_t>(), tile_begin, tile_end,
                          compact_grad.data_ptr<float>(), accumulate);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mu_fast, CPU, m) {
  m.impl("masked_adamw_grad_sumsq", &masked_adamw_grad_sumsq_cpu);
  m.impl("masked_adamw_scalars", &masked_adamw_scalars_cpu);
  m.impl("masked_adamw_update", &masked_adamw_update_cpu);
  m.impl("masked_adamw8bit_update", &masked_adamw8bit_update_cpu);
  m.impl("masked_gather_grad", &masked_gather_grad_cpu);
}

}  // namespace mu_fast
