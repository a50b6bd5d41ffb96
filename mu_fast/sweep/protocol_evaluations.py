"""The paper's further evaluations as registered sweep evaluations (``evaluations: {name: true | {...}}``).

* ``softprompt``: the authors' soft-prompt attack (``mu_fast.evaluate.softprompt_attack``); ``steps`` /
  ``batch_size`` null take the authors' schedule (``paper_schedule``). Metrics: the attacks' mean held-out forget
  accuracy (true and edit answer) and maintain accuracy.
* ``capability``: lm-eval (``mu_fast.evaluate.capability_eval``) on ``tasks`` (the paper's ``mmlu``, ``sciq`` by
  default; ``task_dir`` adds local lm-eval YAML tasks; ``add_bos``: null = the installed lm-eval's encoding, true /
  false, or ``paper`` = the authors' lm-eval 0.4.4 encoding, BOS for Gemma models only). When lm-eval is not installed or a task's dataset is not
  available offline, the result is ``{"skipped": <reason>}`` instead of a failed run: the edit and the other
  evaluations stay valid.
* ``paper_probes``: latent probes exactly as the authors (``latent_probes(setting="paper")``, see
  ``mu_fast.evaluate.probes_paper``); the built-in ``probes`` key stays the standardised variant.

Every result carries ``"metrics"``: the few numbers a sweep table shows, prefixed with the evaluation's name.
Registered by ``mu_fast.sweep.evaluations`` when it is imported (``register_protocol_evaluations``), so every
process that resolves or runs a spec has them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SOFTPROMPT_DEFAULTS: dict[str, Any] = {"n_attacks": 4, "steps": None, "batch_size": None, "lr": 1e-5, "eps": 6.0,
                                       "length": 15, "autocast": None, "eval_batch_size": 64}
CAPABILITY_DEFAULTS: dict[str, Any] = {"tasks": ["mmlu", "sciq"], "limit": None, "batch_size": 8, "num_fewshot": 0,
                                       "task_dir": None, "add_bos": None}
PAPER_PROBE_DEFAULTS: dict[str, Any] = {"position": "last", "probe_backend": "auto", "batch_size": 64}


def _positive_or_null(name: str, settings: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        v = settings[key]
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"spec: evaluations.{name}.{key} must be a positive integer or null; got {v!r}")


def check_softprompt(settings: dict[str, Any]) -> None:
    _positive_or_null("softprompt", settings, ("steps", "batch_size"))
    if settings["n_attacks"] < 1 or settings["length"] < 1 or settings["eps"] <= 0 or settings["lr"] <= 0:
        raise ValueError(f"spec: evaluations.softprompt: n_attacks, length, eps and lr must be positive; got {settings}")
    if settings["autocast"] not in (None, "paper"):
        raise ValueError(f"spec: evaluations.softprompt.autocast must be null or 'paper'; got {settings['autocast']!r}")


def check_capability(settings: dict[str, Any]) -> None:
    tasks = settings["tasks"]
    if isinstance(tasks, str):
        tasks = settings["tasks"] = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"spec: evaluations.capability.tasks must be a non-empty list of lm-eval task names; got {tasks!r}")
    limit = settings["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"spec: evaluations.capability.limit must be null or a positive number; got {limit!r}")
    if settings["task_dir"] is not None and not isinstance(settings["task_dir"], str):
        raise ValueError(f"spec: evaluations.capability.task_dir must be a folder path or null; got {settings['task_dir']!r}")
    bos = settings["add_bos"]
    if not (bos is None or isinstance(bos, bool) or bos == "paper"):
        raise ValueError(f"spec: evaluations.capability.add_bos must be null, true, false or 'paper'; got {bos!r}")


def check_paper_probes(settings: dict[str, Any]) -> None:
    from mu_fast.evaluate.probes import POSITIONS, PROBE_BACKENDS

    if settings["position"] not in POSITIONS:
        raise ValueError(f"spec: evaluations.paper_probes.position must be one of {POSITIONS}; got {settings['position']!r}")
    if settings["probe_backend"] not in PROBE_BACKENDS:
        raise ValueError(f"spec: evaluations.paper_probes.probe_backend must be one of {PROBE_BACKENDS}; "
                         f"got {settings['probe_backend']!r}")


def run_softprompt(model: Any, tokenizer: Any, task: Any, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    from mu_fast.evaluate import softprompt_attack

    result = softprompt_attack(model, tokenizer, task, seed=seed, progress=False, **settings)
    mean = result["mean"]
    result["metrics"] = {"softprompt_forget_acc": mean["forget_acc"], "softprompt_forget_edit_acc": mean["forget_edit_acc"],
                         "softprompt_maintain_acc": mean["maintain_acc"]}
    return result


def run_capability(model: Any, tokenizer: Any, task: Any, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    from mu_fast.evaluate.capability import DatasetUnavailable, capability_eval

    try:
        result = capability_eval(model, tokenizer, **settings)
    except ImportError as err:
        return {"skipped": f"lm-eval is not installed ({err}); pip install 'lm-eval>=0.4.13,<0.5'", "metrics": {}}
    except DatasetUnavailable as err:
        return {"skipped": str(err), "metrics": {}}
    result["metrics"] = {f"capability_{name}_acc": row["acc"] for name, row in result["tasks"].items()}
    return result


def run_paper_probes(model: Any, tokenizer: Any, task: Any, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    from mu_fast.evaluate import latent_probes

    if not task.classes:
        return {"skipped": f"task {task.name!r} has no answer classes (latent probes need a classification task, "
                           "e.g. sports)", "metrics": {}}
    result = latent_probes(model, tokenizer, task, setting="paper", **settings)
    result["metrics"] = {"paper_probes_max_forget_acc_true": max(result["forget_acc_true"]),
                         "paper_probes_max_probe_acc": max(result["probe_acc"])}
    return result


def register_protocol_evaluations(register_evaluation: Callable[..., None]) -> None:
    """Register the three with ``register_evaluation`` (``mu_fast.sweep.evaluations.register_evaluation``, which
    passes itself: this module imports nothing from there)."""
    register_evaluation("softprompt", run_softprompt, SOFTPROMPT_DEFAULTS, check=check_softprompt)
    register_evaluation("capability", run_capability, CAPABILITY_DEFAULTS, check=check_capability)
    register_evaluation("paper_probes", run_paper_probes, PAPER_PROBE_DEFAULTS, check=check_paper_probes)
