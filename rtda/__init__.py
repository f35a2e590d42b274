"""rtda: real-time semantic segmentation with unsupervised domain adaptation (GTA5 -> Cityscapes)."""

import os

# albumentations checks PyPI for updates on import unless told not to; rtda never opens a
# connection the user did not ask for, so this is set before any submodule imports it.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
