// cuemu stand-in for ATen/cuda/CUDAContext.h: a default stream and the
// properties of an H100-class device (132 SMs).
#pragma once
#include <ATen/ATen.h>

#include "c10/cuda/CUDAGuard.h"

namespace at::cuda {

struct CUDAStream {
  operator void*() const { return nullptr; }
  void* stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }

struct cudaDeviceProp {
  int multiProcessorCount = 132;
  int maxThreadsPerBlock = 1024;
  int maxThreadsPerMultiProcessor = 2048;
  int warpSize = 32;
  size_t sharedMemPerBlock = 48 * 1024;
  int maxGridSize[3] = {2147483647, 65535, 65535};
};
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp prop;
  return &prop;
}

}  // namespace at::cuda
