// How the CPU kernels split work over threads: by estimated time, not by element count.
//
// Every task of an at::parallel_for beyond the first waits for a thread of its own. On a busy
// machine (training: data-loader workers keep every core busy) that thread may be descheduled,
// and the caller waits for it: a 20 us penalty step split in two at ATen's elementwise grain
// (32,768 elements) took 1.5 ms with the other core busy. So each task gets at least
// min_task_ns() of estimated work, and an op cheaper than two such tasks runs on the calling
// thread. The per-element costs (penalty_cost.h, the BN and gather kernels) are rough
// single-core estimates from the benchmarks' times on a 2-core Xeon; they only need to be right
// to a factor of ~2, since they set a minimum task size, not a schedule.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace slimcore {
namespace cpu {

// Default minimum work per task, in microseconds; SLIMCORE_CPU_MIN_TASK_US overrides it (read on
// first use; the tests set it small so that their small tensors still run the multi-thread path).
constexpr double kDefaultMinTaskUs = 50.0;

inline double min_task_ns() {
  static const double ns = [] {
    const char* text = std::getenv("SLIMCORE_CPU_MIN_TASK_US");
    if (text != nullptr && *text != '\0') {
      char* end = nullptr;
      const double us = std::strtod(text, &end);
      if (end != text && *end == '\0' && std::isfinite(us) && us >= 0.0) return us * 1e3;
    }
    return kDefaultMinTaskUs * 1e3;  // unset or unparsable: the default
  }();
  return ns;
}

// Elements per task for work that costs ns_per_element each (at least 1).
inline int64_t grain_for(double ns_per_element) {
  const double elements = std::ceil(min_task_ns() / std::max(ns_per_element, 1e-3));
  return static_cast<int64_t>(std::clamp(elements, 1.0, 1e15));
}

}  // namespace cpu
}  // namespace slimcore
