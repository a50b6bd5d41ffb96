"""``mu-fast env``: versions, compiled backends and devices, as JSON."""

from __future__ import annotations

import json

from mu_fast.cli.common import console


def env_cmd() -> None:
    """Versions, compiled backends and devices."""
    import platform

    import torch

    import mu_fast

    info = {"mu_fast": mu_fast.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["backends"] = mu_fast.backends()
    console().print_json(json.dumps(info))
