"""Frozen-weight precision: keep the modules an edit does not train in bf16, or quantize them with bitsandbytes.

``frozen="int8"`` stores every frozen ``nn.Linear`` as a ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), row-wise
absmax int8, outlier threshold 6.0, ``has_fp16_weights=False``); ``frozen="nf4"`` as a ``Linear4bit`` (NF4 blocks
of 64 with double-quantized statistics, bf16 compute), as QLoRA does. The LM head and every module that holds a
masked parameter stay in full precision. Both layers run forward and backward (input gradients) on CPU and CUDA.

On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight, at its first no-grad eval-mode forward,
for a CPU inference kernel that has no backward; every later forward then drops the gradient through that layer
(an edit's masked parameters below it get a wrong or no gradient). Every ``Linear4bit`` mu_fast builds or loads
has that repacking turned off, and ``keep_4bit_differentiable_`` (run by the edit loop and by ``attribute`` on any
model they are given) turns it off and undoes a repacking that already happened.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

FROZEN_PRECISIONS = ("bf16", "int8", "nf4")
INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default (LLM.int8() outlier columns)
NF4_DOUBLE_QUANT = True  # QLoRA's double quantization of the block statistics (~0.37 bits per weight saved)
BNB_REQUIREMENT = "bitsandbytes>=0.50,<0.51"


def check_frozen(frozen: str) -> str:
    """Return ``frozen`` if it is one of ``FROZEN_PRECISIONS``; ``ValueError`` naming the choices otherwise."""
    if frozen not in FROZEN_PRECISIONS:
        raise ValueError(f"frozen={frozen!r} is not a frozen-weight precision; choose one of {FROZEN_PRECISIONS}")
    return frozen


def require_bitsandbytes(frozen: str) -> Any:
    """The ``bitsandbytes`` module when ``frozen`` quantizes (None for bf16); ``ValueError`` if it cannot be imported."""
    if check_frozen(frozen) == "bf16":
        return None
    try:
        import bitsandbytes
    except Exception as err:  # noqa: BLE001 - a broken install raises more than ImportError
        raise ValueError(
            f"frozen={frozen!r} needs bitsandbytes, which cannot be imported ({type(err).__name__}: {err}); "
            f"pip install '{BNB_REQUIREMENT}', or use frozen='bf16'"
        ) from None
    # Int8 matmuls cast bf16 inputs to fp16 by design; bitsandbytes logs that at every call of every layer.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def bnb_config(frozen: str, skip_modules: Iterable[str], compute_dtype: torch.dtype = torch.bfloat16,
               cpu_offload: bool = False) -> Any:
    """The ``transformers.BitsAndBytesConfig`` that quantizes every Linear but ``skip_modules`` (full module names,
    e.g. ``model.layers.1.mlp.up_proj``); None for bf16. ``cpu_offload`` keeps CPU/disk-offloaded modules
    unquantized (bitsandbytes cannot run them there)."""
    require_bitsandbytes(frozen)
    if frozen == "bf16":
        return None
    from transformers import BitsAndBytesConfig

    skip = sorted(set(skip_modules))
    if frozen == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skip,
                                  llm_int8_enable_fp32_cpu_offload=cpu_offload)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=NF4_DOUBLE_QUANT, llm_int8_skip_modules=skip,
        llm_int8_enable_fp32_cpu_offload=cpu_offload,
    )


def quantized_linear(linear: torch.nn.Linear, frozen: str, compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A frozen bitsandbytes layer computing ``linear`` with its weight quantized on the weight's own device
    (int8: ``Linear8bitLt``; nf4: ``Linear4bit``). The dense weight is not kept; the bias is kept as is."""
    bnb = require_bitsandbytes(frozen)
    if bnb is None:
        raise ValueError("quantized_linear needs frozen='int8' or 'nf4'; bf16 keeps the nn.Linear as it is")
    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    with torch.device("meta"):  # the layer's own dense weight is never allocated
        if frozen == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                        threshold=INT8_THRESHOLD)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype,
                                      compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4", quant_storage=torch.uint8)
    if frozen == "int8":
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
    else:
        param = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=NF4_DOUBLE_QUANT, quant_type="nf4",
                                  quant_storage=torch.uint8, module=layer)
        layer.weight = param.to(weight.device)  # Params4bit quantizes on its first move to a real device
        layer.support_avx512bf16_for_cpu = False  # see the module docstring: the repacked layer has no backward
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer


def quantize_frozen_(model: torch.nn.Module, frozen: str, keep: Iterable[str] = ()) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` except ``keep`` (module names) and the LM head by its
    ``quantized_linear``; return the names of the replaced modules. No-op for ``frozen="bf16"``."""
    if require_bitsandbytes(frozen) is None:
        return []
    keep = set(keep) | set(output_embedding_names(model))
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n not in keep]
    for name in names:
        model.set_submodule(name, quantized_linear(model.get_submodule(name), frozen))
    return names


def keep_4bit_differentiable_(model: torch.nn.Module) -> int:
    """Turn off, in place, bitsandbytes' CPU repacking of every ``Linear4bit`` in ``model`` (see the module
    docstring) and undo it where it already happened; return how many layers were unpacked.

    An unpacked layer keeps the same 4-bit codes and the block scales the repacked kernel used (bfloat16, stored
    unnested in fp32), so it computes what the repacked one did, now with a backward. Layers on other devices and
    models without 4-bit layers are left as they are (bitsandbytes is imported only when a layer needs unpacking).
    """
    unpacked = 0
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not getattr(state, "packing_format_for_cpu", False):
            continue
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        scales = state.absmax.T.reshape(-1).float()  # packed as [blocks per row, rows] in bfloat16
        state.original_nested = False  # keep them: bitsandbytes' inverse would re-quantize them (rounding twice)
        codes, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        state.absmax, state.nested = scales, False
        weight.data = codes
        module.quant_state = state
        unpacked += 1
    return unpacked


def output_embedding_names(model: torch.nn.Module) -> list[str]:
    """Module name(s) of the LM head (``lm_head`` for every supported architecture)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if head is not None and m is head]


def is_quantized(module_or_param: Any) -> bool:
    """True for a bitsandbytes layer or parameter (``Linear8bitLt``, ``Linear4bit``, ``Int8Params``, ``Params4bit``)."""
    return type(module_or_param).__module__.startswith("bitsandbytes")


def frozen_precision_of(model: torch.nn.Module) -> str:
    """``int8`` / ``nf4`` / ``fp4`` if the model holds bitsandbytes layers, else the dtype of its Linear weights
    (``bf16``, ``fp16``, ``fp32``)."""
    for module in model.modules():
        if is_quantized(module) and hasattr(module, "weight"):
            quant_type = getattr(module.weight, "quant_type", None)
            return quant_type if quant_type else "int8"
    linear = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
    dtype = linear.weight.dtype if linear is not None else next(model.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
