"""Localized edits at the paper's batch: mu_fast against the authors' recipe, same model, masks and data, same run.

Per optimizer step the paper processes 64 forget + 64 maintain prompts and 64 LM texts × 100 tokens
(authors_repo.md §3). Both recipes are in ``benchmarks/edit_recipes.py``: the authors' (whole selected matrices
with ``requires_grad``, 48 micro-batches of 4, full-vocabulary logits, dense AdamW — bitsandbytes AdamW8bit for
Gemma-2 — empty_cache per micro-step) and mu_fast's (``EditStep`` with the settings ``mu_fast.memory.plan`` picks
for the row's memory budget: 24 GB with bf16 frozen weights, 16 GB int8, 12 GB nf4).

* GPU: random-weight Llama-3-8B, Gemma-7B and Gemma-2-9B (the shipped configs) built directly on the GPU, the
  paper's sports localizations (FLU, AP, CT from its graphs; random = budget-matched random whole matrices), frozen
  weights bf16 / int8 / nf4 (bitsandbytes; only for mu_fast: the authors' recipe is bf16). mu_fast runs
  ``MU_FAST_EDIT_STEPS`` steps (default 50: one whole edit; its total is recorded as ``edit_s``), the authors'
  recipe ``MU_FAST_AUTHORS_STEPS`` steps (default 2; its 50-step time is not measured). The table's ratio compares
  the median seconds per step. Peak memory is ``torch.cuda.max_memory_allocated`` over the whole run of a row
  (weights included), next to the plan's estimate.
* CPU: the same suite at a scaled shape (Llama-3-8B's structure: 8 layers, width 256, GQA 4:1, vocab 16384) and a
  quarter of the paper's batch (16 + 16 prompts, 16 LM texts × 100 tokens), 3 steps (authors: 2): a ratio for every
  change, not a prediction of GPU time. Unquantized rows run in fp32 there (this CPU has no native bf16 GEMM: a bf16 step
  of a width-512 model took about 2× the fp32 step) and are labelled ``fp32``; int8 / nf4 rows keep bitsandbytes' bf16 compute.

Every row is also appended to ``$MU_FAST_BENCH_ROWS`` (JSON lines) as soon as it finishes, so a run cut short keeps
its finished rows. Select models with ``MU_FAST_EDIT_MODELS`` (comma list) and rows with pytest's ``-k``.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

import pytest
import torch

from benchmarks.common import context, peak_bytes, reset_peak, sync
from benchmarks.edit_recipes import AuthorsRecipe, MuFastRecipe, masked_module_names, random_step_batch, whole_matrix_mask

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PAPER_BATCH = dict(forget=64, maintain=64, lm=64, lm_tokens=100)
CPU_BATCH = dict(forget=16, maintain=16, lm=16, lm_tokens=100)
CPU_SCALED = dict(num_hidden_layers=8, hidden_size=256, intermediate_size=896, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=64, vocab_size=16384)
BUDGETS = {"bf16": 24e9, "int8": 16e9, "nf4": 12e9}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16, "nf4": torch.bfloat16}
GPU_MODELS = [m for m in os.environ.get("MU_FAST_EDIT_MODELS", "gemma-2-9b,llama-3-8b,gemma-7b").split(",") if m]
EDIT_STEPS = int(os.environ.get("MU_FAST_EDIT_STEPS", "50" if GPU else "3"))
SHORT_STEPS = int(os.environ.get("MU_FAST_EDIT_SHORT_STEPS", "5" if GPU else "3"))
AUTHORS_STEPS = int(os.environ.get("MU_FAST_AUTHORS_STEPS", "2"))
LR = 1e-5

# (model, method, frozen, recipe): the most important rows first (a run cut short keeps them). On the GPU, Gemma-2-9B
# (the target model) gets every localization and precision; the other two get FLU in bf16 and nf4.
if GPU:
    ROWS = []
    for model in GPU_MODELS:
        ROWS += [(model, "flu", "bf16", "mu_fast"), (model, "flu", "bf16", "authors"), (model, "flu", "nf4", "mu_fast")]
        if model == "gemma-2-9b":
            ROWS += [(model, m, "bf16", r) for m in ("ap", "ct", "random") for r in ("mu_fast", "authors")]
            ROWS += [(model, "flu", "int8", "mu_fast")]
else:
    torch.set_num_threads(int(os.environ.get("MU_FAST_BENCH_THREADS", "2")))
    ROWS = [("cpu-scaled", m, "fp32", r) for m in ("flu", "ap", "ct", "random") for r in ("mu_fast", "authors")]
    ROWS += [("cpu-scaled", "flu", f, "mu_fast") for f in ("int8", "nf4")]


def _steps(model: str, method: str, frozen: str, recipe: str) -> int:
    """A whole edit (EDIT_STEPS) for FLU in bf16, and for nf4 on the target model; SHORT_STEPS for the rest of
    mu_fast's rows; AUTHORS_STEPS for the authors' recipe (its per-step time is what is compared)."""
    if recipe == "authors":
        return AUTHORS_STEPS
    whole = method == "flu" and (frozen in ("bf16", "fp32") or (frozen == "nf4" and model == "gemma-2-9b"))
    return EDIT_STEPS if whole else SHORT_STEPS


def _config(model: str) -> Any:
    from mu_fast.models import shipped_config

    if model == "cpu-scaled":
        config = shipped_config("llama-3-8b")
        for key, value in CPU_SCALED.items():
            setattr(config, key, value)
        return config
    return shipped_config(model)


def _components(model: str, method: str, config: Any) -> list[Any]:
    """The paper's sports localization of ``method`` (GPU shapes), or its analogue on the scaled CPU shape."""
    from mu_fast.localize.baselines import random_matrices
    from mu_fast.masks import paper_budget
    from mu_fast.models.sites import Component, SiteTable

    table = SiteTable(config)
    if model == "cpu-scaled":  # early MLPs (FLU), late attention + MLPs (AP), attention only (CT), as the paper's picks
        picks = {"flu": [Component("mlp", 1), Component("mlp", 2)],
                 "ap": [Component("attn", 6), Component("mlp", 6), Component("mlp", 7)],
                 "ct": [Component("attn", layer) for layer in range(2, 8)]}
        if method in picks:
            return picks[method]
        return random_matrices(table, paper_budget(table, 2), seed=0)
    from mu_fast.localize.paper_graphs import paper_flu_layers, paper_localization

    if method == "random":
        return random_matrices(table, paper_budget(table, len(paper_flu_layers(model, "sports"))), seed=0)
    return paper_localization(model, "sports", method)


_MODEL: dict[str, Any] = {}


def _model(model: str, frozen: str, mask: Any) -> Any:
    """One model alive at a time; bf16 models are shared by every mask, quantized ones are built per mask (the
    masked modules must stay bf16)."""
    from mu_fast.models import build_random_model

    key = (model, frozen, None if frozen in ("bf16", "fp32") else tuple(masked_module_names(mask)))
    if _MODEL.get("key") != key:
        _MODEL.clear()
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
        _MODEL["model"] = build_random_model(_config(model), device=DEVICE, dtype=DTYPES[frozen],
                                             frozen="bf16" if frozen == "fp32" else frozen,
                                             trainable_modules=masked_module_names(mask), seed=0)
        _MODEL["key"] = key
    return _MODEL["model"]


def _plan(config: Any, mask: Any, frozen: str, batch: dict[str, int]) -> tuple[Any, Any]:
    """mu_fast's settings for the row's budget (GPU; on the CPU the plan without a budget) and the plan itself."""
    from mu_fast.edit.loop import EditConfig
    from mu_fast.memory import BatchShape, plan

    budget = BUDGETS[frozen] if GPU else None
    shape = BatchShape(n_forget=batch["forget"], n_maintain=batch["maintain"], fact_tokens=32, n_lm=batch["lm"],
                       lm_tokens=batch["lm_tokens"])  # random_step_batch pads its 16-32-token prompts to the longest
    p = plan(config, mask, EditConfig(steps=EDIT_STEPS, lr=LR), frozen="bf16" if frozen == "fp32" else frozen,
             device_bytes=budget, batch=shape)
    return p.edit_config(), p


def _append_row(row: dict[str, Any]) -> None:
    path = os.environ.get("MU_FAST_BENCH_ROWS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


@pytest.mark.parametrize("model,method,frozen,recipe", ROWS, ids=["-".join(r) for r in ROWS])
def test_edit(benchmark, model, method, frozen, recipe):
    if frozen in ("int8", "nf4"):
        pytest.importorskip("bitsandbytes", reason="frozen int8/nf4 needs bitsandbytes")
    config = _config(model)
    mask = whole_matrix_mask(config, _components(model, method, config))
    batch = PAPER_BATCH if GPU else CPU_BATCH
    eight_bit = model.startswith("gemma-2")  # the authors' Gemma-2 recipe used bitsandbytes AdamW8bit
    if recipe == "authors" and eight_bit:
        pytest.importorskip("bitsandbytes", reason="the authors' Gemma-2 recipe uses bitsandbytes AdamW8bit")
    edit_config, the_plan = _plan(config, mask, frozen, batch) if recipe == "mu_fast" else (None, None)
    net = _model(model, frozen, mask)
    data = random_step_batch(config.vocab_size, seed=0, **batch)
    reset_peak()
    weights = torch.cuda.memory_allocated() if GPU else None
    start = time.perf_counter()
    try:
        runner = (MuFastRecipe(net, mask, edit_config, data) if recipe == "mu_fast"
                  else AuthorsRecipe(net, mask, data, lr=LR, steps=50, eight_bit=eight_bit))
    except torch.cuda.OutOfMemoryError as err:
        pytest.skip(f"{recipe} out of GPU memory while building: {str(err)[:200]}")
    steps = _steps(model, method, frozen, recipe)
    times: list[float] = []

    def one_step() -> None:
        t0 = time.perf_counter()
        runner.step()
        sync()
        times.append(time.perf_counter() - t0)

    try:
        benchmark.group = f"edit {model} {method}"
        benchmark.pedantic(one_step, rounds=steps, warmup_rounds=0, iterations=1)
    except torch.cuda.OutOfMemoryError as err:
        pytest.skip(f"{recipe} out of GPU memory: {str(err)[:200]}")
    finally:
        runner.close()
    total = time.perf_counter() - start
    peak = peak_bytes()
    info: dict[str, Any] = dict(
        impl=f"{'mu_fast' if recipe == 'mu_fast' else 'authors recipe'} ({frozen})", role="ours" if recipe == "mu_fast" else "peer",
        model=model, method=method, frozen=frozen, recipe=recipe, steps=steps, s_per_step=sorted(times)[len(times) // 2],
        edit_s=sum(times) if recipe == "mu_fast" else None, wall_s=total, trainable_params=mask.param_count(),
        tokens_per_step=data.tokens, batch=batch, peak_mb=None if peak is None else peak / 2**20,
        weights_mb=None if weights is None else weights / 2**20, **context(),
    )
    if recipe == "mu_fast":
        info["settings"] = {k: getattr(edit_config, k) for k in ("optimizer", "state_bits", "compact_grads", "micro_batch",
                                                                  "lm_micro_batch", "grad_checkpointing", "lm_chunk_tokens")}
        if the_plan is not None and GPU:  # the plan models a GPU (bf16 weights, CUDA allocator); the CPU rows are fp32
            info["plan_bytes"] = the_plan.total
            info["plan_breakdown"] = dict(the_plan.breakdown)
            if peak is not None:
                info["peak_vs_plan"] = peak / the_plan.total
    benchmark.extra_info.update(info)
    _append_row({"name": benchmark.name, "group": benchmark.group, **info})
