// CPU kernels of slimcore::channel_gather (out of place) and slimcore::channel_gather_ (in place):
// weight.index_select(0, out_index).index_select(1, in_index) in one pass, without the
// intermediate tensor of the two-step chain. The weight is viewed as (rows, cols, inner)
// (channel_gather_args.h); each output row is copied as runs of consecutive source elements
// (whole rows when in_index is None; consecutive input channels merged), or element by element
// through in_index when the runs are short and inner == 1 (Linear weights).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../channel_gather_args.h"
#include "cost_model.h"

namespace slimcore {
namespace {

// Runs shorter than this many elements (on average) are copied element-wise through in_index.
constexpr int64_t kShortRun = 4;
// Runs of at least this many bytes go through memmove (overlapping vector moves, even for a 3x3
// kernel's 36 bytes); shorter ones through a plain loop.
constexpr int64_t kMemmoveMinBytes = 32;
// A copied element costs about this (memory bound, runs of a few bytes to whole rows); with
// cost_model.h it sets the elements per task.
constexpr double kGatherNsPerElement = 0.5;

int64_t gather_grain() { return cpu::grain_for(kGatherNsPerElement); }

// `len` elements at offset `dst` of an output row come from offset `src` of its source row.
struct Run {
  int64_t dst, src, len;
};

// How every output row is assembled from its source row (the same for all rows).
struct RowPlan {
  int64_t row_len = 0;              // output row length, out_cols * inner
  std::vector<Run> runs;            // sorted by dst, covering [0, row_len)
  const int64_t* in = nullptr;      // set instead: element-wise gather, out_row[c] = src_row[in[c]]
};

RowPlan make_row_plan(const GatherArgs& g) {
  RowPlan plan;
  plan.row_len = g.out_cols * g.inner;
  if (!g.in_host.defined()) {
    plan.runs.push_back({0, 0, plan.row_len});
    return plan;
  }
  const int64_t* in = g.in_host.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < g.out_cols; ++j) {
    const int64_t src = in[j] * g.inner;
    if (!plan.runs.empty() && plan.runs.back().src + plan.runs.back().len == src) {
      plan.runs.back().len += g.inner;  // the next input channel: extend the run
    } else {
      plan.runs.push_back({j * g.inner, src, g.inner});
    }
  }
  if (g.inner == 1 && static_cast<int64_t>(plan.runs.size()) * kShortRun > plan.row_len) {
    plan.in = in;
    plan.runs.clear();
  }
  return plan;
}

// Copies n elements front to back. Also correct for overlapping ranges with d <= s, which is how
// the in-place gather's sequential part moves elements.
template <typename T>
inline void move_forward(T* d, const T* s, int64_t n) {
  if (n * static_cast<int64_t>(sizeof(T)) >= kMemmoveMinBytes) {
    std::memmove(d, s, n * sizeof(T));
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
  }
}

// Output row offsets [c0, c1) from source row s into output row d.
template <typename T>
void copy_row(const RowPlan& plan, const T* s, T* d, int64_t c0, int64_t c1) {
  if (plan.in != nullptr) {
    for (int64_t c = c0; c < c1; ++c) d[c] = s[plan.in[c]];
    return;
  }
  auto run = c0 == 0 ? plan.runs.begin()
                     : std::upper_bound(plan.runs.begin(), plan.runs.end(), c0,
                                        [](int64_t c, const Run& r) { return c < r.dst + r.len; });
  for (; run != plan.runs.end() && run->dst < c1; ++run) {
    const int64_t a = std::max(c0, run->dst);
    const int64_t b = std::min(c1, run->dst + run->len);
    move_forward(d + a, s + run->src + (a - run->dst), b - a);
  }
}

// out[p] = w[g.source_position(p)] for the output positions p in [begin, end), front to back.
// out may be w itself (the in-place gather) as long as no position in [begin, end) is read after
// it was written: true for a wave, and for any range processed front to back.
template <typename T>
void gather_range(const GatherArgs& g, const RowPlan& plan, const T* w, T* out, int64_t begin, int64_t end) {
  const int64_t row_len = plan.row_len;
  const int64_t src_row_len = g.cols * g.inner;
  const int64_t* o = g.out_host.defined() ? g.out_host.const_data_ptr<int64_t>() : nullptr;
  int64_t r = begin / row_len;
  int64_t c0 = begin - r * row_len;
  while (r * row_len + c0 < end) {
    const int64_t c1 = std::min(row_len, end - r * row_len);
    copy_row(plan, w + (o != nullptr ? o[r] : r) * src_row_len, out + r * row_len, c0, c1);
    ++r;
    c0 = 0;
  }
}

// Smallest p in [lo, hi) with pred(p), for pred false...false true...true; hi if none.
template <typename Pred>
int64_t first_position(int64_t lo, int64_t hi, Pred pred) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

at::Tensor channel_gather_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                              const std::optional<at::Tensor>& in_index) {
  const GatherArgs g = check_gather_args("channel_gather", weight, out_index, in_index, false);
  at::Tensor out = at::empty(g.out_sizes, weight.options());
  const int64_t n = g.out_numel();
  if (n == 0) return out;
  const RowPlan plan = make_row_plan(g);
  dispatch_by_element_size("channel_gather", weight, [&](auto tag) {
    using T = decltype(tag);
    const T* w = static_cast<const T*>(weight.const_data_ptr());
    T* d = static_cast<T*>(out.mutable_data_ptr());
    // Ranges of output positions: whole rows, or pieces of rows when there are few long ones.
    at::parallel_for(0, n, gather_grain(),
                     [&](int64_t begin, int64_t end) { gather_range(g, plan, w, d, begin, end); });
  });
  return out;
}

// In place. With strictly increasing indices, the element landing at output position p comes from
// source_position(p) >= p, and gap(p) = source_position(p) - p never decreases with p
// (channel_gather_args.h). So:
//   * positions [0, first_moved) have gap 0 and stay where they are;
//   * a front-to-back pass is always safe: each position is read before anything writes it;
//   * a wave [s, e) with e <= s + gap(s) = source_position(s) writes only below e and reads only
//     at or above source_position(s) >= e, and everything it reads is still unwritten (earlier
//     waves wrote below s), so the wave can run in any order, i.e. in parallel.
// The pass goes front to back on one thread while the gap is small, then in waves of
// gap(s) >= 2 * gather_grain() elements (two tasks' worth; shorter waves cost more in fork/join
// than they save): at most n / (2 * gather_grain()) + 1 parallel_for calls.
at::Tensor channel_gather__cpu(const at::Tensor& weight, const std::optional<at::Tensor>& out_index,
                               const std::optional<at::Tensor>& in_index) {
  const GatherArgs g = check_gather_args("channel_gather_", weight, out_index, in_index, true);
  const int64_t n = g.out_numel();
  if (n > 0) {
    const RowPlan plan = make_row_plan(g);
    const auto gap = [&](int64_t p) { return g.source_position(p) - p; };
    const int64_t first_moved = first_position(0, n, [&](int64_t p) { return gap(p) > 0; });
    const int64_t parallel_from =
        at::get_num_threads() > 1
            ? first_position(first_moved, n, [&](int64_t p) { return gap(p) >= 2 * gather_grain(); })
            : n;
    dispatch_by_element_size("channel_gather_", weight, [&](auto tag) {
      using T = decltype(tag);
      T* w = static_cast<T*>(weight.mutable_data_ptr());
      gather_range(g, plan, w, w, first_moved, parallel_from);
      for (int64_t s = parallel_from; s < n;) {
        const int64_t e = std::min(n, s + gap(s));
        at::parallel_for(s, e, gather_grain(), [&](int64_t begin, int64_t end) {
          gather_range(g, plan, w, w, begin, end);
        });
        s = e;
      }
    });
  }
  weight.resize_(g.out_sizes);
  return weight;
}

}  // namespace

TORCH_LIBRARY_IMPL(slimcore, CPU, m) {
  m.impl("channel_gather", &channel_gather_cpu);
  m.impl("channel_gather_", &channel_gather__cpu);
}

}  // namespace slimcore
