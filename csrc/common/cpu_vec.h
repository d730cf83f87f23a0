// CPU vector helpers over at::vec::Vectorized (what ATen's own kernels use).
//
// Every kernel computes in the accumulate type A = at::opmath_type<T> (float
// for float/half/bfloat16, double for double). VecIO<T> moves kStep elements
// of T between memory and a pair of A-vectors, converting reduced-precision
// types on the way, with partial (tail) variants; AccIO does the same for
// arrays already in the accumulate type.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

// The element moves below sit in every kernel's inner loop: forced inline so
// that the compiler keeps the caller's vectors in registers. Left to itself,
// GCC 12 outlined VecIO<BFloat16>::store in group_norm's channels_last
// elementwise kernel (seen in perf), and the call spilled the caller's
// coefficient vectors to the stack (zeroed with rep stos on every step).
//
// TF_INLINE_LAMBDA, after a lambda's parameter list, does the same for the
// lambdas the kernels pass to for_each_step and their local step helpers.
// Without it GCC 12 decides per translation unit: in builds with an
// experimental kernel added to group_norm_cpu.cpp, the untouched float32
// channels_last backward ran at 1.45-1.6 ms against 0.98 (2x320x64x64), and
// perf of one of them showed its elementwise step out of line, the step's
// coefficient arrays zeroed on the stack (rep stos) on every call, that pass
// 0.49 -> 1.0 ms. The committed build already had 34 such lambdas out of
// line (nm), the same step among them for other types.
#if defined(__GNUC__) || defined(__clang__)
#define TF_ALWAYS_INLINE inline __attribute__((always_inline))
#define TF_INLINE_LAMBDA __attribute__((always_inline))
#else
#define TF_ALWAYS_INLINE inline
#define TF_INLINE_LAMBDA
#endif

namespace torchfuse::cpu {

// float -> bfloat16 for 32 elements in one instruction (vcvtne2ps2bf16) on
// CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids and later; Zen 4 and
// later), where ATen's conversion, written for AVX-512F, takes about 16
// instructions, all on the two vector ports that the kernels' arithmetic
// needs too. The instruction rounds to nearest even as ATen does, but
// flushes float32 denormals to zero and keeps NaN payloads (ATen: 0xffff):
// checked over all 2^32 inputs on a Sapphire Rapids Xeon, every other input
// gives the same bits. Vectors holding a denormal or a NaN therefore take
// ATen's path (one vfpclassps per 16 elements decides), so the stored bits
// are those of ATen's conversion on every input. Inline assembly: the
// library is compiled for AVX-512F, and a function compiled for avx512bf16
// could not be inlined into the kernels. The CPU is checked once, at load.
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
#define TORCHFUSE_HW_BF16 1
inline const bool kHasAvx512Bf16 = __builtin_cpu_supports("avx512bf16");

#endif

// Whether bfloat16 stores take that instruction here (torchfuse.info()).
inline bool bf16_instruction() {
#ifdef TORCHFUSE_HW_BF16
  return kHasAvx512Bf16;
#else
  return false;
#endif
}

// (a, b) in T, a in the low half: ATen's conversion, or for bfloat16 the
// instruction above where it gives the same bits.
template <typename T>
TF_ALWAYS_INLINE at::vec::Vectorized<T> to_reduced(const at::vec::Vectorized<float>& a,
                                                   const at::vec::Vectorized<float>& b) {
#ifdef TORCHFUSE_HW_BF16
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512 lo = a, hi = b;
    constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // QNaN, denormal, SNaN
    if (kHasAvx512Bf16 && (_mm512_fpclass_ps_mask(lo, kNanOrDenormal) |
                           _mm512_fpclass_ps_mask(hi, kNanOrDenormal)) == 0) {
      __m512i r;
      asm("vcvtne2ps2bf16 %1, %2, %0" : "=v"(r) : "v"(lo), "v"(hi));
      return at::vec::Vectorized<T>(r);
    }
  }
#endif
  return at::vec::convert_from_float<T>(a, b);
}

template <typename T>
struct VecIO {
  using A = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<A>;
  static constexpr int64_t kSize = AVec::size();
  // Elements moved per step: two accumulate vectors, which for half/bfloat16
  // is exactly one full-width Vectorized<T> (one load, one conversion).
  static constexpr int64_t kStep = 2 * kSize;
  static constexpr bool kReduced = !std::is_same_v<T, A>;

  TF_ALWAYS_INLINE static void load(const T* p, AVec& a, AVec& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    } else {
      a = AVec::loadu(p);
      b = AVec::loadu(p + kSize);
    }
  }
  // The first n (<= kStep) elements; the rest read as zero.
  TF_ALWAYS_INLINE static void load(const T* p, int64_t n, AVec& a, AVec& b) {
    if (n == kStep) {
      load(p, a, b);
    } else if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, n));
    } else {
      a = AVec::loadu(p, std::min(n, kSize));
      b = n > kSize ? AVec::loadu(p + kSize, n - kSize) : AVec(A(0));
    }
  }
  TF_ALWAYS_INLINE static void store(T* p, const AVec& a, const AVec& b) {
    if constexpr (kReduced) {
      to_reduced<T>(a, b).store(p);
    } else {
      a.store(p);
      b.store(p + kSize);
    }
  }
  TF_ALWAYS_INLINE static void store(T* p, const AVec& a, const AVec& b, int64_t n) {
    if (n == kStep) {
      store(p, a, b);
    } else if constexpr (kReduced) {
      to_reduced<T>(a, b).store(p, n);
    } else {
      a.store(p, std::min(n, kSize));
      if (n > kSize) b.store(p + kSize, n - kSize);
    }
  }
  // Rounds a pair through T, as a store followed by a load would.
  TF_ALWAYS_INLINE static void round(AVec& a, AVec& b) {
    if constexpr (kReduced) {
      std::tie(a, b) = at::vec::convert_to_float<T>(to_reduced<T>(a, b));
    }
  }
};

// Accumulate-type arrays (weights, accumulators) in the same steps.
template <typename A>
struct AccIO {
  using AVec = at::vec::Vectorized<A>;
  static constexpr int64_t kSize = AVec::size();
  TF_ALWAYS_INLINE static void load(const A* p, int64_t n, AVec& a, AVec& b) {
    if (n == 2 * kSize) {
      a = AVec::loadu(p);
      b = AVec::loadu(p + kSize);
    } else {
      a = AVec::loadu(p, std::min(n, kSize));
      b = n > kSize ? AVec::loadu(p + kSize, n - kSize) : AVec(A(0));
    }
  }
  TF_ALWAYS_INLINE static void store(A* p, const AVec& a, const AVec& b, int64_t n) {
    if (n == 2 * kSize) {
      a.store(p);
      b.store(p + kSize);
    } else {
      a.store(p, std::min(n, kSize));
      if (n > kSize) b.store(p + kSize, n - kSize);
    }
  }
};

// Applies f(j, count) over [0, n) in steps of `step`, the last one partial.
template <int64_t step, typename F>
TF_ALWAYS_INLINE void for_each_step(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + step <= n; j += step) f(j, step);
  if (j < n) f(j, n - j);
}

// exp(x), always inline (GCC 12 outlines ATen's exp_u20 from large kernels,
// a call per vector with the caller's registers spilled: in group_norm's
// bfloat16 channels_last SiLU backward it took 17% of the time, in a
// function of its own). float on AVX-512: x = (n + f) ln2, n an integer,
// |f| <= 1/2 (f from a two-part log2(e), exact to float precision for |x|
// up to 104), 2^f by a degree-5 polynomial fitted here for relative error
// (2.7e-7 over [-88, 88] measured in float, where exp_u20 allows 20 ulp),
// 2^n applied by vscalefps, which saturates to inf and 0 by itself. x is
// clamped to [-104, 100] first (so -inf gives 0 and +inf gives inf rather
// than NaN); NaN stays NaN. Other types and ISAs: ATen's exp_u20.
template <typename V>
TF_ALWAYS_INLINE V exp_inline(const V& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>) {
    // vminps / vmaxps return their second operand when either is NaN.
    __m512 v = _mm512_min_ps(_mm512_set1_ps(100.f), x);
    v = _mm512_max_ps(_mm512_set1_ps(-104.f), v);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // log2(e) = 1.44269502163f (exact in float) + 1.925963e-8
    __m512 f = _mm512_fmsub_ps(v, _mm512_set1_ps(1.44269502163f), n);
    f = _mm512_fmadd_ps(v, _mm512_set1_ps(1.925963033500011e-8f), f);
    __m512 p = _mm512_set1_ps(1.327647129073739e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092088699e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
    return V(_mm512_scalef_ps(p, n));
  }
#endif
  return x.exp_u20();
}

// Horizontal sum of one vector.
template <typename AVec>
inline auto reduce_sum(const AVec& v) {
  using A = typename AVec::value_type;
  return at::vec::vec_reduce_all<A>([](AVec& u, AVec& w) { return u + w; }, v);
}

// sum(a[j] * b[j]) over n elements (a == b for a sum of squares), with four
// independent accumulators (which also shortens float32 rounding chains).
template <typename T>
at::opmath_type<T> dot(const T* a, const T* b, int64_t n) {
  using IO = VecIO<T>;
  using AVec = typename IO::AVec;
  constexpr int64_t S = IO::kStep;
  AVec s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 2 * S <= n; j += 2 * S) {
    AVec a0, a1, a2, a3, b0, b1, b2, b3;
    IO::load(a + j, a0, a1);
    IO::load(a + j + S, a2, a3);
    IO::load(b + j, b0, b1);
    IO::load(b + j + S, b2, b3);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
    s2 = at::vec::fmadd(a2, b2, s2);
    s3 = at::vec::fmadd(a3, b3, s3);
  }
  for_each_step<S>(n - j, [&](int64_t k, int64_t c) TF_INLINE_LAMBDA {
    AVec a0, a1, b0, b1;
    IO::load(a + j + k, c, a0, a1);
    IO::load(b + j + k, c, b0, b1);
    s0 = at::vec::fmadd(a0, b0, s0);
    s1 = at::vec::fmadd(a1, b1, s1);
  });
  return reduce_sum((s0 + s1) + (s2 + s3));
}

// sum(a[j] * w[j] * b[j]) over n elements; w (in the accumulate type) may be
// nullptr for a plain dot. The weighted dot product of a norm's backward.
template <typename T>
at::opmath_type<T> dot(const T* a, const T* b, const at::opmath_type<T>* w, int64_t n) {
  if (w == nullptr) return dot(a, b, n);
  using IO = VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  AVec s0(0), s1(0);
  for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    AVec a0, a1, b0, b1, w0, w1;
    IO::load(a + j, c, a0, a1);
    IO::load(b + j, c, b0, b1);
    AccIO<A>::load(w + j, c, w0, w1);
    s0 = at::vec::fmadd(a0 * w0, b0, s0);
    s1 = at::vec::fmadd(a1 * w1, b1, s1);
  });
  return reduce_sum(s0 + s1);
}

// out[j] = src[j] * r * w[j] over n elements (w in the accumulate type, may
// be nullptr: 1): the store of a row norm.
template <typename T>
void scale_row(const T* src, T* out, int64_t n, at::opmath_type<T> r,
               const at::opmath_type<T>* w) {
  using IO = VecIO<T>;
  using A = at::opmath_type<T>;
  using AVec = typename IO::AVec;
  const AVec vr(r);
  for_each_step<IO::kStep>(n, [&](int64_t j, int64_t c) TF_INLINE_LAMBDA {
    AVec a, b;
    IO::load(src + j, c, a, b);
    a = a * vr;
    b = b * vr;
    if (w != nullptr) {
      AVec wa, wb;
      AccIO<A>::load(w + j, c, wa, wb);
      a = a * wa;
      b = b * wb;
    }
    IO::store(out + j, a, b, c);
  });
}

}  // namespace torchfuse::cpu
