"""Everything that touches models. Never imports gradio."""

import os

# Library chatter (torchvision fallbacks, deprecation notes) is not for the person using Troupe; errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
