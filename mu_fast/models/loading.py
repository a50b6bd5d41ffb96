"""Loading models for the CLI and the pipeline: the built-in organism, or a HF checkpoint through accelerate."""

from __future__ import annotations

import os
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_model(name_or_path: str, dtype: str = "bf16", device_map: str | None = "auto", progress: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Return (model, tokenizer, info). ``organism`` (or ``organism:ci``) loads the built-in organism (fp32, its
    weights; ``dtype="fp64"`` casts it, as the demo runs it; other dtypes are ignored for it); anything else is a
    local HF checkpoint or a hub id (needs network), loaded with accelerate's device map."""
    if name_or_path.startswith("organism"):
        from mu_fast.organism import OrganismConfig, load_organism

        preset = name_or_path.split(":", 1)[1] if ":" in name_or_path else "demo"
        if not hasattr(OrganismConfig, preset):
            raise ValueError(f"unknown organism preset {preset!r}; use 'organism' (demo) or 'organism:ci'")
        org = load_organism(getattr(OrganismConfig, preset)(), progress=progress)
        if dtype in ("fp64", "float64"):
            from mu_fast.models.precision import to_float64

            org.model = to_float64(org.model)
        return org.model, org.tokenizer, {"model": f"organism:{preset}", "organism": org}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(name_or_path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"{name_or_path!r} is not a local path and HF_HUB_OFFLINE=1; download the checkpoint first")
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map and torch.cuda.is_available():
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the paper's code (pad = EOS)
    return model, tokenizer, {"model": name_or_path, "dtype": dtype}
