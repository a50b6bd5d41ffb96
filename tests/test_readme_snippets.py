"""The README's Python snippets run as written: every ```python block of README.md runs in a fresh namespace (the
CI organism is trained once per session and found through ``$MU_FAST_CACHE_DIR``, as a user's snippet finds it in
the default cache). A block whose first line is the comment ``# needs a GPU: not run in CI`` needs a GPU or a
7-9B checkpoint and is skipped; the "Use it" block may never be. Inline calls of ``MaskedAdamW(...)`` run too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
GPU_MARK = "# needs a GPU: not run in CI"
MUST_RUN = "Use it"


def python_blocks() -> list[tuple[str, int, str]]:
    """``(section heading, first line number, code)`` of every ```python block."""
    text = README.read_text()
    out = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[: match.start()]
        headings = re.findall(r"^## (.+)$", before, re.M)
        out.append((headings[-1] if headings else "(top)", before.count("\n") + 2, match[1]))
    return out


BLOCKS = python_blocks()


def test_the_use_it_block_exists_and_is_run():
    use_it = [code for heading, _, code in BLOCKS if heading == MUST_RUN]
    assert use_it, f"README has no ```python block under '## {MUST_RUN}'"
    assert not any(code.startswith(GPU_MARK) for code in use_it), "the Use it block must run in CI"


@pytest.mark.parametrize("heading, line, code", BLOCKS, ids=[f"{h} (line {n})" for h, n, _ in BLOCKS])
def test_readme_python_block_runs(heading, line, code, ci_organism, cache_root, monkeypatch):
    if code.startswith(GPU_MARK):
        pytest.skip(f"README.md:{line} is marked '{GPU_MARK}'")
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the session's CI organism, trained once
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    if heading == MUST_RUN:
        assert {"model", "tokenizer", "task", "loc", "result"} <= set(namespace)


def test_inline_masked_adamw_calls_run(ci_organism):
    import copy

    import torch

    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.optim import MaskedAdamW

    calls = re.findall(r"`(MaskedAdamW\([^`]*\))`", README.read_text())
    assert calls, "README shows no MaskedAdamW(...) call"
    model = copy.deepcopy(ci_organism.model)  # trainable_parameters() changes requires_grad
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 1), Component("attn", 0)])  # a partial mask
    for call in calls:
        opt = eval(call.replace("lr=...", "lr=1e-3"), {"MaskedAdamW": MaskedAdamW, "model": model, "mask": mask})  # noqa: S307
        assert isinstance(opt, torch.optim.Optimizer), call
