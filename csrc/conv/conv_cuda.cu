// 2-D convolution: the CUDA passes that are not GEMMs (the GEMMs are cuBLAS,
// through at::baddbmm / at::addmm in conv.cpp) and the CUDA registration.
//
// im2col, col2im, depthwise forward and depthwise input gradient: one thread
// per element written (grid-stride loops), each gathering its taps in a
// fixed order (no atomics: deterministic). Depthwise weight gradient: one
// block per (output channel, tap), its threads striding over the N*OH*OW
// products, then the block's fixed-shape reduction.
#include "conv.h"

#include "../common/cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <torch/library.h>

namespace torchfuse::conv {
namespace {

using namespace torchfuse::cuda;

constexpr int kBlock = 256;

// Kernel-side copy of the geometry (plain values; Geometry's methods are
// host-only).
struct Geo {
  int64_t N, Cin, H, W, Cout, KH, KW, OH, OW, sh, sw, pt, pl, dh, dw, cin_g, shuffle_m, shuffle;
};

Geo geo_of(const Geometry& g) {
  return {g.N, g.Cin, g.H, g.W, g.Cout, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.pt, g.pl,
          g.dh, g.dw, g.cin_g(), g.Cout / g.shuffle, g.shuffle};
}

__device__ __forceinline__ int64_t pos_of(const Geo& g, int64_t c) {
  int64_t q, r;
  divmod(c, g.shuffle_m, q, r);
  return r * g.shuffle + q;
}

unsigned grid_for(int64_t n) {
  const int64_t cap = static_cast<int64_t>(num_sms()) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(ceil_div(n, kBlock), cap)));
}

template <typename T, typename C>
__global__ void im2col_kernel(const T* __restrict__ x, C* __restrict__ col, Geo g, int64_t nb,
                              int64_t ns, int64_t rs, int64_t extra) {
  const int64_t kk = g.KH * g.KW, L = g.OH * g.OW, total = nb * g.Cin * kk * L;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    int64_t rowi, l, n, r, c, k, i, j, oh, ow;
    divmod(e, L, rowi, l);
    divmod(rowi, g.Cin * kk, n, r);
    divmod(r, kk, c, k);
    divmod(k, g.KW, i, j);
    divmod(l, g.OW, oh, ow);
    const int64_t ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
    C v = C(0);
    if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
      v = static_cast<C>(x[((n * g.Cin + c) * g.H + ih) * g.W + iw]);
    }
    col[n * ns + (r + (c / g.cin_g) * extra) * rs + l] = v;
  }
}

template <typename T>
__global__ void col2im_kernel(const T* __restrict__ col, T* __restrict__ dx, Geo g, int64_t nb) {
  using A = at::opmath_type<T>;
  const int64_t kk = g.KH * g.KW, L = g.OH * g.OW, total = nb * g.Cin * g.H * g.W;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    int64_t nch, w, nc, h;
    divmod(e, g.W, nch, w);
    divmod(nch, g.H, nc, h);
    const T* cn = col + nc * kk * L;  // (n, c) rows start at (n Cin + c) kk
    A acc = 0;
    for (int64_t i = 0; i < g.KH; ++i) {
      int64_t oh, ow;
      if (!output_index(h + g.pt - i * g.dh, g.sh, g.OH, oh)) continue;
      for (int64_t j = 0; j < g.KW; ++j) {
        if (!output_index(w + g.pl - j * g.dw, g.sw, g.OW, ow)) continue;
        acc += static_cast<A>(cn[(i * g.KW + j) * L + oh * g.OW + ow]);
      }
    }
    dx[e] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void dw_forward_kernel(const T* __restrict__ x, const T* __restrict__ wt,
                                  const T* __restrict__ bias, T* __restrict__ out, Geo g) {
  using A = at::opmath_type<T>;
  const int64_t mult = g.Cout / g.Cin, total = g.N * g.Cout * g.OH * g.OW;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    int64_t rest, ow, nc, oh, n, c;
    divmod(e, g.OW, rest, ow);
    divmod(rest, g.OH, nc, oh);
    divmod(nc, g.Cout, n, c);
    const T* xc = x + (n * g.Cin + c / mult) * g.H * g.W;
    const T* wc = wt + c * g.KH * g.KW;
    A acc = bias != nullptr ? static_cast<A>(bias[c]) : A(0);
    for (int64_t i = 0; i < g.KH; ++i) {
      const int64_t ih = oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      for (int64_t j = 0; j < g.KW; ++j) {
        const int64_t iw = ow * g.sw - g.pl + j * g.dw;
        if (iw < 0 || iw >= g.W) continue;
        acc += static_cast<A>(wc[i * g.KW + j]) * static_cast<A>(xc[ih * g.W + iw]);
      }
    }
    out[((n * g.Cout + pos_of(g, c)) * g.OH + oh) * g.OW + ow] = static_cast<T>(acc);
  }
}

template <typename T>
__global__ void dw_dinput_kernel(const T* __restrict__ dy, const T* __restrict__ wt,
                                 T* __restrict__ dx, Geo g) {
  using A = at::opmath_type<T>;
  const int64_t mult = g.Cout / g.Cin, total = g.N * g.Cin * g.H * g.W;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    int64_t rest, w, nc, h, n, ci;
    divmod(e, g.W, rest, w);
    divmod(rest, g.H, nc, h);
    divmod(nc, g.Cin, n, ci);
    A acc = 0;
    for (int64_t m = 0; m < mult; ++m) {
      const int64_t c = ci * mult + m;
      const T* dyc = dy + (n * g.Cout + pos_of(g, c)) * g.OH * g.OW;
      const T* wc = wt + c * g.KH * g.KW;
      for (int64_t i = 0; i < g.KH; ++i) {
        int64_t oh, ow;
        if (!output_index(h + g.pt - i * g.dh, g.sh, g.OH, oh)) continue;
        for (int64_t j = 0; j < g.KW; ++j) {
          if (!output_index(w + g.pl - j * g.dw, g.sw, g.OW, ow)) continue;
          acc += static_cast<A>(wc[i * g.KW + j]) * static_cast<A>(dyc[oh * g.OW + ow]);
        }
      }
    }
    dx[e] = static_cast<T>(acc);
  }
}

// grid (Cout * KH * KW); block kBlock threads.
template <typename T>
__global__ void dw_dweight_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                  at::opmath_type<T>* __restrict__ dwt, Geo g) {
  using A = at::opmath_type<T>;
  __shared__ A smem[32];
  const int64_t kk = g.KH * g.KW, mult = g.Cout / g.Cin, L = g.OH * g.OW;
  for (int64_t b = blockIdx.x; b < g.Cout * kk; b += gridDim.x) {
    const int64_t c = b / kk, k = b % kk, i = k / g.KW, j = k % g.KW;
    const int64_t pc = pos_of(g, c);
    A acc = 0;
    for (int64_t e = threadIdx.x; e < g.N * L; e += blockDim.x) {
      int64_t n, l, oh, ow;
      divmod(e, L, n, l);
      divmod(l, g.OW, oh, ow);
      const int64_t ih = oh * g.sh - g.pt + i * g.dh, iw = ow * g.sw - g.pl + j * g.dw;
      if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
      acc += static_cast<A>(dy[(n * g.Cout + pc) * L + l]) *
          static_cast<A>(x[((n * g.Cin + c / mult) * g.H + ih) * g.W + iw]);
    }
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) dwt[b] = acc;
  }
}

void im2col_cuda(const Im2colParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  const int64_t total = p.nb * p.g.Cin * p.g.kk() * p.g.L();
  if (total == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "im2col_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    if (p.col.scalar_type() == p.x.scalar_type()) {
      im2col_kernel<scalar_t, scalar_t><<<grid_for(total), kBlock, 0, stream>>>(
          p.x.const_data_ptr<scalar_t>(), p.col.mutable_data_ptr<scalar_t>(), geo_of(p.g), p.nb,
          p.ns, p.rs, p.extra);
    } else {
      TORCH_CHECK(p.col.scalar_type() == c10::CppTypeToScalarType<A>::value,
                  "conv2d: unexpected im2col dtype ", p.col.scalar_type());
      im2col_kernel<scalar_t, A><<<grid_for(total), kBlock, 0, stream>>>(
          p.x.const_data_ptr<scalar_t>(), p.col.mutable_data_ptr<A>(), geo_of(p.g), p.nb, p.ns,
          p.rs, p.extra);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const Col2imParams& p) {
  const c10::cuda::CUDAGuard guard(p.dx.device());
  const int64_t total = p.nb * p.g.Cin * p.g.H * p.g.W;
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dx.scalar_type(), "col2im_cuda", [&] {
    col2im_kernel<scalar_t><<<grid_for(total), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.col.const_data_ptr<scalar_t>(), p.dx.mutable_data_ptr<scalar_t>(), geo_of(p.g), p.nb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dw_forward_cuda(const DirectParams& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  const int64_t total = p.out.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(),
                                  "conv2d_depthwise_cuda", [&] {
    dw_forward_kernel<scalar_t><<<grid_for(total), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.x.const_data_ptr<scalar_t>(), p.w.const_data_ptr<scalar_t>(),
        p.bias.defined() ? p.bias.const_data_ptr<scalar_t>() : nullptr,
        p.out.mutable_data_ptr<scalar_t>(), geo_of(p.g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dw_dinput_cuda(const DirectParams& p) {
  const c10::cuda::CUDAGuard guard(p.dy.device());
  const int64_t total = p.dx.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_depthwise_dinput_cuda", [&] {
    dw_dinput_kernel<scalar_t><<<grid_for(total), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.dy.const_data_ptr<scalar_t>(), p.w.const_data_ptr<scalar_t>(),
        p.dx.mutable_data_ptr<scalar_t>(), geo_of(p.g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dw_dweight_cuda(const DirectParams& p) {
  const c10::cuda::CUDAGuard guard(p.dy.device());
  const int64_t blocks = p.g.Cout * p.g.kk();
  if (blocks == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dy.scalar_type(),
                                  "conv2d_depthwise_dweight_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(blocks, 65535));
    dw_dweight_kernel<scalar_t><<<grid, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        p.dy.const_data_ptr<scalar_t>(), p.x.const_data_ptr<scalar_t>(),
        p.dw.mutable_data_ptr<A>(), geo_of(p.g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// depthwise, at most 8 outputs per group (the kernels' per-thread loops)
bool use_direct_cuda(const Geometry& g, at::ScalarType, bool, bool) {
  return g.groups > 1 && g.cin_g() == 1 && g.cout_g() <= 8;
}

// cuDNN computes every weight gradient of the convolutions given to it (the
// CPU's exception was measured against oneDNN only)
bool own_dweight_cuda(const Geometry&, at::ScalarType) {
  return false;
}

const Launchers kCuda{im2col_cuda,    col2im_cuda,     use_direct_cuda, own_dweight_cuda,
                      dw_forward_cuda, dw_dinput_cuda, dw_dweight_cuda, nullptr,
                      nullptr,         nullptr};

}  // namespace

TORCH_LIBRARY_IMPL(torchfuse, CUDA, m) {
  m.impl("conv2d", &conv2d_op<kCuda>);
  m.impl("conv2d_backward", &conv2d_backward_op<kCuda>);
}

}  // namespace torchfuse::conv
