// The CPU kernel of slimcore::channel_affine, compiled once per instruction set (the scheme of
// batch_norm_kernel.h): included by channel_affine.cpp (baseline x86-64 / any other CPU),
// channel_affine_avx2.cpp and channel_affine_avx512.cpp, each of which defines
// SLIMCORE_AFFINE_ISA (the namespace of its copy) and, for the AVX ones, SLIMCORE_AFFINE_TARGET,
// which switches the code generated from here on to that ISA after every other header is included.
//
// One memory pass: every output element is read from its (gathered) input element, scaled,
// shifted and activated. The output's elements are split over threads as flat ranges (tasks
// sized by cost_model.h), so a few large planes split as well as many small rows:
//   Planes  a range crosses (n, c) runs of S values; each piece is one channel's affine map with
//           scalar coefficients, read from input plane (n, index[c]);
//   Rows    a range crosses rows of C_out channels; each piece maps a row segment with
//           per-channel coefficients, reading the input row through index: consecutive source
//           channels as vector runs, or element by element when the runs are short. Without a
//           gather, short rows are swept many at a time (the range is contiguous in and out).
// Inner loops use GCC vector extensions (float/double/bfloat16 loads and stores) and fall back
// to plain loops for float16 and the tails; silu evaluates exp per lane.
//
// (Included once per translation unit: no include guard.)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../channel_affine_args.h"
#include "../channel_affine_math.h"
#include "cost_model.h"

#ifndef SLIMCORE_AFFINE_ISA
#error "define SLIMCORE_AFFINE_ISA before including channel_affine_kernel.h"
#endif
#ifdef SLIMCORE_AFFINE_TARGET
#define SLIMCORE_AFFINE_PRAGMA(x) _Pragma(#x)
#define SLIMCORE_AFFINE_TARGET_PRAGMA(t) SLIMCORE_AFFINE_PRAGMA(GCC target(t))
SLIMCORE_AFFINE_TARGET_PRAGMA(SLIMCORE_AFFINE_TARGET)
#define SLIMCORE_VEC_BYTES 32
#else
#define SLIMCORE_VEC_BYTES 16  // baseline x86-64 (SSE2) and other CPUs
#endif

namespace slimcore {
namespace SLIMCORE_AFFINE_ISA {
namespace {

// Rough single-core cost per output element (cost_model.h): a read and a write; silu adds an exp.
constexpr double kAffineNsPerElement = 0.4;
constexpr double kSiluNsPerElement = 2.0;
// Rows: source runs shorter than this (on average) are gathered element by element.
constexpr int64_t kShortRun = 4;
// Rows without a gather shorter than this many elements are swept several at a time (a row of 16
// or 64 channels costs as much in per-row overhead as in arithmetic).
constexpr int64_t kRowSweep = 1024;

#include "vector_io.h"

// The activation on a whole vector: the formulas of channel_affine_math.h, lane-wise.
template <Activation A, typename acc_t>
inline vec_t<acc_t> activate_vec(vec_t<acc_t> x) {
  const vec_t<acc_t> zero = vec_t<acc_t>{} + acc_t(0);
  const vec_t<acc_t> six = zero + acc_t(6);
  if constexpr (A == Activation::Relu) {
    return x < zero ? zero : x;
  } else if constexpr (A == Activation::Relu6) {
    const vec_t<acc_t> low = x < zero ? zero : x;
    return low > six ? six : low;
  } else if constexpr (A == Activation::Hardswish) {
    vec_t<acc_t> r = x + acc_t(3);
    r = r < zero ? zero : r;
    r = r > six ? six : r;
    return x * r / six;
  } else if constexpr (A == Activation::Silu) {
    for (int64_t l = 0; l < kLanes<acc_t>; ++l) x[l] = activate<A, acc_t>(x[l]);
    return x;
  } else {
    return x;
  }
}

// y[i] = act(x[i] * k + c) for i in [0, n): one channel's run, scalar coefficients.
template <Activation A, typename scalar_t, typename acc_t>
inline void affine_run(const scalar_t* x, scalar_t* y, int64_t n, acc_t k, acc_t c) {
  int64_t i = 0;
  if constexpr (kVectorIO<scalar_t>) {
    constexpr int64_t L = kLanes<acc_t>;
    for (; i + L <= n; i += L) {
      vec_store<scalar_t, acc_t>(y + i, activate_vec<A, acc_t>(vec_load<scalar_t, acc_t>(x + i) * k + c));
    }
  }
  for (; i < n; ++i) y[i] = static_cast<scalar_t>(activate<A, acc_t>(static_cast<acc_t>(x[i]) * k + c));
}

// y[i] = act(x[i] * k[i] + c[i]) for i in [0, n): consecutive channels of one row.
template <Activation A, typename scalar_t, typename acc_t>
inline void affine_cols(const scalar_t* x, scalar_t* y, int64_t n, const acc_t* k, const acc_t* c) {
  int64_t i = 0;
  if constexpr (kVectorIO<scalar_t>) {
    constexpr int64_t L = kLanes<acc_t>;
    for (; i + L <= n; i += L) {
      vec_t<acc_t> kv, cv;
      std::memcpy(&kv, k + i, sizeof(kv));
      std::memcpy(&cv, c + i, sizeof(cv));
      vec_store<scalar_t, acc_t>(y + i, activate_vec<A, acc_t>(vec_load<scalar_t, acc_t>(x + i) * kv + cv));
    }
  }
  for (; i < n; ++i) y[i] = static_cast<scalar_t>(activate<A, acc_t>(static_cast<acc_t>(x[i]) * k[i] + c[i]));
}

// y[i] = act(x[index[i]] * k[i] + c[i]) for i in [0, n): a row's channels read through the index
// (scalar loads into a vector, vector arithmetic and store).
template <Activation A, typename scalar_t, typename acc_t>
inline void affine_gather(const scalar_t* x, scalar_t* y, const int64_t* index, int64_t n, const acc_t* k,
                          const acc_t* c) {
  int64_t i = 0;
  if constexpr (kVectorIO<scalar_t>) {
    constexpr int64_t L = kLanes<acc_t>;
    for (; i + L <= n; i += L) {
      vec_t<acc_t> v, kv, cv;
      for (int64_t l = 0; l < L; ++l) v[l] = static_cast<acc_t>(x[index[i + l]]);
      std::memcpy(&kv, k + i, sizeof(kv));
      std::memcpy(&cv, c + i, sizeof(cv));
      vec_store<scalar_t, acc_t>(y + i, activate_vec<A, acc_t>(v * kv + cv));
    }
  }
  for (; i < n; ++i) y[i] = static_cast<scalar_t>(activate<A, acc_t>(static_cast<acc_t>(x[index[i]]) * k[i] + c[i]));
}

// `len` output channels from `dst` on come from the consecutive input channels from `src` on.
struct Run {
  int64_t dst, src, len;
};

// The rows traversal's reading plan: runs of consecutive source channels, or (short runs) none,
// and the element-wise gather through the index instead.
std::vector<Run> row_runs(const int64_t* index, int64_t C_out) {
  std::vector<Run> runs;
  if (index == nullptr) {
    runs.push_back({0, 0, C_out});
    return runs;
  }
  for (int64_t c = 0; c < C_out; ++c) {
    if (!runs.empty() && runs.back().src + runs.back().len == index[c]) {
      ++runs.back().len;
    } else {
      runs.push_back({c, index[c], 1});
    }
  }
  if (static_cast<int64_t>(runs.size()) * kShortRun > C_out) runs.clear();
  return runs;
}

template <Activation A, typename scalar_t, typename acc_t>
void run_kernel(const AffineArgs& a, const scalar_t* in, scalar_t* out, const int64_t* index, const acc_t* scale,
                const acc_t* shift) {
  const int64_t total = a.out_numel();
  const int64_t grain = cpu::grain_for(A == Activation::Silu ? kSiluNsPerElement : kAffineNsPerElement);
  if (a.layout == AffineLayout::Planes) {
    const int64_t S = a.S;
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      int64_t plane = begin / S;
      int64_t off = begin - plane * S;
      for (int64_t p = begin; p < end; ++plane, off = 0) {
        const int64_t len = std::min(S - off, end - p);
        const int64_t n = plane / a.C_out;
        const int64_t c = plane - n * a.C_out;
        const int64_t src = index != nullptr ? index[c] : c;
        affine_run<A, scalar_t, acc_t>(in + (n * a.C_in + src) * S + off, out + p, len, scale[c], shift[c]);
        p += len;
      }
    });
    return;
  }
  const std::vector<Run> runs = row_runs(index, a.C_out);
  const int64_t C = a.C_out;
  const bool identity = a.C_in == C && runs.size() == 1 && runs[0].src == 0;
  if (identity && C < kRowSweep) {
    // Input and output rows have the same length: a task's range is one contiguous span of both,
    // swept with the coefficients repeated over `reps` rows (plus one, for spans starting mid-row).
    const int64_t reps = kRowSweep / C + 1;
    std::vector<acc_t> k(C * (reps + 1)), b(C * (reps + 1));
    for (int64_t j = 0; j < C * (reps + 1); ++j) k[j] = scale[j % C], b[j] = shift[j % C];
    at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end;) {
        const int64_t off = p % C;
        const int64_t len = std::min(end - p, C * reps);
        affine_cols<A, scalar_t, acc_t>(in + p, out + p, len, k.data() + off, b.data() + off);
        p += len;
      }
    });
    return;
  }
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t row = begin / C;
    int64_t c0 = begin - row * C;
    for (int64_t p = begin; p < end; ++row, c0 = 0) {
      const int64_t c1 = std::min(C, c0 + (end - p));
      const scalar_t* x = in + row * a.C_in;
      scalar_t* y = out + row * C;
      if (runs.empty()) {  // short runs: gather element by element
        affine_gather<A, scalar_t, acc_t>(x, y + c0, index + c0, c1 - c0, scale + c0, shift + c0);
      } else {
        auto run = c0 == 0 ? runs.begin()
                           : std::upper_bound(runs.begin(), runs.end(), c0,
                                              [](int64_t c, const Run& r) { return c < r.dst + r.len; });
        for (; run != runs.end() && run->dst < c1; ++run) {
          const int64_t lo = std::max(c0, run->dst);
          const int64_t hi = std::min(c1, run->dst + run->len);
          affine_cols<A, scalar_t, acc_t>(x + run->src + (lo - run->dst), y + lo, hi - lo, scale + lo, shift + lo);
        }
      }
      p += c1 - c0;
    }
  });
}

}  // namespace

// out = act(input gathered by index * scale + shift); scale/shift already in a.acc_type, contiguous.
void channel_affine(const AffineArgs& a, const at::Tensor& input, const int64_t* index, const at::Tensor& scale,
                    const at::Tensor& shift, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_channel_affine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_activation(a.activation, [&](auto act) {
      run_kernel<decltype(act)::value, scalar_t, acc_t>(
          a, input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), index,
          scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>());
    });
  });
}

}  // namespace SLIMCORE_AFFINE_ISA
}  // namespace slimcore

#undef SLIMCORE_VEC_BYTES
