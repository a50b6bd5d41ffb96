"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit decorator runs (reference/aesthetics.md §7), so it is
set here, at collection time, whenever no CUDA GPU is present: Triton kernels then run on CPU tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MU_FAST_DATA_DIR", str(REPO.parent / "shared" / "data"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, seeded generator per test (fresh random data, reproducible failures)."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("MU_FAST_RANDOM_SEED") == "1" else 1234
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["MU_FAST_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"data directory {path} missing: put ../shared/data beside the repo or set MU_FAST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """A session-wide ``$MU_FAST_CACHE_DIR`` for tests that go through the default cache (the CLI)."""
    return tmp_path_factory.mktemp("mu_fast_cache")


@pytest.fixture(scope="session")
def ci_cache(cache_root) -> Path:
    """Where the CI organism is cached: ``<cache_root>/organism``, the default layout under ``$MU_FAST_CACHE_DIR``."""
    return cache_root / "organism"


@pytest.fixture(scope="session")
def ci_organism(ci_cache):
    """The CI organism (``OrganismConfig.ci()``), trained once per session (about 40 s on 2 cores)."""
    from mu_fast.organism import OrganismConfig, load_organism

    return load_organism(OrganismConfig.ci(), cache_dir=ci_cache, progress=False)


@pytest.fixture(autouse=True)
def sigint_left_as_found():
    """No test may leave SIGINT's handler changed in the pytest process: a later test that starts a command inherits
    an ignored SIGINT, and its Ctrl-C then does nothing (seen in full-suite runs). The handler is put back, and the
    test that changed it fails, named."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"this test left SIGINT's handler changed ({before!r} -> {after!r}); restore it")
