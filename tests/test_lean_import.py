"""`import mu_fast` (and its data/optim/evaluate front doors) must stay cheap: no transformers, no CUDA init."""

import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
heavy = [m for m in ("transformers", "peft", "pandas", "matplotlib") if m in sys.modules]
import torch
print(",".join(heavy) or "-", torch.cuda.is_initialized())
"""


@pytest.mark.parametrize("module", ["mu_fast", "mu_fast.masks", "mu_fast.data", "mu_fast.optim", "mu_fast.evaluate"])
def test_import_is_lean(module):
    out = subprocess.run([sys.executable, "-c", CHECK.format(module=module)], capture_output=True, text=True, check=True)
    heavy, cuda = out.stdout.split()
    assert heavy == "-", f"import {module} pulled in {heavy}"
    assert cuda == "False"
