"""The same demo numbers on any x86-64 CPU: portable math kernels and a fixed number of threads.

Training the organism (600 AdamW steps) and editing it amplify float round-off, so kernels that round differently
give a different organism and a different table. torch picks its vectorized kernels by CPU (AVX-512 on an Intel
Xeon, AVX2 on an AMD EPYC Zen 3) and MKL picks its GEMM code path by CPU vendor and model: the README's first table
came from an AMD EPYC (AVX2) machine and a fresh clone on an Intel Xeon (AVX-512) printed another one, with the
same code and package versions. Forcing one instruction set on both is not enough (measured on the Xeon: AVX2 kernels
there gave a third organism). ``use_portable_kernels`` selects the kernels every x86-64 CPU runs identically:
torch's baseline (non-AVX) kernels, MKL's conditional-numerical-reproducibility "COMPATIBLE" path (SSE2) and
oneDNN limited to SSE4.1, with a fixed thread count (MKL and torch's reductions split work by thread). They must be
chosen before torch is imported; later they can only be reported. Checked on one Intel Xeon (two processes trained
bit-identical portable organisms; four fresh clones printed the same numbers); no AMD machine was at hand to check the
cross-vendor claim, which rests on MKL's CNR guarantee and on the baseline kernels using no CPU-specific code path.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
DEMO_THREADS = 1


def wants_portable_kernels(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program name) runs the demo with portable kernels (the
    default; ``--native-kernels`` opts out)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "demo" and "--native-kernels" not in argv


def use_portable_kernels() -> bool:
    """Select the portable kernels for this process if torch is not imported yet; return whether they are in effect."""
    if "torch" not in sys.modules:
        for key, value in PORTABLE_KERNELS.items():
            os.environ[key] = value
    return portable_kernels_in_effect()


def portable_kernels_in_effect() -> bool:
    """Whether this process runs the portable kernels (environment set and torch's dispatch at the baseline)."""
    if any(os.environ.get(k) != v for k, v in PORTABLE_KERNELS.items()):
        return False
    if "torch" in sys.modules:
        import torch

        return torch.backends.cpu.get_cpu_capability() == "DEFAULT"
    return True


def kernel_settings() -> dict[str, Any]:
    """What results.json records about the kernels: the variables above, torch's dispatch level and threads."""
    import torch

    return {"portable": portable_kernels_in_effect(), **{k: os.environ.get(k) for k in PORTABLE_KERNELS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}
