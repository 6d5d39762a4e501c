"""Everything that touches models. Never imports gradio."""

import logging
import os

# Library chatter (torchvision fallbacks, deprecation notes) is not for the person using Troupe; errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# diffusers imports bitsandbytes eagerly; from 0.50 on, on a CPU with AVX-512 BF16, bitsandbytes then tries to fetch an
# optional CPU 4-bit kernel from the Hub through the `kernels` package and warns when it cannot. Troupe quantizes only
# on CUDA and runs offline, and bitsandbytes falls back to its own kernel, so the warning says nothing to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# diffusers also imports torchao whenever it is installed (the CPU quantization backend, engines/models.py); torchao
# then reports the CUDA-only kernels it could not load and newer torch the enum types torchao registers. Int8
# weight-only needs none of them.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
