"""Shared benchmark helpers: the context recorded with every result, timing, and where results go.

Every benchmark records, in pytest-benchmark's ``extra_info``: the device name, torch/triton/CUDA versions,
the git commit and the date (``context()``), plus its own physics (bytes or FLOPs, achieved rate, % of the
roofline) and peak memory.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def device_slug() -> str:
    """Folder name under benchmarks/results: e.g. ``NVIDIA_H200`` or ``CPU``."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return "CPU"


def git_commit() -> str:
    """The short commit of the code that ran: ``MU_FAST_COMMIT`` when set (a copied tree whose .git is stale, as on
    the GPU machine), else ``git rev-parse``."""
    if os.environ.get("MU_FAST_COMMIT"):
        return os.environ["MU_FAST_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def context() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
