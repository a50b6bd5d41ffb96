"""mu_fast: fast mechanistic unlearning and editing of language models.

Importing this package is cheap: it touches no CUDA and imports no transformers. Submodules are
imported on use (``mu_fast.masks``, ``mu_fast.localize``, ``mu_fast.optim``, ...).
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

from mu_fast._ext import backends


class _HubKernelNotice(_logging.Filter):
    """bitsandbytes, on CPUs with AVX512-BF16, logs at import that it could not fetch an optional 4-bit CPU kernel
    from the Hugging Face hub (``kernels-community``); mu_fast never fetches kernels from a hub and bitsandbytes
    falls back to its own, so the notice means nothing to a user. Only that message is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNotice())

__all__ = ["__version__", "backends"]
