"""Provenance: one block that says how a result was made (software, source tree, machine, device, model).

``provenance_block(model=..., device=...)`` is what every JSON mu_fast writes carries (the demo's and ``run``'s
results.json, ``evaluate --out``, an edit's delta.json and saved model, a mask's metadata, every sweep record)::

    {"format": 2,
     "versions": {"mu_fast", "python", "torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft",
                  "bitsandbytes", "numpy", "huggingface_hub"},
     "git": {"commit", "dirty"} or None,
     "host": {"name", "machine", "processor", "cpu", "torch_threads", "cpu_capability", "kernel_env", "pid"},
     "device": {"type", "index", "name", "total_memory", "cuda", "cuda_visible_devices"},
     "model": the model identity (``model_identity``) or None, "created": UTC ISO time, **extra}

``numerics(block)`` is the part of it that changes float round-off (versions, threads, CPU kernels): results
computed under another are recomputed, not reused. The versions and git commit are looked up once per process: a
sweep stamps thousands of records, and ``git`` costs a subprocess.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
from collections.abc import Mapping
from typing import Any

PROVENANCE_FORMAT = 2
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "peft", "bitsandbytes", "numpy",
            "huggingface_hub")
# Environment variables that choose CPU kernels or threads, and so change float round-off (mu_fast.determinism).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
BLOCK_KEYS = ("format", "versions", "git", "host", "device", "model", "created")


@functools.cache
def _versions() -> dict[str, str | None]:
    import importlib.metadata

    import mu_fast

    out: dict[str, str | None] = {"mu_fast": mu_fast.__version__, "python": platform.python_version()}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def versions() -> dict[str, str | None]:
    """mu_fast, Python and the installed version of each of ``PACKAGES`` (None where one is not installed)."""
    return dict(_versions())


@functools.cache
def _git() -> dict[str, Any] | None:
    from mu_fast.models.identity import git_commit

    return git_commit()


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU features that decide which vectorized kernels torch, MKL and oneDNN run (and so their float round-off).
CPU_FLAGS = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


@functools.cache
def cpu_identity() -> dict[str, Any]:
    """Vendor, family, model and stepping of the CPU and which of ``CPU_FLAGS`` it has (``/proc/cpuinfo``; a VM
    may hide the model name, e.g. "AMD EPYC", but not these)."""
    fields: dict[str, Any] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return {"vendor": platform.processor() or "unknown"}
    flags = set(fields.get("flags", "").split())
    return {"vendor": fields.get("vendor_id"), "family": fields.get("cpu family"), "model": fields.get("model"),
            "stepping": fields.get("stepping"), "flags": [f for f in CPU_FLAGS if f in flags]}


def host_info() -> dict[str, Any]:
    """The machine and the torch CPU settings that change float round-off (threads, kernel dispatch level)."""
    import torch

    return {"name": platform.node(), "machine": platform.machine(), "processor": _cpu_model(), "cpu": cpu_identity(),
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernel_env": {k: os.environ.get(k) for k in KERNEL_ENV}, "pid": os.getpid()}


def device_info(device: Any = None) -> dict[str, Any]:
    """What ``device`` (a torch device, ``"cuda:0"``, ``"cpu"``, or None: the first GPU if any, else the CPU) is."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    out: dict[str, Any] = {"type": device.type, "index": device.index,
                           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        out.update(index=index, name=props.name, total_memory=int(props.total_memory), cuda=torch.version.cuda)
    else:
        out["name"] = _cpu_model()
    return out


def model_identity(ref: str, info: Mapping[str, Any] | None = None, model: Any = None,
                   dtype: str | None = None) -> dict[str, Any]:
    """Which model a result was made with: the reference as given, its kind, the checkpoint path or hub id and
    revision or organism hash, and ``config_hash`` (``mu_fast.models.identity``) and ``arch`` of its config.

    info: the ``info`` dict of ``load_model`` / ``load_for_edit`` (its ``organism`` entry, if any, gives the
    organism hash and checkpoint path). model: the loaded model, or its transformers config."""
    from mu_fast.models.identity import config_hash

    info = dict(info or {})
    out: dict[str, Any] = {"ref": ref, "dtype": dtype or info.get("dtype")}
    organism = info.get("organism")
    if organism is not None:
        out.update(kind="organism", organism_hash=organism.config.config_hash(), path=str(organism.path))
    elif info.get("source") == "organism" or ref == "organism" or ref.startswith("organism:"):
        out.update(kind="organism")
    elif ref.startswith("random:"):
        out.update(kind="random")
    elif os.path.isdir(ref):
        out.update(kind="checkpoint", path=os.path.abspath(ref))
    else:
        out.update(kind="hub", revision=getattr(getattr(model, "config", model), "_commit_hash", None))
    for key in ("path", "revision", "organism_hash", "source", "edited_from"):
        if info.get(key) is not None and key not in out:
            out[key] = info[key]
    config = getattr(model, "config", model)
    if config is not None and hasattr(config, "to_dict"):
        out["config_hash"] = config_hash(config)
        out["arch"] = getattr(config, "model_type", None)
    return out


def provenance_block(model: Mapping[str, Any] | None = None, device: Any = None, **extra: Any) -> dict[str, Any]:
    """The provenance of one result (module docstring): versions, git commit, host, device, model identity, and
    ``extra`` fields (e.g. ``organism={...}``: how the organism was trained)."""
    block = {
        "format": PROVENANCE_FORMAT,
        "versions": versions(),
        "git": _git(),
        "host": host_info(),
        "device": device_info(device),
        "model": dict(model) if model is not None else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra) & set(block))
    if clash:
        raise ValueError(f"provenance_block: extra field {clash[0]!r} is a field of the block itself; rename it")
    block.update(extra)
    return block


def numerics(block: Mapping[str, Any]) -> dict[str, Any]:
    """What in a provenance block changes float round-off: package versions, torch threads, CPU kernels."""
    host = block["host"]
    return {"versions": {k: v for k, v in block["versions"].items() if k != "mu_fast"},
            "torch_threads": host["torch_threads"], "cpu_capability": host["cpu_capability"],
            "kernel_env": host["kernel_env"], "device": block["device"].get("type")}
