"""The same demo table on any x86-64 CPU: what makes it so, and what was measured.

Float round-off differs between CPUs (torch picks its vectorized kernels by CPU, MKL and oneDNN their code paths by
vendor and model) and between thread counts. Four things kept that from reaching the demo's table:

1. **The organism is shipped as weights** (``mu_fast.organism.shipped``): training it amplifies round-off, and two
   CPUs trained two different organisms, even with one kernel set on both (an Intel Xeon and an AMD EPYC gave
   another FLU selection and another table).
2. **Everything after loading runs in float64** (``mu_fast.organism.lr_choice.DEMO_DTYPE``, ``mu_fast.models.
   precision.to_float64``): kernel round-off is then ~1e-16 instead of ~1e-7. In float32, one latent probe's
   prediction flipped between portable and native kernels on one machine and changed a printed mean
   (``benchmarks/results/CPU/demo_numerics_fp32.json``). transformers' RMSNorm and rotary modules compute in float32
   whatever the model's dtype; ``to_float64`` replaces them. Probe features stay float64.
3. **Random draws that are the same everywhere**: the relearning attack's LoRA dropout draws its masks with
   ``torch.rand`` (torch's ``bernoulli_``, behind ``nn.Dropout``, draws from MKL's generator on Intel CPUs only).
4. **Probes solved to their minimum** (``mu_fast.evaluate.probes.train_probes``, Newton): L-BFGS stopped at its
   iteration limit far from the minimum on the organism's nearly separable features, so a 1e-15 change of the
   features moved the probe weights by up to 1.8; even in float64 one latent-probe prediction then differed between
   native and portable kernels (2 threads), and with it a printed mean. The minimum itself moves by ~1e-13.

Measured (``benchmarks/demo_numerics.py``, ``benchmarks/results/CPU/demo_numerics.json``): on one AMD EPYC (family
25 model 17, AVX-512), the demo under native (AVX-512) and portable (baseline x86-64) kernels, with 1 thread in 2
worker processes and 2 threads in one process, printed the same table; every per-seed number agreed to the
difference recorded there. Not measured: another CPU model or vendor; the argument for them is the three points
above, not a run.

``use_portable_kernels`` still selects the kernels every x86-64 CPU runs alike (torch's baseline kernels, MKL's
reproducible ``COMPATIBLE`` path, oneDNN limited to SSE4.1; chosen before torch is imported) for
``mu-fast demo --portable-kernels`` and for training the shipped organisms; the demo's default is this CPU's own,
faster kernels.
"""

from __future__ import annotations

import os
import sys
from typing import Any

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def wants_portable_kernels(argv: list[str]) -> bool:
    """Whether the command line ``argv`` (without the program name) runs the demo with portable kernels
    (``mu-fast demo --portable-kernels``; the default is this CPU's own)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "demo" and "--portable-kernels" in argv


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
