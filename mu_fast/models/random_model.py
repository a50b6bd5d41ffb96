"""Random-weight models of real shapes, built without a hub and without a full copy anywhere.

``build_random_model("gemma-2-9b", device="cuda", frozen="nf4", trainable_modules=[...])`` creates the model on
the meta device (accelerate's ``init_empty_weights``), then materializes it module by module directly on
``device``: each parameter is allocated there and initialised by the architecture's own ``_init_weights``
(normal(0, initializer_range) for Linear and Embedding, norms at their identity value), and a frozen Linear is
quantized right after (bitsandbytes), so the peak is the quantized model plus one bf16 matrix. Values are
deterministic per (seed, parameter name, device type): a parameter gets the same values in bf16, int8 and nf4
builds, so the quantized models are quantizations of the bf16 one.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any

import torch

from mu_fast.models.frozen import check_frozen, output_embedding_names, quantized_linear, require_bitsandbytes


def with_layers(config: Any, layers: int) -> Any:
    """A copy of a transformers config with ``layers`` decoder layers (per-layer lists such as Gemma-2's
    ``layer_types`` truncated), same width."""
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive integer; got {layers!r}")
    data = config.to_dict()
    data["num_hidden_layers"] = layers
    if data.get("layer_types"):
        base = list(data["layer_types"])
        data["layer_types"] = [base[i % len(base)] for i in range(layers)]
    return type(config).from_dict(data)


def resolve_config(name_or_config: Any, layers: int | None = None) -> Any:
    """The transformers config of a shipped name (``mu_fast.models.shipped``) or a copy of the given config."""
    from mu_fast.models.shipped import shipped_config

    if isinstance(name_or_config, str):
        config = shipped_config(name_or_config)
    elif hasattr(name_or_config, "to_dict") and hasattr(name_or_config, "model_type"):
        config = copy.deepcopy(name_or_config)
    else:
        raise TypeError(f"expected a shipped model name or a transformers config; got {type(name_or_config).__name__}")
    return with_layers(config, layers) if layers is not None else config


def empty_model(config: Any, dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None) -> Any:
    """The CausalLM of ``config`` with every parameter on the meta device (buffers are real and tiny)."""
    import transformers
    from accelerate import init_empty_weights

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    model.tie_weights()  # init_empty_weights re-creates every parameter it registers, which unties the LM head
    return model


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _check_modules(model: torch.nn.Module, names: Iterable[str]) -> set[str]:
    import difflib

    modules = dict(model.named_modules())
    out = set()
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
            raise ValueError(f"trainable module {name!r} is not in {type(model).__name__} (close names: {close}); "
                             "pass module names such as 'model.layers.0.mlp.up_proj'")
        out.add(name)
    return out


def build_random_model(
    name_or_config: Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    frozen: str = "bf16",
    trainable_modules: Iterable[str] = (),
    seed: int = 0,
    layers: int | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """A random-weight CausalLM of a shipped model (``"gemma-2-9b"``, ...) or of any supported config, in eval mode.

    frozen: ``bf16`` keeps every weight in ``dtype``; ``int8`` / ``nf4`` store every ``nn.Linear`` except
    ``trainable_modules`` and the LM head as bitsandbytes layers (``mu_fast.models.frozen``). Parameters of
    ``trainable_modules`` (module names, e.g. ``model.layers.3.mlp.down_proj``) have ``requires_grad`` on, all
    others off. layers: build only this many decoder layers of the same width (CPU-scaled benchmarks).
    ``device="meta"`` returns the unmaterialized model (shapes only, bf16 frozen).
    """
    check_frozen(frozen)
    require_bitsandbytes(frozen)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = resolve_config(name_or_config, layers)
    model = empty_model(config, dtype, attn_implementation)
    trainable = _check_modules(model, trainable_modules)
    if device.type == "meta":
        if frozen != "bf16":
            raise ValueError(f"device='meta' builds shapes only and cannot quantize (frozen={frozen!r}); use a real device")
        for name, param in model.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[0] in trainable)
        return model.eval()
    keep = trainable | set(output_embedding_names(model))
    materialized: dict[int, torch.nn.Parameter] = {}  # meta parameter id -> its real tensor (tied weights)
    rng_devices = [device.index] if device.type == "cuda" else []
    for name, module in list(model.named_modules()):
        own = list(module.named_parameters(recurse=False))
        if not own or all(p.device.type != "meta" for _, p in own):
            continue
        fresh = False
        for pname, param in own:
            if id(param) in materialized:
                setattr(module, pname, materialized[id(param)])
                continue
            real = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
            materialized[id(param)] = real
            setattr(module, pname, real)
            fresh = True
        if not fresh:
            continue
        with torch.random.fork_rng(devices=rng_devices, device_type=device.type if rng_devices else "cuda"):
            torch.manual_seed(_seed_of(seed, name))
            model._init_weights(module)
        if frozen != "bf16" and type(module) is torch.nn.Linear and name not in keep:
            model.set_submodule(name, quantized_linear(module, frozen, compute_dtype=dtype))
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[bname] = buf.to(device)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[0] in trainable)
    return model.eval()
