"""General capability through lm-eval (authors_repo.md §4.4): the paper's MMLU and SciQ, and tinyMMLU in the loop.

``capability_eval`` wraps the caller's *in-memory* model (edited weights as they are; nothing is saved or
reloaded) in ``lm_eval.models.huggingface.HFLM`` and runs ``lm_eval.simple_evaluate`` on it, reading
``acc,none`` (and its stderr) per task or group, as the authors read ``results['mmlu']['acc,none']`` (zero-shot
``mmlu`` and ``sciq``, lm-eval ~0.4.4 in their logs).

``"tinyMMLU"`` names the authors' in-loop check: the 100 questions of ``tinyBenchmarks/tinyMMLU`` (prompt =
their ``input_formatted``), answered by the argmax over " A".." D" and reported as plain accuracy. lm-eval's own
``tinyMMLU`` task reports an IRT-weighted ``acc_norm`` instead (and needs the ``tinyBenchmarks`` package), so
the name maps to the inline config ``TINY_MMLU_TASK``.

Data comes from the Hugging Face hub (cached under ``$HF_DATASETS_CACHE`` after the first download). Offline, a
dataset that is not cached stops the run before any model work with a one-line error naming the task and the
fix. ``task_dir`` adds a folder of tasks in lm-eval's own YAML format (e.g. questions in a local JSONL file).

BOS token (``add_bos``). The authors' lm-eval 0.4.4 encoded requests *without* special tokens unless the model type
contains "gemma" (its HFLM: ``add_bos_token=False`` by default, forced to True for the Gemma family); lm-eval 0.4.13
leaves the choice to the tokenizer, whose default adds Llama-3's ``<|begin_of_text|>``. ``add_bos=None`` keeps the
installed lm-eval's behaviour, True / False force it, ``"paper"`` is the authors' rule (``paper_add_bos``), which
``--preset paper`` uses.

lm-eval seeds Python's, NumPy's and torch's global generators; their states are restored afterwards, as are
the model's train/eval mode and, if lm-eval had to set one, the tokenizer's pad token (it works on a copy).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from mu_fast.evaluate.metrics import model_device

PAPER_TASKS = ("mmlu", "sciq")
ADD_BOS_CHOICES = (None, True, False, "paper")
TINY_MMLU = "tinyMMLU"
TINY_MMLU_TASK: dict[str, Any] = {
    "task": "mu_fast_tinyMMLU",
    "dataset_path": "tinyBenchmarks/tinyMMLU",
    "dataset_name": "all",
    "test_split": "test",
    "output_type": "multiple_choice",
    "doc_to_text": "{{input_formatted}}",
    "doc_to_choice": ["A", "B", "C", "D"],
    "doc_to_target": "answer",
    "num_fewshot": 0,
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 0.0},
}
_OFFLINE_MARKERS = ("offline", "couldn't reach", "connection", "not found on the hugging face hub", "doesn't exist on the hub",
                    "cannot find the requested files")


class DatasetUnavailable(RuntimeError):
    """An lm-eval task's dataset is neither in the local Hugging Face cache nor reachable on the hub."""


def capability_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: int | None = 0,
    task_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100_000,
    progress: bool = False,
    add_bos: bool | str | None = None,
) -> dict[str, Any]:
    """Evaluate the in-memory ``model`` on lm-eval ``tasks`` and return ``{"tasks": {name: {"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "n"}}, "settings": {...}, "seconds"}`` (a metric the task lacks is None).

    tasks: lm-eval task or group names (``mmlu``, ``sciq``, ...), ``"tinyMMLU"`` (the authors' in-loop check, see
    the module docstring), or names defined in ``task_dir``. limit: at most this many documents per task (a
    fraction below 1: that share), for quick checks only. batch_size: requests per forward (``"auto"`` lets
    lm-eval probe). num_fewshot: 0 as the paper (None keeps each task's own default). progress: keep lm-eval's
    info logging. add_bos: prepend the BOS token to every request (True / False), the installed lm-eval's default
    (None: the tokenizer's own special tokens) or the authors' lm-eval 0.4.4 rule (``"paper"``: only for Gemma models);
    ``settings["add_bos_token"]`` records what was used.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"capability_eval needs lm-eval ({err}); pip install 'lm-eval>=0.4.13,<0.5'") from err
    names = [str(t) for t in ([tasks] if isinstance(tasks, str) else tasks)]
    if not names:
        raise ValueError("tasks is empty; name at least one lm-eval task, e.g. ('mmlu', 'sciq') or ('tinyMMLU',)")
    if not (add_bos is None or isinstance(add_bos, bool) or add_bos == "paper"):
        raise ValueError(f"add_bos={add_bos!r}; use True, False, None (the installed lm-eval's default) or 'paper'")
    bos = paper_add_bos(model) if add_bos == "paper" else add_bos
    if task_dir is not None and not os.path.isdir(task_dir):
        raise ValueError(f"task_dir={str(task_dir)!r} is not a directory; pass a folder holding lm-eval task YAML files")
    start = time.perf_counter()
    tokenizer = _unwrapped(tokenizer)
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)  # HFLM would set a pad token on the caller's tokenizer
    was_training = bool(model.training)
    with _quiet(progress), _restored_rng(model):
        manager = _task_manager(TaskManager, names, task_dir)
        built = [_build(manager, name) for name in names]
        keys = [_result_key(obj) for obj in built]  # lm-eval's Task.task_name draws from `random` on every read
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                log_samples=False, bootstrap_iters=bootstrap_iters,
            )
        finally:
            model.train(was_training)
    results = raw["results"]
    out: dict[str, dict[str, Any]] = {}
    for name, key in zip(names, keys, strict=True):
        if key not in results:
            raise RuntimeError(f"lm-eval returned no result for task {name!r} (keys: {sorted(results)[:8]}...)")
        row = results[key]
        out[name] = {
            "acc": row.get("acc,none"), "acc_stderr": _number(row.get("acc_stderr,none")),
            "acc_norm": row.get("acc_norm,none"), "acc_norm_stderr": _number(row.get("acc_norm_stderr,none")),
            "n": _n_samples(raw, key),
        }
    return {
        "tasks": out,
        "settings": {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                     "task_dir": None if task_dir is None else str(task_dir), "lm_eval_version": _version(lm_eval),
                     "add_bos": add_bos, "add_bos_token": "tokenizer default" if bos is None else bos,
                     "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "device": str(model_device(model))},
        "seconds": time.perf_counter() - start,
    }


def paper_add_bos(model: Any) -> bool:
    """The authors' lm-eval 0.4.4 rule: a BOS token only for the Gemma family (model type containing "gemma")."""
    return "gemma" in str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _unwrapped(tokenizer: Any) -> Any:
    """The transformers tokenizer inside a wrapper that keeps it in ``_tokenizer`` (the sweep's ``CachedTokenizer``):
    HFLM accepts only transformers tokenizer classes."""
    from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

    while not isinstance(tokenizer, (PreTrainedTokenizer, PreTrainedTokenizerFast)) and "_tokenizer" in vars(tokenizer):
        tokenizer = vars(tokenizer)["_tokenizer"]
    return tokenizer


def _task_manager(task_manager_cls: Any, names: list[str], task_dir: Any) -> Any:
    """A TaskManager over ``task_dir`` only when every name is defined there (indexing lm-eval's ~10k built-in task
    files takes ~10 s), else over the built-in tasks plus ``task_dir``."""
    if task_dir is not None:
        local = task_manager_cls(include_path=str(task_dir), include_defaults=False)
        if all(_known(local, n) for n in names if n != TINY_MMLU):
            return local
    return task_manager_cls(include_path=None if task_dir is None else str(task_dir))


def _known(manager: Any, name: str) -> bool:
    return name in manager.all_tasks or name in manager.all_groups or name in manager.all_tags


def _build(manager: Any, name: str) -> Any:
    """The lm-eval Task or Group of ``name``, its dataset loaded now (so a missing one fails before the model runs)."""
    tiny = name == TINY_MMLU
    spec: Any = dict(TINY_MMLU_TASK) if tiny else name
    if not tiny and not _known(manager, name):
        close = difflib.get_close_matches(name, manager.all_tasks + manager.all_groups, n=3)
        raise ValueError(f"lm-eval has no task or group {name!r}" + (f" (did you mean {close}?)" if close else "")
                         + "; use an lm-eval task name, 'tinyMMLU', or define it in a task_dir YAML file")
    try:
        loaded = manager.load([spec])
    except Exception as err:  # lm-eval and datasets raise many types; only hub/cache misses are rephrased
        if not _looks_offline(err):
            raise
        raise DatasetUnavailable(
            f"capability_eval: the dataset of lm-eval task {name!r} is not in the local Hugging Face cache and could not "
            f"be fetched from the hub ({type(err).__name__}: {str(err).splitlines()[0][:160]}); run once online to cache it "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset), or pass task_dir= a folder with a local lm-eval task"
        ) from err
    top = spec["task"] if tiny else name
    found = loaded["groups"].get(top) or loaded["tasks"].get(top)
    return found if found is not None else spec  # a tag: let simple_evaluate expand it again


def _looks_offline(err: BaseException) -> bool:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = " ".join(f"{type(e).__name__} {e}" for e in chain).lower()
    return any(isinstance(e, (ConnectionError, FileNotFoundError)) for e in chain) or any(m in text for m in _OFFLINE_MARKERS)


def _result_key(obj: Any) -> str:
    for attr in ("name", "task_name"):
        value = getattr(obj, attr, None)
        if isinstance(value, str):
            return value
    return obj["task"] if isinstance(obj, dict) else str(obj)


def _n_samples(raw: dict[str, Any], key: str) -> int | None:
    counts = raw.get("n-samples", {})
    if key in counts:
        return int(counts[key].get("effective", counts[key].get("original", 0)))
    children = raw.get("group_subtasks", {}).get(key)
    if not children:
        return None
    parts = [_n_samples(raw, c) for c in children]
    return sum(p for p in parts if p is not None)


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" where it has no stderr


def _version(module: Any) -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


@contextlib.contextmanager
def _restored_rng(model: Any):
    """simple_evaluate seeds random, numpy and torch globally; give the caller's generator states back."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    device = model_device(model)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet(progress: bool):
    """lm-eval logs at INFO/WARNING and datasets draws bars; keep them out of the caller's output unless asked."""
    if progress:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = None
    try:
        from datasets.utils import logging as ds_logging

        bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
    except ImportError:
        ds_logging = None
    try:
        yield
    finally:
        logger.setLevel(level)
        if ds_logging is not None and bars:
            ds_logging.enable_progress_bar()
