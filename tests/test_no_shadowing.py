"""The repository's ``kernels/`` folder is ``mu_fast.kernels`` only: run from the repository root (where ``sys.path``
holds the root), ``import kernels`` gets Hugging Face's package or fails as if the folder were not there, and
importing bitsandbytes prints nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_in_repo(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_import_kernels_from_the_repo_root_is_not_our_folder():
    code = ("import kernels\nprint(getattr(kernels, '__file__', None), list(kernels.__path__))\n"
            "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('no get_kernel')\n"
            "import transformers\nprint(transformers.LlamaConfig.__name__)\n"  # its kernels check imports `kernels`
            "import mu_fast.kernels.masked_adamw\nprint(mu_fast.kernels.__name__)")
    done = run_in_repo(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == ["None []", "no get_kernel", "LlamaConfig", "mu_fast.kernels"], done.stdout


def test_a_real_kernels_package_wins_over_the_folder(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("def get_kernel(*args, **kwargs):\n    raise RuntimeError('offline')\n")
    done = run_in_repo("import kernels\nprint(kernels.__file__)\nfrom kernels import get_kernel", PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(fake / "__init__.py")


def test_importing_bitsandbytes_from_the_repo_root_is_quiet():
    done = run_in_repo("import mu_fast\nimport bitsandbytes\nimport mu_fast.models")
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr and "Failed to load" not in done.stderr, done.stderr
