// Vector loads and stores shared by the per-ISA CPU kernels (batch_norm_kernel.h,
// channel_affine_kernel.h): GCC vector types of SLIMCORE_VEC_BYTES bytes, loads that convert
// storage values to the math type and stores that convert back.
//
// Included by a kernel header inside its per-ISA namespace, after its `#pragma GCC target`, so
// these helpers are compiled for that ISA like the kernels that inline them (a baseline-ISA helper
// returning a 32-byte vector would have a different ABI). The includer defines SLIMCORE_VEC_BYTES
// (32 for the AVX2/AVX-512 copies, 16 otherwise) and includes <cstring>, <type_traits> and c10's
// BFloat16 first. (Included once per kernel copy: no include guard.)

template <typename acc_t>
struct VecOf {
  typedef acc_t type __attribute__((vector_size(SLIMCORE_VEC_BYTES)));
};
template <typename acc_t>
using vec_t = typename VecOf<acc_t>::type;
// Lanes of a vec_t<acc_t>.
template <typename acc_t>
constexpr int64_t kLanes = SLIMCORE_VEC_BYTES / sizeof(acc_t);

// kLanes values from p, converted to acc_t (GCC turns the loop into one vector load/convert).
template <typename scalar_t, typename acc_t>
inline vec_t<acc_t> vec_load(const scalar_t* p) {
  vec_t<acc_t> v;
  for (int64_t l = 0; l < kLanes<acc_t>; ++l) v[l] = static_cast<acc_t>(p[l]);
  return v;
}

// kLanes values to p, converted from acc_t.
template <typename scalar_t, typename acc_t>
inline void vec_store(scalar_t* p, vec_t<acc_t> v) {
  for (int64_t l = 0; l < kLanes<acc_t>; ++l) p[l] = static_cast<scalar_t>(v[l]);
}

// bfloat16: c10's round-to-nearest-even (NaN -> 0x7fc0) on whole vectors; GCC scalarises the
// generic loop above (a NaN test per lane).
template <>
inline void vec_store<c10::BFloat16, float>(c10::BFloat16* p, vec_t<float> v) {
  typedef uint32_t u32v __attribute__((vector_size(SLIMCORE_VEC_BYTES)));
  typedef uint16_t u16v __attribute__((vector_size(SLIMCORE_VEC_BYTES / 2)));
  u32v u;
  std::memcpy(&u, &v, sizeof(u));
  u32v r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? u32v{} + 0x7fc0u : r;
  const u16v h = __builtin_convertvector(r, u16v);
  std::memcpy(p, &h, sizeof(h));
}

// Storage types whose vector loads and stores GCC compiles to a few instructions (float16's
// conversions are bit manipulations that plain loops vectorise better).
template <typename scalar_t>
constexpr bool kVectorIO = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double> ||
                           std::is_same_v<scalar_t, c10::BFloat16>;
