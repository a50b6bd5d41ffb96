"""Device maps for editing: masked layers on the GPU, frozen layers wherever they fit (GPU, then CPU, then disk).

accelerate's offload hooks move an offloaded module's weights in for each forward and drop them after, so a
parameter that lives on the CPU or the disk cannot be trained. ``edit_device_map`` therefore reserves GPU
memory for the decoder layers that hold masked modules first, lets ``accelerate.infer_auto_device_map`` place
everything else in what is left, and pins those layers to the GPU. Sizes count frozen Linear weights at their
quantized size (int8: 1 byte, nf4: half a byte per weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

GiB = 1024**3


def device_of(device_map: Mapping[str, Any], name: str) -> Any:
    """The device a module or parameter ``name`` gets under ``device_map`` (longest matching prefix; None if none)."""
    best, best_len = None, -1
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best_len:
            best, best_len = device, len(key)
    return best


def is_gpu(device: Any) -> bool:
    return isinstance(device, int) or (isinstance(device, (str, torch.device)) and str(device).startswith("cuda"))


def holding_blocks(model: torch.nn.Module, module_names: Iterable[str]) -> list[str]:
    """For each module name, the outermost enclosing module that accelerate must not split (a decoder layer,
    from ``model._no_split_modules``), or the module itself; sorted, without duplicates."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    out = set()
    for name in module_names:
        parts = name.split(".")
        block = name
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if type(model.get_submodule(prefix)).__name__ in no_split:
                block = prefix
                break
        out.add(block)
    return sorted(out)


def quantized_dtypes(model: torch.nn.Module, frozen: str, skip_modules: Iterable[str]) -> dict[str, Any]:
    """``special_dtypes`` for accelerate: the weight of every Linear that will be quantized, at its stored size."""
    if frozen == "bf16":
        return {}
    from accelerate.utils import CustomDtype

    skip = set(skip_modules)
    small = torch.int8 if frozen == "int8" else CustomDtype.INT4
    return {f"{n}.weight": small for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in skip}


def _pin(device_map: dict[str, Any], model: torch.nn.Module, name: str, device: Any) -> None:
    """Set ``name`` to ``device``, splitting an ancestor entry into its children first when one covers it."""
    for key in sorted(device_map, key=len, reverse=True):
        if key == name:
            device_map[key] = device
            return
        if key == "" or name.startswith(key + "."):
            if device_map[key] == device:
                return
            parent_device = device_map.pop(key)
            parent = model.get_submodule(key) if key else model
            prefix = f"{key}." if key else ""
            for child, _ in parent.named_children():
                device_map[prefix + child] = parent_device
            for tensor_name, _ in [*parent.named_parameters(recurse=False), *parent.named_buffers(recurse=False)]:
                device_map[prefix + tensor_name] = parent_device
            _pin(device_map, model, name, device)
            return
    device_map[name] = device


def edit_device_map(
    model: torch.nn.Module,
    masked_modules: Iterable[str],
    frozen: str,
    dtype: torch.dtype,
    max_memory: Mapping[Any, Any] | None = None,
    gpu: int = 0,
) -> dict[str, Any]:
    """A device map for ``model`` (on the meta device) that keeps the layers holding ``masked_modules`` on GPU
    ``gpu`` and places the rest with ``accelerate.infer_auto_device_map`` under ``max_memory`` (accelerate's
    format, e.g. ``{0: "20GiB", "cpu": "64GiB"}``; default: what is free). ``ValueError`` if the masked layers
    alone do not fit the GPU's budget."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_max_memory

    masked_modules = list(masked_modules)
    special = quantized_dtypes(model, frozen, masked_modules)
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    blocks = holding_blocks(model, masked_modules)
    reserved = sum(sizes[b] for b in blocks)
    budget = dict(get_max_memory(dict(max_memory) if max_memory is not None else None))
    if gpu not in budget:
        raise ValueError(f"max_memory has no entry for GPU {gpu} (keys: {list(budget)}); add one, e.g. {{{gpu}: '20GiB'}}")
    if reserved > budget[gpu]:
        raise ValueError(
            f"the {len(blocks)} layer(s) holding masked modules ({', '.join(blocks[:4])}{' ...' if len(blocks) > 4 else ''}) "
            f"need {reserved / GiB:.2f} GiB on GPU {gpu} (frozen={frozen}) but it has {budget[gpu] / GiB:.2f} GiB; "
            "raise max_memory for it, use frozen='nf4', or edit fewer layers"
        )
    budget[gpu] -= reserved
    placeholders = {b: model.get_submodule(b) for b in blocks}
    try:
        for block in blocks:  # size-0 stand-ins so the auto map plans only the rest
            model.set_submodule(block, torch.nn.Module())
        device_map = dict(infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=list(getattr(model, "_no_split_modules", None) or ()),
            dtype=dtype, special_dtypes=special,
        ))
    finally:
        for block, module in placeholders.items():
            model.set_submodule(block, module)
    for block in blocks:
        _pin(device_map, model, block, gpu)
    return device_map


def check_masked_on_gpu(device_map: Mapping[str, Any], masked_modules: Iterable[str]) -> None:
    """``ValueError`` naming the first masked module that ``device_map`` puts on the CPU or the disk."""
    for name in masked_modules:
        device = device_of(device_map, name)
        if not is_gpu(device):
            raise ValueError(
                f"device_map puts masked module {name!r} on {device!r}; offloaded modules cannot be trained. "
                "Map the layers holding masked modules to a GPU, or pass device_map='auto'"
            )


def summarize(model: torch.nn.Module) -> dict[str, int]:
    """How many modules that own parameters live on the GPU, the CPU and the disk (accelerate offload)."""
    device_map = getattr(model, "hf_device_map", None)
    counts = {"gpu": 0, "cpu": 0, "disk": 0}
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        device = device_of(device_map, name) if device_map else own[0].device
        if device == "disk" or (device_map is None and own[0].device.type == "meta"):
            counts["disk"] += 1
        elif is_gpu(device) or (isinstance(device, torch.device) and device.type == "cuda"):
            counts["gpu"] += 1
        else:
            counts["cpu"] += 1
    return counts
