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
    done = run_in_repo("import sys\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('none', e.name)\n"
                       "else:\n    print('found', kernels.__file__)\n"
                       "import mu_fast.kernels\nprint(mu_fast.kernels.__name__)")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n")[:2]
    assert first == "none kernels" or (first.startswith("found") and str(REPO / "kernels") not in first), first
    assert second == "mu_fast.kernels"


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
