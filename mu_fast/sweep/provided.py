"""Models and tasks a caller already holds, handed to the sweep engine instead of loaded by reference.

``compare_localizations(model, tokenizer, task)`` and ``mu-fast run`` / ``demo`` have the model (and its task) in
memory before any run starts: they checked it knows the facts, and a 7-9B model loaded twice would not fit one GPU.
They register it here under its resolved reference (``refs.resolve_model``: a ``memory:<label>`` reference with the
weights' digest, or the reference the model was loaded from) and the engine's sessions use it instead of loading:

* ``provide(model_ref, model, tokenizer, info, tasks={task_ref: FactTask})`` registers, ``Provided`` carries the
  same to worker processes and Ray actors (it is the engine's ``setup`` callable: pickled once per worker, as the
  model would be anyway, and installed there before the first run).
* ``model_for(ref)`` / ``task_for(ref)``: what a session asks before it loads.

A run's id hashes the reference, so it must say which weights and facts it stands for: ``weights_digest`` (the
weights' per-parameter bit-pattern sums, ``mu_fast.sweep.snapshot.fingerprint``, hashed) and ``task_digest`` (every
prompt, answer and setting of the task) make a ``memory:`` reference that a rerun on the same model and task finds in
the store, and that another model or task never matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

_MODELS: dict[str, tuple[Any, Any, dict[str, Any]]] = {}
_TASKS: dict[str, Any] = {}


def _key(ref: Mapping[str, Any]) -> str:
    return json.dumps(dict(ref), sort_keys=True, default=str)


def weights_digest(model: Any) -> str:
    """16 hex digits naming ``model``'s weights (equal weights, equal digest; any changed element changes it)."""
    from mu_fast.sweep.snapshot import fingerprint

    text = json.dumps(fingerprint(model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_digest(task: Any) -> str:
    """16 hex digits naming a FactTask's facts, formats, LM texts and settings."""
    data = {f.name: getattr(task, f.name) for f in dataclasses.fields(task)}
    text = json.dumps(data, sort_keys=True, default=lambda v: dataclasses.asdict(v) if dataclasses.is_dataclass(v)
                      else str(v))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provide(model_ref: Mapping[str, Any], model: Any, tokenizer: Any, info: Mapping[str, Any] | None = None,
            tasks: Mapping[str, Any] | None = None) -> None:
    """Register ``model`` (with its tokenizer and load info) under ``model_ref`` and ``tasks`` (``{json of the task
    reference: FactTask}``, keys from ``task_key``) in this process."""
    _MODELS[_key(model_ref)] = (model, tokenizer, dict(info or {}))
    _TASKS.update(tasks or {})


def task_key(task_ref: Mapping[str, Any]) -> str:
    return _key(task_ref)


def model_for(ref: Mapping[str, Any]) -> tuple[Any, Any, dict[str, Any]] | None:
    """``(model, tokenizer, info)`` registered under ``ref``, or None."""
    return _MODELS.get(_key(ref))


def task_for(ref: Mapping[str, Any]) -> Any:
    """The FactTask registered under ``ref``, or None."""
    return _TASKS.get(_key(ref))


def withdraw(model_ref: Mapping[str, Any], task_refs: Any = ()) -> None:
    """Forget what ``provide`` registered (the caller keeps its objects)."""
    _MODELS.pop(_key(model_ref), None)
    for ref in task_refs:
        _TASKS.pop(_key(ref), None)


class Provided:
    """The engine's ``setup`` callable that installs a model and tasks in a worker (module docstring); ``then``: a
    further setup to call after (e.g. one that registers evaluations)."""

    def __init__(self, model_ref: Mapping[str, Any], model: Any, tokenizer: Any, info: Mapping[str, Any],
                 tasks: Mapping[str, Any], then: Any = None):
        self.model_ref, self.model, self.tokenizer = dict(model_ref), model, tokenizer
        self.info, self.tasks, self.then = dict(info), dict(tasks), then

    def __getstate__(self) -> dict[str, Any]:
        # Plain pickle, not the transport's: multiprocessing's pickler (torch's reductions) would hand every worker
        # the same shared-memory storage, and one worker's edit would change the weights under the others' runs.
        import pickle

        return {"payload": pickle.dumps((self.model_ref, self.model, self.tokenizer, self.info, self.tasks, self.then))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import pickle

        (self.model_ref, self.model, self.tokenizer, self.info, self.tasks,
         self.then) = pickle.loads(state["payload"])

    def __call__(self) -> None:
        if model_for(self.model_ref) is None:
            provide(self.model_ref, self.model, self.tokenizer, self.info, self.tasks)
        else:
            _TASKS.update(self.tasks)
        if self.then is not None:
            self.then()
