"""Image models: the only package that imports torch, diffusers and OpenCV.

`from models import Step1XMedium` is the in-process API; workers use `models.profiles.Registry`.
"""

import logging

# Importing diffusers' pipelines makes transformers warn, once per image processor, that optional
# torchvision is absent and it falls back to PIL: noise in every worker's log, nothing to act on.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

from models.step1x import Output, Step1XMedium  # noqa: E402

__all__ = ["Output", "Step1XMedium"]
