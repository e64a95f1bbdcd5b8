"""Image models: the only package that imports torch, diffusers and OpenCV.

`from models import Step1XMedium` is the in-process API; workers use `models.profiles.Registry`.
"""

from models.step1x import Output, Step1XMedium

__all__ = ["Output", "Step1XMedium"]
