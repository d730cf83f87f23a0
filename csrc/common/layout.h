// Memory-format rule shared by the ops whose output keeps the input's layout.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchfuse {

// channels_last (4-D) or channels_last_3d (5-D) when the input is in that
// format and not also contiguous (C == 1, or spatial size 1), else
// contiguous: the format torch's own ops return for such an input. The
// Python fakes apply the same rule (torchfuse.reference.kept_format).
inline at::MemoryFormat kept_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace torchfuse
