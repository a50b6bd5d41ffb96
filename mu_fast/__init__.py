"""mu_fast: fast mechanistic unlearning and editing of language models.

Importing this package is cheap: it touches no CUDA and imports no transformers. Submodules are
imported on use (``mu_fast.masks``, ``mu_fast.localize``, ``mu_fast.optim``, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"

from mu_fast._ext import backends

__all__ = ["__version__", "backends"]
