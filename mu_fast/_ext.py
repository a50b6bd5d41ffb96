"""Loading of the optional compiled extension ``mu_fast._C`` and of Triton, with reasons when absent."""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REBUILD_HINT = "rebuild with `MU_FAST_BUILD_EXT=1 pip install --no-build-isolation -e .`"


@lru_cache(maxsize=1)
def load_extension() -> tuple[ModuleType | None, str]:
    """Import ``mu_fast._C`` once. Returns (module or None, reason it is missing or "loaded")."""
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        module = importlib.import_module("mu_fast._C")
    except ImportError as err:
        return None, f"mu_fast._C is not built or failed to load ({err}); {REBUILD_HINT}"
    return module, "loaded"


def extension_has_cuda() -> bool:
    """True when the loaded extension was compiled with CUDA kernels."""
    module, _ = load_extension()
    return bool(module is not None and getattr(module, "WITH_CUDA", False))


@lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """Whether Triton kernels can run here: on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not installed ({err}); `pip install triton`"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "interpreter (TRITON_INTERPRET=1, CPU tensors)"
    import torch

    if torch.cuda.is_available():
        return True, f"CUDA ({torch.cuda.get_device_name()})"
    return False, "no CUDA device; set TRITON_INTERPRET=1 to run Triton kernels on the CPU (slow, for tests)"


TRITON_OR_TORCH = ("auto", "triton", "torch")


def resolve_triton_backend(backend: str, device: torch.device) -> str:
    """A kernel's backend among ``TRITON_OR_TORCH``: ``auto`` -> ``triton`` on CUDA tensors when Triton can run,
    else ``torch``; ``triton`` where it cannot run is an error naming why."""
    if backend not in TRITON_OR_TORCH:
        raise ValueError(f"backend must be one of {TRITON_OR_TORCH}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_status()[0] else "torch"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {why}")
    return backend


def backends() -> dict[str, str]:
    """What was built and loaded, and why not: {"cpp": ..., "cuda": ..., "triton": ..., "torch": ...}."""
    module, why = load_extension()
    ok_triton, why_triton = triton_status()
    report = {
        "cpp": "loaded" if module is not None else why,
        "cuda": ("loaded" if extension_has_cuda() else "extension built without CUDA")
        if module is not None
        else why,
        "triton": ("available: " if ok_triton else "unavailable: ") + why_triton,
        "torch": "available (reference)",
    }
    return report
