"""What the command line prints: mu_fast's own output, not the libraries' progress bars and warnings.

``quiet_third_party()`` turns off transformers' / huggingface_hub's progress bars ("Loading weights", "Writing
model shards"), their info logs, and the deprecation / torch.jit / library warnings that are not the user's
business, and prints mu_fast's own warnings as one line (``mu-fast: warning: ...``). It returns a function that
restores everything, so a command run inside another program (or a test) leaves no trace.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

# Libraries whose warnings a command-line user cannot act on.
QUIET_MODULES = ("transformers", "torch", "peft", "accelerate", "huggingface_hub", "bitsandbytes", "tokenizers",
                 "safetensors", "triton", "matplotlib")
_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    text = " ".join(str(message).split())
    print(f"mu-fast: warning: {text}", file=file or sys.stderr)


def quiet_third_party() -> Callable[[], None]:
    """Silence third-party progress bars, logs and warnings; return the function that restores them."""
    saved_env = {k: os.environ.get(k) for k in _ENV}
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    filters = warnings.filters[:]
    show = warnings.showwarning
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    for module in QUIET_MODULES:
        warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
    warnings.showwarning = _show_warning
    restore_libs = _quiet_loaded_libraries()

    def restore() -> None:
        warnings.filters[:] = filters
        warnings.showwarning = show
        restore_libs()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


def _quiet_loaded_libraries() -> Callable[[], None]:
    """The environment variables act at import time; libraries already imported are switched off directly."""
    undo: list[Callable[[], None]] = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        undo.append(lambda: (hf_logging.set_verbosity(level),
                             hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()))
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils as hub_utils

        bars = not hub_utils.are_progress_bars_disabled()
        hub_utils.disable_progress_bars()
        undo.append(lambda: hub_utils.enable_progress_bars() if bars else None)

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore
