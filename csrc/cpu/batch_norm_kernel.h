// The CPU kernels of slimcore::batch_norm (forward) and slimcore::batch_norm_backward, whose
// grad_weight carries scale * dg(weight): the sparsity penalty, added where grad_weight is made.
//
// Statistics are computed in float32 (float64 for float64 input) by blocks: each block of at most
// a few KB is summed less a pivot (its first value, so float partial sums stay at the scale of the
// spread even when |mean| >> std), then its squared deviations from its own mean are summed while it
// is still in cache (an exact two-pass within the block), and blocks are merged with Chan's formula in
// float64. Memory sees one read, not two, and cancellation never occurs (|mean| >> std is fine).
//
// Three traversals, picked by layout (csrc/batch_norm_args.h) and shape (traversal_of):
//   runs     contiguous NCHW (spatial size kMinRun <= S <= kMaxRun: 4x4 to 128x128 maps) with at least
//            as many samples as threads: rows n of C runs of S values, read in memory order. Tasks
//            split the rows; within a block of rows each channel's runs are summed, then their
//            squared deviations (still in cache), into per-channel buffers (C values, not C*S); a
//            second parallel pass over rows writes each run with its channel's scalar coefficients.
//   planes   the other contiguous NCHW inputs with S >= kMinRun (fewer samples than threads, or
//            runs longer than kMaxRun): one task per channel. The channel's statistics, then its
//            output (forward) or its sums and grad_input (backward), are computed back to back;
//            also NCHW with tiny S whose rows are too long for columns.
//   columns  a matrix of R rows by W columns where column j belongs to channel j / Sc: channels_last
//            and (N, C) inputs (R = N*S, W = C, Sc = 1), and NCHW with tiny S and small C*S (R = N,
//            W = C*S, Sc = S). Tasks split the rows, accumulate per-column sums in buffers, the buffers are
//            merged per channel, and a second parallel pass over rows writes the result with
//            per-column coefficients.
// Inner loops are plain loops that GCC vectorises at -O3, or GCC vector extensions where it would
// not (the runs sums, the bfloat16 stores).
//
// The CPU BatchNorm kernels, compiled once per instruction set: included by batch_norm.cpp (baseline
// x86-64 / any other CPU), batch_norm_avx2.cpp and batch_norm_avx512.cpp, each of which defines
// SLIMCORE_BN_ISA (the namespace of its copy) and, for the AVX ones, switches the code generated
// from here on to that ISA with `#pragma GCC target` after every other header is included. So only
// these kernels are built for AVX2/AVX-512: templates of ATen, c10 and the standard library keep
// the baseline ISA wherever they are instantiated, and no inline function a baseline caller might
// link to carries AVX-512 code. batch_norm.cpp picks the copy at run time from ATen's CPU
// capability (which the ATEN_CPU_CAPABILITY environment variable can lower).
//
//
// (Included once per translation unit: no include guard.)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <optional>
#include <vector>

#include "../batch_norm_args.h"
#include "cost_model.h"

#ifndef SLIMCORE_BN_ISA
#error "define SLIMCORE_BN_ISA before including batch_norm_kernel.h"
#endif
#ifdef SLIMCORE_BN_TARGET
// Everything defined from here on (only this file's kernels) is compiled for SLIMCORE_BN_TARGET.
#define SLIMCORE_BN_PRAGMA(x) _Pragma(#x)
#define SLIMCORE_BN_TARGET_PRAGMA(t) SLIMCORE_BN_PRAGMA(GCC target(t))
SLIMCORE_BN_TARGET_PRAGMA(SLIMCORE_BN_TARGET)
#endif

namespace slimcore {
namespace SLIMCORE_BN_ISA {
namespace {


// Elements per statistics block in the planes traversal (read twice: keep it in L1).
constexpr int64_t kPlaneBlock = 4096;
// Bytes of input per block in the columns traversal (read twice: keep it in L2).
constexpr int64_t kColumnBlockBytes = 256 * 1024;
// Rows whose float partial sums are flushed to float64 at once (backward, columns).
constexpr int64_t kColumnFlushRows = 64;
// NCHW inputs are read row by row in memory order where they can be: by runs when a run is long
// enough to vectorise on its own (S >= kMinRun; per-column buffers would cost more traffic than the
// data, 4-byte coefficients per 2-byte bfloat16 value) and short enough for a block of runs to stay
// in cache between the two statistics passes (S <= kMaxRun); by columns when S is tiny and a row is
// short enough (C*S <= kMaxColumns) for blocks of several rows to stay in L2; by planes otherwise.
// Measured on the CIFAR/ImageNet shapes of benchmarks/kernels.py --bn (one thread, bfloat16): runs
// beat planes by 1.9x on 64x64x32x32 and tie on 32x256x56x56 (memory-bound); planes' channel-strided
// spans of a few cache lines defeat the prefetcher.
constexpr int64_t kMinRun = 16;
constexpr int64_t kMaxRun = 16384;
constexpr int64_t kMaxColumns = 16384;
// The columns transform folds the mean into the shift when |mean| / std <= this for every channel.
constexpr double kFoldedMeanLimit = 16.0;
// Elements per task (cost_model.h): a BN pass reads and writes each element once or twice,
// about this many ns per element on one core; smaller work stays on one thread.
constexpr double kBatchNormNsPerElement = 0.5;

inline int64_t bn_grain() { return cpu::grain_for(kBatchNormNsPerElement); }

// ---------------------------------------------------------------------------------- span sums
// `omp simd reduction` lets GCC keep one vector of partial sums per reduction (no -ffast-math
// needed); measured faster than explicit lane arrays, which GCC vectorised with shuffles.

// sum of x[0, n) - pivot. Block means are pivot + this / n, pivot a value of the block: the float
// partial sums then stay at the scale of the spread, not of the mean (|mean| >> std loses nothing).
template <typename scalar_t, typename acc_t>
inline acc_t span_sum(const scalar_t* x, int64_t n, acc_t pivot) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(x[i]) - pivot;
  return s;
}

// sum of (x - m)^2 over x[0, n)
template <typename scalar_t, typename acc_t>
inline acc_t span_sq_dev(const scalar_t* x, int64_t n, acc_t m) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(x[i]) - m;
    s += d * d;
  }
  return s;
}

// sdy += sum dy, sdyx += sum dy * (x - m) over [0, n)
template <typename scalar_t, typename acc_t>
inline void span_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t m, acc_t& sdy, acc_t& sdyx) {
  acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(dy[i]);
    a += g;
    b += g * (static_cast<acc_t>(x[i]) - m);
  }
  sdy += a;
  sdyx += b;
}

// -------------------------------------------------------------------------------- runs sums
// The runs traversal sums the k runs of S values (S = 16..16384) of one channel in a block of rows into
// vector accumulators (GCC vector extensions, compiled for this file's ISA) and reduces them once:
// a horizontal reduction per run, as an `omp simd` loop per run has, costs as much as a short run
// itself (measured on 64-value bfloat16 runs: statistics 3x slower than ATen's).
#ifdef SLIMCORE_BN_TARGET  // the AVX2 and AVX-512 copies (ymm: AVX-512's zmm would gain little here)
#define SLIMCORE_VEC_BYTES 32
#else
#define SLIMCORE_VEC_BYTES 16  // baseline x86-64 (SSE2) and other CPUs
#endif
#include "vector_io.h"

template <typename acc_t>
inline acc_t vec_total(vec_t<acc_t> v) {
  acc_t s = 0;
  for (int64_t l = 0; l < kLanes<acc_t>; ++l) s += v[l];
  return s;
}

// Applies f(vector offset i) over [0, n) in vector steps (two independent chains) and g(i) to the tail.
template <typename acc_t, typename VecStep, typename TailStep>
inline void run_steps(int64_t n, VecStep f, TailStep g) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) f(i, 0), f(i + L, 1);
  for (; i + L <= n; i += L) f(i, 0);
  for (; i < n; ++i) g(i);
}

// sum of f(x) over k runs of n values, run r at x + r * stride; f takes vectors and scalars alike
template <typename scalar_t, typename acc_t, typename F>
inline acc_t runs_reduce(const scalar_t* x, int64_t k, int64_t stride, int64_t n, F f) {
  vec_t<acc_t> a[2] = {};
  acc_t tail = 0;
  for (int64_t r = 0; r < k; ++r) {
    const scalar_t* p = x + r * stride;
    run_steps<acc_t>(n, [&](int64_t i, int j) { a[j] += f(vec_load<scalar_t, acc_t>(p + i)); },
                     [&](int64_t i) { tail += f(static_cast<acc_t>(p[i])); });
  }
  return vec_total<acc_t>(a[0] + a[1]) + tail;
}

// sum of (x - pivot) over k runs (pivot: as span_sum's)
template <typename scalar_t, typename acc_t>
inline acc_t runs_sum(const scalar_t* x, int64_t k, int64_t stride, int64_t n, acc_t pivot) {
  return runs_reduce<scalar_t, acc_t>(x, k, stride, n, [pivot](auto v) { return v - pivot; });
}

// sum of (x - m)^2 over k runs
template <typename scalar_t, typename acc_t>
inline acc_t runs_sq_dev(const scalar_t* x, int64_t k, int64_t stride, int64_t n, acc_t m) {
  return runs_reduce<scalar_t, acc_t>(x, k, stride, n, [m](auto v) {
    const auto d = v - m;
    return d * d;
  });
}

// sdy += sum dy, sdyx += sum dy * (x - m) over k runs of n values
template <typename scalar_t, typename acc_t>
inline void runs_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t k, int64_t stride, int64_t n, acc_t m,
                           double& sdy, double& sdyx) {
  vec_t<acc_t> a[2] = {}, b[2] = {};
  acc_t ta = 0, tb = 0;
  for (int64_t r = 0; r < k; ++r) {
    const scalar_t* g = dy + r * stride;
    const scalar_t* p = x + r * stride;
    run_steps<acc_t>(
        n,
        [&](int64_t i, int j) {
          const vec_t<acc_t> gv = vec_load<scalar_t, acc_t>(g + i);
          a[j] += gv;
          b[j] += gv * (vec_load<scalar_t, acc_t>(p + i) - m);
        },
        [&](int64_t i) {
          const acc_t gv = static_cast<acc_t>(g[i]);
          ta += gv;
          tb += gv * (static_cast<acc_t>(p[i]) - m);
        });
  }
  sdy += static_cast<double>(vec_total<acc_t>(a[0] + a[1]) + ta);
  sdyx += static_cast<double>(vec_total<acc_t>(b[0] + b[1]) + tb);
}

// y = (x - m) * k + c over [0, n)   (forward: k = gamma * invstd, c = beta)
template <typename scalar_t, typename acc_t>
inline void span_affine(const scalar_t* x, scalar_t* y, int64_t n, acc_t m, acc_t k, acc_t c) {
  auto one = [&](int64_t i) { y[i] = static_cast<scalar_t>((static_cast<acc_t>(x[i]) - m) * k + c); };
  if constexpr (kVectorIO<scalar_t>) {
    run_steps<acc_t>(
        n, [&](int64_t i, int) { vec_store<scalar_t, acc_t>(y + i, (vec_load<scalar_t, acc_t>(x + i) - m) * k + c); },
        one);
  } else {
    for (int64_t i = 0; i < n; ++i) one(i);
  }
}

// dx = (dy - mdy) * k1 + (x - m) * k2 over [0, n)
template <typename scalar_t, typename acc_t>
inline void span_grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, acc_t mdy, acc_t k1,
                            acc_t m, acc_t k2) {
  auto one = [&](int64_t i) {
    dx[i] = static_cast<scalar_t>((static_cast<acc_t>(dy[i]) - mdy) * k1 + (static_cast<acc_t>(x[i]) - m) * k2);
  };
  if constexpr (kVectorIO<scalar_t>) {
    run_steps<acc_t>(
        n,
        [&](int64_t i, int) {
          vec_store<scalar_t, acc_t>(dx + i, (vec_load<scalar_t, acc_t>(dy + i) - mdy) * k1 +
                                                 (vec_load<scalar_t, acc_t>(x + i) - m) * k2);
        },
        one);
  } else {
    for (int64_t i = 0; i < n; ++i) one(i);
  }
}

// ------------------------------------------------------------------------------ merged moments

// Count, mean and sum of squared deviations of a set of values, merged with Chan et al.'s formula.
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void add(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb;
    const double delta = mean_b - mean;
    const double f = nb / total;
    mean += delta * f;
    m2 += m2_b + delta * delta * n * f;
    n = total;
  }
  // A block of nb values: pivot + sum/nb is its mean (sum: of value - pivot), m2_f its squared
  // deviations about mean_f, that mean rounded to acc_t. Merged with the mean in double and m2
  // moved to it (m2_f - nb (mean_f - mean)^2): merging blocks by their rounded means would add
  // the rounding (~|mean| * 6e-8 in float) to every delta, which matters when |mean| >> std.
  void add_block(double nb, double pivot, double sum, double mean_f, double m2_f) {
    if (nb == 0) return;
    const double mean_b = pivot + sum / nb;
    const double e = mean_f - mean_b;
    add(nb, mean_b, std::max(0.0, m2_f - nb * e * e));
  }
};

// Per-channel values every kernel needs: the affine parameters (absent: 1 and 0) in acc_t.
template <typename param_t, typename acc_t>
std::vector<acc_t> read_param(const std::optional<at::Tensor>& t, int64_t C, acc_t absent) {
  std::vector<acc_t> out(C, absent);
  if (t.has_value() && t->defined()) {
    const param_t* p = t->const_data_ptr<param_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

// Where a traversal reads: runs (NCHW rows of C runs of Sc values), planes (NCHW, channel by
// channel) or columns (R x W, column j in channel j / Sc).
enum class Walk { Planes, Runs, Columns };
struct Traversal {
  Walk walk;
  int64_t R, W, Sc;
};

Traversal traversal_of(const BNShape& s) {
  if (s.layout == BNLayout::Rows) return {Walk::Columns, s.N * s.S, s.C, 1};
  if (s.S >= kMinRun) {
    // Runs split the rows among threads: with fewer rows than threads, planes split the channels.
    const bool runs = s.S <= kMaxRun && s.N >= at::get_num_threads();
    return {runs ? Walk::Runs : Walk::Planes, s.N, s.C * s.S, s.S};
  }
  if (s.C * s.S > kMaxColumns) return {Walk::Planes, s.N, s.C * s.S, s.S};
  return {Walk::Columns, s.N, s.C * s.S, s.S};
}

// Row ranges of the columns traversal: one per thread when there is enough work.
int64_t column_tasks(const Traversal& t) {
  const int64_t by_work = t.R * t.W / bn_grain();  // each task at least one grain of work
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), t.R, by_work}));
}

// Per-channel (mean, biased variance) of a columns traversal, in float64.
template <typename scalar_t, typename acc_t>
void column_statistics(const scalar_t* x, const Traversal& t, int64_t C, std::vector<double>& mean,
                       std::vector<double>& var) {
  const int64_t T = column_tasks(t), W = t.W;
  std::vector<double> tmean(T * W, 0.0), tm2(T * W, 0.0);
  std::vector<int64_t> tn(T, 0);
  const int64_t block_rows = std::max<int64_t>(1, kColumnBlockBytes / (W * static_cast<int64_t>(sizeof(scalar_t))));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> bsum(W), bm2(W);
    std::vector<double> bmean(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r_begin = t.R * task / T, r_end = t.R * (task + 1) / T;
      double* mean_t = tmean.data() + task * W;
      double* m2_t = tm2.data() + task * W;
      int64_t n = 0;
      for (int64_t rb = r_begin; rb < r_end; rb += block_rows) {
        const int64_t re = std::min(r_end, rb + block_rows), k = re - rb;
        acc_t* bs = bsum.data();
        acc_t* bq = bm2.data();
        std::fill(bs, bs + W, acc_t(0));
        std::fill(bq, bq + W, acc_t(0));
        const scalar_t* pivot = x + rb * W;  // the block's first row (see span_sum)
        for (int64_t r = rb + 1; r < re; ++r) {
          const scalar_t* row = x + r * W;
          for (int64_t j = 0; j < W; ++j) bs[j] += static_cast<acc_t>(row[j]) - static_cast<acc_t>(pivot[j]);
        }
        const acc_t inv_k = acc_t(1) / static_cast<acc_t>(k);
        for (int64_t j = 0; j < W; ++j) {  // block means: in double for the merge, rounded for the pass
          bmean[j] = static_cast<double>(pivot[j]) + static_cast<double>(bs[j]) / static_cast<double>(k);
          bs[j] = static_cast<acc_t>(pivot[j]) + bs[j] * inv_k;
        }
        for (int64_t r = rb; r < re; ++r) {
          const scalar_t* row = x + r * W;
          for (int64_t j = 0; j < W; ++j) {
            const acc_t d = static_cast<acc_t>(row[j]) - bs[j];
            bq[j] += d * d;
          }
        }
        const double f = static_cast<double>(k) / static_cast<double>(n + k);
        const double g = static_cast<double>(n) * f;
        for (int64_t j = 0; j < W; ++j) {
          const double e = static_cast<double>(bs[j]) - bmean[j];  // m2 about the double mean (Moments::add_block)
          const double delta = bmean[j] - mean_t[j];
          mean_t[j] += delta * f;
          m2_t[j] += std::max(0.0, static_cast<double>(bq[j]) - static_cast<double>(k) * e * e) + delta * delta * g;
        }
        n += k;
      }
      tn[task] = n;
    }
  });
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    Moments mo;
    for (int64_t task = 0; task < T; ++task) {
      for (int64_t j = c * t.Sc; j < (c + 1) * t.Sc; ++j) mo.add(tn[task], tmean[task * W + j], tm2[task * W + j]);
    }
    mean[c] = mo.mean;
    var[c] = mo.n > 0 ? mo.m2 / mo.n : 0.0;
  }
}

// Per-channel (mean, biased variance) of a runs traversal, in float64: blocks of rows as in
// column_statistics; within a block, channel by channel, its k runs are summed, then their squared
// deviations from the block mean (the k runs are still in cache).
template <typename scalar_t, typename acc_t>
void run_statistics(const scalar_t* x, const Traversal& t, int64_t C, std::vector<double>& mean,
                    std::vector<double>& var) {
  const int64_t T = column_tasks(t), W = t.W, S = t.Sc;
  std::vector<Moments> tmo(T * C);
  const int64_t block_rows = std::max<int64_t>(1, kColumnBlockBytes / (W * static_cast<int64_t>(sizeof(scalar_t))));
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r_begin = t.R * task / T, r_end = t.R * (task + 1) / T;
      Moments* mo = tmo.data() + task * C;
      for (int64_t rb = r_begin; rb < r_end; rb += block_rows) {
        const int64_t re = std::min(r_end, rb + block_rows), k = re - rb;
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* run = x + rb * W + c * S;
          const acc_t pivot = static_cast<acc_t>(run[0]);
          const acc_t sum = runs_sum<scalar_t, acc_t>(run, k, W, S, pivot);
          const acc_t bmean = pivot + sum / static_cast<acc_t>(k * S);
          mo[c].add_block(static_cast<double>(k * S), pivot, sum, bmean, runs_sq_dev<scalar_t, acc_t>(run, k, W, S, bmean));
        }
      }
    }
  });
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    Moments mo;
    for (int64_t task = 0; task < T; ++task) mo.add(tmo[task * C + c].n, tmo[task * C + c].mean, tmo[task * C + c].m2);
    mean[c] = mo.mean;
    var[c] = mo.n > 0 ? mo.m2 / mo.n : 0.0;
  }
}

// Per-channel mean and biased variance of one NCHW channel (planes traversal).
template <typename scalar_t, typename acc_t>
Moments plane_statistics(const scalar_t* x, const BNShape& s, int64_t c) {
  Moments mo;
  const int64_t S = s.S;
  if (S >= kPlaneBlock) {
    for (int64_t n = 0; n < s.N; ++n) {
      const scalar_t* p = x + (n * s.C + c) * S;
      for (int64_t off = 0; off < S; off += kPlaneBlock) {
        const int64_t len = std::min(kPlaneBlock, S - off);
        const acc_t pivot = static_cast<acc_t>(p[off]);
        const acc_t sum = span_sum<scalar_t, acc_t>(p + off, len, pivot);
        const acc_t mb = pivot + sum / static_cast<acc_t>(len);
        mo.add_block(len, pivot, sum, mb, span_sq_dev<scalar_t, acc_t>(p + off, len, mb));
      }
    }
    return mo;
  }
  const int64_t spans = std::max<int64_t>(1, kPlaneBlock / S);  // whole (n, c) runs per block
  for (int64_t n0 = 0; n0 < s.N; n0 += spans) {
    const int64_t n1 = std::min(s.N, n0 + spans);
    const acc_t pivot = static_cast<acc_t>(x[(n0 * s.C + c) * S]);
    acc_t sum = 0;
    for (int64_t n = n0; n < n1; ++n) sum += span_sum<scalar_t, acc_t>(x + (n * s.C + c) * S, S, pivot);
    const acc_t mb = pivot + sum / static_cast<acc_t>((n1 - n0) * S);
    acc_t q = 0;
    for (int64_t n = n0; n < n1; ++n) q += span_sq_dev<scalar_t, acc_t>(x + (n * s.C + c) * S, S, mb);
    mo.add_block(static_cast<double>((n1 - n0) * S), pivot, sum, mb, q);
  }
  return mo;
}

// ------------------------------------------------------------------------------------ forward

template <typename scalar_t, typename param_t>
void forward_kernel(const BNShape& s, const at::Tensor& input, at::Tensor& out, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
                    const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                    at::Tensor& save_mean, at::Tensor& save_invstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.C;
  const std::vector<acc_t> gamma = read_param<param_t, acc_t>(weight, C, acc_t(1));
  const std::vector<acc_t> beta = read_param<param_t, acc_t>(bias, C, acc_t(0));
  const bool has_running = running_mean.has_value() && running_mean->defined();
  param_t* rmean = has_running ? running_mean->mutable_data_ptr<param_t>() : nullptr;
  param_t* rvar = has_running ? running_var->mutable_data_ptr<param_t>() : nullptr;
  acc_t* smean = save_mean.mutable_data_ptr<acc_t>();
  acc_t* sinvstd = save_invstd.mutable_data_ptr<acc_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t count = s.count();

  // Per channel: save the statistics, update the running ones.
  auto finish_channel = [&](int64_t c, double mean, double var) {
    const double invstd = 1.0 / std::sqrt(var + eps);
    smean[c] = static_cast<acc_t>(mean);
    sinvstd[c] = static_cast<acc_t>(invstd);
    if (training && rmean != nullptr) {
      const double unbiased = count > 1 ? var * static_cast<double>(count) / static_cast<double>(count - 1) : var;
      rmean[c] = static_cast<param_t>(momentum * mean + (1.0 - momentum) * static_cast<double>(rmean[c]));
      rvar[c] = static_cast<param_t>(momentum * unbiased + (1.0 - momentum) * static_cast<double>(rvar[c]));
    }
  };

  if (training && count == 0) {  // empty batch: nothing to normalise, running statistics unchanged
    std::fill(smean, smean + C, acc_t(0));
    std::fill(sinvstd, sinvstd + C, acc_t(0));
    return;
  }
  const Traversal t = traversal_of(s);
  if (t.walk == Walk::Planes) {
    const int64_t grain = std::max<int64_t>(1, bn_grain() / std::max<int64_t>(1, count));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double mean, var;
        if (training) {
          const Moments mo = plane_statistics<scalar_t, acc_t>(x, s, c);
          mean = mo.mean;
          var = mo.m2 / mo.n;
        } else {
          mean = static_cast<double>(rmean[c]);
          var = static_cast<double>(rvar[c]);
        }
        finish_channel(c, mean, var);
        const acc_t k = gamma[c] * sinvstd[c];
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = (n * C + c) * s.S;
          span_affine<scalar_t, acc_t>(x + off, y + off, s.S, smean[c], k, beta[c]);
        }
      }
    });
    return;
  }
  std::vector<double> mean(C), var(C);
  if (training) {
    if (t.walk == Walk::Runs) {
      run_statistics<scalar_t, acc_t>(x, t, C, mean, var);
    } else {
      column_statistics<scalar_t, acc_t>(x, t, C, mean, var);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<double>(rmean[c]);
      var[c] = static_cast<double>(rvar[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) finish_channel(c, mean[c], var[c]);
  const int64_t row_grain = std::max<int64_t>(1, bn_grain() / std::max<int64_t>(1, t.W));
  if (t.walk == Walk::Runs) {  // each run with its channel's scalars: y = (x - m) * k + b, exact for any mean
    std::vector<acc_t> ck(C);
    for (int64_t c = 0; c < C; ++c) ck[c] = gamma[c] * sinvstd[c];
    at::parallel_for(0, t.R, row_grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = r * t.W + c * t.Sc;
          span_affine<scalar_t, acc_t>(x + off, y + off, t.Sc, smean[c], ck[c], beta[c]);
        }
      }
    });
    return;
  }
  // Per-column coefficients, then the output row by row: y = x * k + (b - m * k), one multiply-add
  // and two coefficient loads per element, when every channel's |mean| <= kFoldedMeanLimit * std
  // (the rounding of m * k then stays within a few ulps of y's scale: ordinary activations), else
  // y = (x - m) * k + b, exact for any mean.
  const int64_t W = t.W;
  bool folded = true;
  for (int64_t c = 0; c < C; ++c) {
    folded = folded && std::abs(static_cast<double>(smean[c]) * static_cast<double>(sinvstd[c])) <= kFoldedMeanLimit;
  }
  std::vector<acc_t> cm(W), ck(W), cb(W);
  for (int64_t j = 0; j < W; ++j) {
    const int64_t c = j / t.Sc;
    ck[j] = gamma[c] * sinvstd[c];
    cm[j] = smean[c];
    cb[j] = folded ? static_cast<acc_t>(static_cast<double>(beta[c]) - static_cast<double>(smean[c]) * ck[j]) : beta[c];
  }
  at::parallel_for(0, t.R, row_grain, [&](int64_t r0, int64_t r1) {
    const acc_t* m = cm.data();
    const acc_t* k = ck.data();
    const acc_t* b = cb.data();
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x + r * W;
      scalar_t* yr = y + r * W;
      if (folded) {
        for (int64_t j = 0; j < W; ++j) yr[j] = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * k[j] + b[j]);
      } else {
        for (int64_t j = 0; j < W; ++j) {
          yr[j] = static_cast<scalar_t>((static_cast<acc_t>(xr[j]) - m[j]) * k[j] + b[j]);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------------- backward

// The grad_input coefficients of one channel.
template <typename acc_t>
struct ChannelGrad {
  acc_t mdy, k1, k2;  // grad_input = (dy - mdy) * k1 + (x - mean) * k2
};

template <typename scalar_t, typename param_t>
void backward_kernel(const BNShape& s, const at::Tensor& grad_out, const at::Tensor& input,
                     const std::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                     const at::Tensor& save_invstd, bool training, const BNPenalty& pen, at::Tensor& grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = s.C;
  const std::vector<acc_t> gamma = read_param<param_t, acc_t>(weight, C, acc_t(1));
  const acc_t* mean = save_mean.const_data_ptr<acc_t>();
  const acc_t* invstd = save_invstd.const_data_ptr<acc_t>();
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const scalar_t* dy = grad_out.const_data_ptr<scalar_t>();
  scalar_t* dx = grad_input.mutable_data_ptr<scalar_t>();
  param_t* gw = grad_weight.mutable_data_ptr<param_t>();
  param_t* gb = grad_bias.mutable_data_ptr<param_t>();
  const double count = static_cast<double>(s.count());

  // From the channel's sums: grad_weight (+ scale * dg(gamma), the fused penalty), grad_bias, and
  // grad_input's coefficients. Training: dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat));
  // eval (running statistics are constants): dx = gamma*invstd*dy.
  auto finish_channel = [&](int64_t c, double sdy, double sdyx) -> ChannelGrad<acc_t> {
    const double is = static_cast<double>(invstd[c]);
    double g_w = sdyx * is;
    if (pen.active) {
      g_w += pen.scale * static_cast<double>(penalty_subgradient_dynamic<acc_t>(gamma[c], pen.params));
    }
    gw[c] = static_cast<param_t>(g_w);
    gb[c] = static_cast<param_t>(sdy);
    const double k1 = static_cast<double>(gamma[c]) * is;
    if (!training || count == 0) return {acc_t(0), static_cast<acc_t>(k1), acc_t(0)};
    return {static_cast<acc_t>(sdy / count), static_cast<acc_t>(k1), static_cast<acc_t>(-k1 * is * is * sdyx / count)};
  };

  const Traversal t = traversal_of(s);
  if (t.walk == Walk::Planes) {
    const int64_t grain = std::max<int64_t>(1, bn_grain() / std::max<int64_t>(1, s.count()));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const acc_t m = mean[c];
        double sdy = 0, sdyx = 0;  // float partial sums over pieces of <= kPlaneBlock, flushed to float64
        const int64_t S = s.S;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = (n * C + c) * S;
          for (int64_t o = 0; o < S; o += kPlaneBlock) {
            acc_t a = 0, b = 0;
            span_grad_sums<scalar_t, acc_t>(dy + off + o, x + off + o, std::min(kPlaneBlock, S - o), m, a, b);
            sdy += a;
            sdyx += b;
          }
        }
        const auto g = finish_channel(c, sdy, sdyx);
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = (n * C + c) * S;
          span_grad_input<scalar_t, acc_t>(dy + off, x + off, dx + off, S, g.mdy, g.k1, m, g.k2);
        }
      }
    });
    return;
  }

  const int64_t row_grain = std::max<int64_t>(1, bn_grain() / std::max<int64_t>(1, t.W));
  if (t.walk == Walk::Runs) {
    // Per-task sums per channel (vector sums over a block of rows, then float64), then grad_input run by
    // run with the channel's scalar coefficients.
    const int64_t W = t.W, S = t.Sc, T = column_tasks(t);
    const int64_t block_rows = std::max<int64_t>(
        1, kColumnBlockBytes / (2 * W * static_cast<int64_t>(sizeof(scalar_t))));  // dy and x
    std::vector<double> tsdy(T * C, 0.0), tsdyx(T * C, 0.0);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t r_begin = t.R * task / T, r_end = t.R * (task + 1) / T;
        for (int64_t rb = r_begin; rb < r_end; rb += block_rows) {
          const int64_t k = std::min(r_end, rb + block_rows) - rb;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t off = rb * W + c * S;
            runs_grad_sums<scalar_t, acc_t>(dy + off, x + off, k, W, S, mean[c], tsdy[task * C + c],
                                            tsdyx[task * C + c]);
          }
        }
      }
    });
    std::vector<ChannelGrad<acc_t>> cg(C);
    for (int64_t c = 0; c < C; ++c) {
      double sdy = 0, sdyx = 0;
      for (int64_t task = 0; task < T; ++task) {
        sdy += tsdy[task * C + c];
        sdyx += tsdyx[task * C + c];
      }
      cg[c] = finish_channel(c, sdy, sdyx);
    }
    at::parallel_for(0, t.R, row_grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < C; ++c) {
          const int64_t off = r * W + c * S;
          span_grad_input<scalar_t, acc_t>(dy + off, x + off, dx + off, S, cg[c].mdy, cg[c].k1, mean[c], cg[c].k2);
        }
      }
    });
    return;
  }

  // Columns: per-task sums per column (float over kColumnFlushRows rows, then float64).
  const int64_t W = t.W, T = column_tasks(t);
  std::vector<acc_t> cm(W);
  for (int64_t j = 0; j < W; ++j) cm[j] = mean[j / t.Sc];
  std::vector<double> tsdy(T * W, 0.0), tsdyx(T * W, 0.0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> fa(W), fb(W);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r_begin = t.R * task / T, r_end = t.R * (task + 1) / T;
      double* da = tsdy.data() + task * W;
      double* db = tsdyx.data() + task * W;
      for (int64_t rb = r_begin; rb < r_end; rb += kColumnFlushRows) {
        const int64_t re = std::min(r_end, rb + kColumnFlushRows);
        acc_t* a = fa.data();
        acc_t* b = fb.data();
        const acc_t* m = cm.data();
        std::fill(a, a + W, acc_t(0));
        std::fill(b, b + W, acc_t(0));
        for (int64_t r = rb; r < re; ++r) {
          const scalar_t* gr = dy + r * W;
          const scalar_t* xr = x + r * W;
          for (int64_t j = 0; j < W; ++j) {
            const acc_t g = static_cast<acc_t>(gr[j]);
            a[j] += g;
            b[j] += g * (static_cast<acc_t>(xr[j]) - m[j]);
          }
        }
        for (int64_t j = 0; j < W; ++j) {
          da[j] += static_cast<double>(a[j]);
          db[j] += static_cast<double>(b[j]);
        }
      }
    }
  });
  std::vector<acc_t> cmdy(W), ck1(W), ck2(W);
  for (int64_t c = 0; c < C; ++c) {
    double sdy = 0, sdyx = 0;
    for (int64_t task = 0; task < T; ++task) {
      for (int64_t j = c * t.Sc; j < (c + 1) * t.Sc; ++j) {
        sdy += tsdy[task * W + j];
        sdyx += tsdyx[task * W + j];
      }
    }
    const auto g = finish_channel(c, sdy, sdyx);
    for (int64_t j = c * t.Sc; j < (c + 1) * t.Sc; ++j) {
      cmdy[j] = g.mdy;
      ck1[j] = g.k1;
      ck2[j] = g.k2;
    }
  }
  at::parallel_for(0, t.R, row_grain, [&](int64_t r0, int64_t r1) {
    const acc_t* m = cm.data();
    const acc_t* mdy = cmdy.data();
    const acc_t* k1 = ck1.data();
    const acc_t* k2 = ck2.data();
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* gr = dy + r * W;
      const scalar_t* xr = x + r * W;
      scalar_t* out = dx + r * W;
      for (int64_t j = 0; j < W; ++j) {
        out[j] = static_cast<scalar_t>((static_cast<acc_t>(gr[j]) - mdy[j]) * k1[j] +
                                       (static_cast<acc_t>(xr[j]) - m[j]) * k2[j]);
      }
    }
  });
}

}  // namespace

void forward(const BNShape& s, const at::Tensor& input, at::Tensor& out, const std::optional<at::Tensor>& weight,
             const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
             const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
             at::Tensor& save_mean, at::Tensor& save_invstd, at::ScalarType param_type) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_batch_norm_cpu", [&] {
    with_param_type<scalar_t>(param_type, [&](auto param_tag) {
      using param_t = decltype(param_tag);
      forward_kernel<scalar_t, param_t>(s, input, out, weight, bias, running_mean, running_var, training, momentum,
                                        eps, save_mean, save_invstd);
    });
  });
}

void backward(const BNShape& s, const at::Tensor& grad_out, const at::Tensor& input,
              const std::optional<at::Tensor>& weight, const at::Tensor& save_mean, const at::Tensor& save_invstd,
              bool training, const BNPenalty& pen, at::Tensor& grad_input, at::Tensor& grad_weight,
              at::Tensor& grad_bias, at::ScalarType param_type) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "slimcore_batch_norm_backward_cpu",
                                  [&] {
                                    with_param_type<scalar_t>(param_type, [&](auto param_tag) {
                                      using param_t = decltype(param_tag);
                                      backward_kernel<scalar_t, param_t>(s, grad_out, input, weight, save_mean,
                                                                         save_invstd, training, pen, grad_input,
                                                                         grad_weight, grad_bias);
                                    });
                                  });
}

}  // namespace SLIMCORE_BN_ISA
}  // namespace slimcore

#undef SLIMCORE_VEC_BYTES
