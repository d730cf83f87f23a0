// CPU vector helpers over at::vec::Vectorized (what ATen's own kernels use).
//
// Every kernel computes in the accumulate type A = at::opmath_type<T> (float
// for float/half/bfloat16, double for double). VecIO<T> moves one A-vector's
// worth of T elements (AVec::size()) between memory and registers, converting
// reduced-precision types on the way, with partial (tail) variants.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace torchfuse::cpu {

template <typename T>
struct VecIO {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  static constexpr int64_t kSize = AVec::size();
  static constexpr bool kReduced = !std::is_same_v<T, A>;

  static inline AVec load(const T* p) {
    if constexpr (kReduced) {
      AVec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    } else {
      return AVec::loadu(p);
    }
  }
  static inline AVec load(const T* p, int64_t n) {
    if constexpr (kReduced) {
      T buf[kSize] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
      return load(buf);
    } else {
      return AVec::loadu(p, n);
    }
  }
  static inline void store(T* p, const AVec& v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, kSize);
    } else {
      v.store(p);
    }
  }
  static inline void store(T* p, const AVec& v, int64_t n) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, n);
    } else {
      v.store(p, n);
    }
  }
};

// Rounds an accumulate-type value through T (what a store then load gives).
template <typename T>
inline at::opmath_type<T> round_to(at::opmath_type<T> v) {
  return static_cast<at::opmath_type<T>>(static_cast<T>(v));
}

}  // namespace torchfuse::cpu
