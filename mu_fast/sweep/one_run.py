"""The work of one run after its localization: edit the model in place under the mask, evaluate it, summarize.

``edit_and_evaluate`` is the per-run body of the sweep engine (``mu_fast.sweep.session``: the model is restored from a
masked snapshot after each run), so of everything that runs many runs: ``mu-fast sweep``, the demo, ``mu-fast run``
(``mu_fast.sweep.compare``), the paper's protocol and the lr rule. ``RunOptions`` are the evaluation options of the
demo and ``mu-fast run`` (``RUN_PRESETS``: ``default`` the paper's relearning attack, ``organism`` the organism's);
``summarize`` names the headline numbers of a run as the report tables show them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mu_fast.edit.loop import EditConfig, edit


@dataclass
class RunOptions:
    """What to evaluate after each edit, and at what cost. relearn_settings / probe_settings: further keywords of
    ``relearn_attack`` (lora_alpha, batch_size, ...) / ``latent_probes`` (steps, position, ...); formats: None = all."""

    relearn: bool = True
    relearn_steps: int = 20
    relearn_lr: float = 2e-4
    relearn_rank: int = 512
    probes: bool = True
    eval_batch_size: int = 64
    seed: int = 0
    relearn_settings: dict[str, Any] = field(default_factory=dict)
    probe_settings: dict[str, Any] = field(default_factory=dict)
    formats: list[str] | None = None

    def spec_evaluations(self) -> dict[str, Any]:
        """These options as a sweep spec's ``evaluations:``."""
        relearn = {**self.relearn_settings, "steps": self.relearn_steps, "lr": self.relearn_lr,
                   "lora_rank": self.relearn_rank}
        return {"formats": self.formats or "all", "batch_size": self.eval_batch_size,
                "relearn": relearn if self.relearn else False,
                "probes": dict(self.probe_settings) if self.probes else False}

    def evaluations(self) -> dict[str, Any]:
        """The resolved evaluation settings ``edit_and_evaluate`` takes (``resolve_evaluations`` of
        ``spec_evaluations``)."""
        from mu_fast.sweep.evaluations import resolve_evaluations

        return resolve_evaluations(self.spec_evaluations())


# The organism's relearning attack: at the paper's lr 2e-4 (tuned for 7-9B models) 20 LoRA steps moved held-out
# forget accuracy by at most 0.05 for every method on the demo organism, so the attack told them apart only at a
# higher lr (1e-3: flu 0.17 -> 0.64, nonlocalized 0.02 -> 0.40). d_model is 64, so rank 16 is already a quarter
# of full rank (64 gave the same accuracies within 0.02).
ORGANISM_RUN_OPTIONS = RunOptions(relearn_lr=1e-3, relearn_rank=16)
# Evaluation options of the named presets; the edit settings of every preset are in mu_fast.sweep.presets. The
# paper's presets evaluate with the paper's relearning protocol (RunOptions' defaults).
RUN_PRESETS = {"default": RunOptions(), "organism": ORGANISM_RUN_OPTIONS}


def summarize(loc_summary: Mapping[str, Any], evals: Mapping[str, Any], relearn: Mapping[str, Any] | None,
              probes: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    """The headline numbers of one method, named as in the report table."""

    def get(fmt: str, split: str, key: str) -> float | None:
        value = evals.get(fmt, {}).get(split, {}).get(key)
        return None if value is None else float(value)

    out: dict[str, Any] = {"trainable_params": loc_summary["trainable_params"], "seconds": seconds}
    forget_acc = get("normal", "forget", "acc")
    out["forget_err"] = None if forget_acc is None else 1.0 - forget_acc
    out["edit_acc"] = get("normal", "forget", "edit_acc")
    out["maintain_acc"] = get("normal", "maintain", "acc")
    out["qa_edit_acc"] = get("qa", "forget", "edit_acc")
    mcq = get("mcq", "forget", "acc")
    out["mcq_forget_err"] = None if mcq is None else 1.0 - mcq
    out["mcq_edit_acc"] = get("mcq", "forget", "edit_acc")
    out["paraphrase_edit_acc"] = get("paraphrase", "forget", "edit_acc")
    out["neighborhood_edit_err"] = get("neighborhood", "forget", "edit_error")
    # A second attribute of the same (edited) subjects, where the task has one (the organism's home city):
    # collateral damage the sport metrics cannot see.
    out["other_attr_acc"] = get("city", "forget", "acc")
    if relearn:
        out["relearn_acc"] = float(relearn["final"]["normal"]["acc"])
        if "mcq" in relearn["final"]:
            out["relearn_mcq_acc"] = float(relearn["final"]["mcq"]["acc"])
    if probes and probes.get("forget_acc_true"):
        # Is the true attribute still linearly decodable anywhere past the embeddings?
        out["probe_true_acc"] = float(max(probes["forget_acc_true"][1:]))
    return {k: v for k, v in out.items() if v is not None}


def check_finite(what: str, values: Mapping[str, Any], step: Any = None) -> None:
    """``FloatingPointError`` when a number in ``values`` is NaN or infinite (a diverged edit)."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            where = f" at step {step}" if step is not None else ""
            raise FloatingPointError(f"{what} {key} is {value}{where}; the edit diverged: lower lr or forget_coef")


def edit_and_evaluate(
    model: Any,
    tokenizer: Any,
    task: Any,
    loc: Any,
    config: EditConfig,
    evaluations: Mapping[str, Any],
    seed: int = 0,
    progress: bool = False,
    timings: dict[str, float] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """One run after its localization ``loc``: edit ``model`` in place under ``loc.mask``, then evaluate it.

    evaluations: resolved settings (``RunOptions.evaluations()`` or a sweep run's ``evaluations``): ``formats``
    (None: all), ``batch_size``, ``relearn`` / ``probes`` (None, or the keywords of ``relearn_attack`` /
    ``latent_probes``; relearning is scored at steps 0, steps // 2 and steps) and ``extra`` (registered evaluations,
    ``mu_fast.sweep.evaluations``). timings: filled with seconds per stage; started: when the run began (``time.perf_counter()``; default now), for ``summary["seconds"]``.
    Returns ``{"edit", "evals", "relearn", "latent_probes", <extra names>..., "summary"}``. The caller undoes the
    edit (a deep copy, or ``mu_fast.sweep.snapshot``). ``FloatingPointError`` when the edit diverges.
    """
    timings = {} if timings is None else timings
    started = time.perf_counter() if started is None else started
    t = time.perf_counter()
    edited = edit(model, tokenizer, task, loc.mask, config, progress=progress)
    timings["edit"] = time.perf_counter() - t
    return evaluate_edited(model, tokenizer, task, loc, edited, evaluations, seed, progress, timings, started)


def evaluate_edited(model: Any, tokenizer: Any, task: Any, loc: Any, edited: Any, evaluations: Mapping[str, Any],
                    seed: int = 0, progress: bool = False, timings: dict[str, float] | None = None,
                    started: float | None = None, evals: Mapping[str, Any] | None = None,
                    probe_features: Any = None, relearn: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The second half of ``edit_and_evaluate``: ``model`` as edited (``edited``: the ``EditResult``, whose history is
    checked for divergence), evaluated in every setting of ``evaluations``, and the run's summary. A batched edit
    (``mu_fast.edit.batched``) calls it once per configuration with that configuration's delta applied.

    evals: this model's ``evaluate_task`` result in ``evaluations``' formats and batch size when the caller has it
    already (``ModelSession.execute_batch`` scores every run of a batch in one pass, ``evaluate_task_variants``); it
    is used as given, and ``timings["evaluate"]`` is left to the caller. probe_features: likewise the latent probes'
    features of this model (``mu_fast.evaluate.probes.probe_features_variants``), passed to ``latent_probes``.
    relearn: likewise this model's ``relearn_attack`` result in ``evaluations["relearn"]``'s settings and this seed
    (``mu_fast.evaluate.relearn_attack_variants``), used as given; ``timings["relearn"]`` is left to the caller."""
    from mu_fast.evaluate import evaluate_task, latent_probes, relearn_attack

    timings = {} if timings is None else timings
    started = time.perf_counter() if started is None else started
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = now - t
        t = now

    for row in edited.history:
        check_finite("edit", row, row.get("step"))
    out: dict[str, Any] = {
        "edit": {"optimizer": edited.optimizer, "seconds": edited.seconds, "config": edited.config,
                 "history": edited.history, "trainable_elements": edited.trainable_elements},
    }
    if evals is None:
        out["evals"] = evaluate_task(model, tokenizer, task, formats=evaluations["formats"],
                                     batch_size=evaluations["batch_size"])
        lap("evaluate")
    else:
        out["evals"] = dict(evals)
        t = time.perf_counter()
    given, relearn = relearn, None
    if evaluations.get("relearn") is not None and given is not None:
        relearn = dict(given)
        t = time.perf_counter()
    elif evaluations.get("relearn") is not None:
        settings = dict(evaluations["relearn"])
        steps = settings["steps"]
        relearn = relearn_attack(model, tokenizer, task, seed=seed, eval_batch_size=evaluations["batch_size"],
                                 progress=progress, eval_at=tuple(sorted({0, steps // 2, steps})), **settings)
        lap("relearn")
    probes = None
    if evaluations.get("probes") is not None and task.classes:
        probes = latent_probes(model, tokenizer, task, batch_size=evaluations["batch_size"], features=probe_features,
                               **evaluations["probes"])
        lap("probes")
    out["relearn"], out["latent_probes"] = relearn, probes
    if evaluations.get("extra"):
        from mu_fast.sweep.evaluations import REGISTRY

        for name, settings in evaluations["extra"].items():
            out[name] = REGISTRY[name].fn(model, tokenizer, task, settings, seed)
            lap(name)
    out["summary"] = summarize(loc.summary(), out["evals"], relearn, probes, time.perf_counter() - started)
    check_finite("metric", out["summary"])
    return out


def before_summary(evals: Mapping[str, Any]) -> dict[str, Any]:
    """The unedited model's row: ``summarize`` of its evaluation, without the per-run fields (params, seconds)."""
    before = summarize({"trainable_params": 0}, evals, None, None, 0.0)
    before.pop("seconds")  # nothing ran: a dash, not "0.0"
    return before


BEFORE_ROW = "(before edit)"
