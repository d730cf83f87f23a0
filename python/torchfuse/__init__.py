"""torchfuse: fused C++/CUDA kernels for PyTorch layers.

    import torchfuse
    y = torchfuse.functional.rms_norm(x, (4096,), weight)
    model = torchfuse.convert(model)      # swap in the fused modules
    print(torchfuse.info())
"""

__version__ = "0.1.0"

from . import _ops  # noqa: E402,F401,I001  (loads the extension first)
from . import functional, nn, reference  # noqa: E402
from .convert import convert  # noqa: E402
from .info import info  # noqa: E402

__all__ = ["functional", "nn", "reference", "convert", "info", "__version__"]
