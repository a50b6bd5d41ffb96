"""Identity and provenance: what model, config and software an edit was made with.

``config_hash`` fingerprints a model's architecture from its transformers config (the same for a checkpoint
loaded in bf16, int8 or nf4: quantization settings, dtype and library versions are left out).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

# Config fields that say how a model was loaded or saved, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "quantization_config",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "_attn_implementation_autoset",
    "attn_implementation", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "cache_implementation",
})


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The architecture-defining fields of a transformers config (or of ``model.config``), as a JSON-ready dict."""
    config = getattr(config, "config", config)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS}


def config_hash(config: Any) -> str:
    """16 hex digits of sha256 over ``config_fingerprint``: equal for the same architecture in any precision."""
    payload = json.dumps(config_fingerprint(config), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def versions() -> dict[str, str | None]:
    """Versions of mu_fast and the libraries an edit depends on (None where one is not installed)."""
    import importlib.metadata

    import torch

    import mu_fast

    out: dict[str, str | None] = {"mu_fast": mu_fast.__version__, "torch": torch.__version__}
    for dist in ("transformers", "accelerate", "bitsandbytes", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the mu_fast source tree, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}
