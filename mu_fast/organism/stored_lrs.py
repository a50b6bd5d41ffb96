"""The demo's stored learning-rate choice, ``demo_lr_choice.json`` beside this file: reading it, the ``EditConfig``
per method it gives, and the per-group ``organism`` edit preset of the sweep presets (``mu_fast.sweep.presets``).

Making a choice runs the sweep engine (``mu_fast.organism.lr_choice``, which re-exports everything here); reading one
does not, so the sweep presets read it from here and the organism package stays below the sweep package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CHOICE_FILE = Path(__file__).with_name("demo_lr_choice.json")


def load_lr_choice(key: str, path: str | os.PathLike = CHOICE_FILE) -> dict[str, Any] | None:
    """The stored choice at ``path`` if it was made under ``key`` (``choice_key``), else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stored if stored.get("key") == key else None


def edit_configs(choice: Mapping[str, Any], methods: Sequence[str], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{method: EditConfig}``: the choice's shared settings, the method's chosen lr, then ``overrides`` (flags)."""
    from mu_fast.edit import EditConfig

    missing = [m for m in methods if m not in choice["choices"]]
    if missing:
        raise ValueError(f"the lr choice has no learning rate for {missing}; run `mu-fast demo --choose-lr` to choose "
                         "one for every method")
    return {m: EditConfig(**{**choice["base_edit"], "lr": choice["choices"][m]["lr"], **dict(overrides or {})})
            for m in methods}


# The method whose chosen lr stands for its group in the per-group ``organism`` preset (``mu_fast.sweep.presets``).
GROUP_REPRESENTATIVE = {"lookup": "flu", "tracing": "atp", "broad": "nonlocalized"}


def organism_groups(path: str | os.PathLike = CHOICE_FILE) -> dict[str, dict[str, Any]]:
    """The ``organism`` preset per method group: ``BASE_EDIT`` with the lr the rule chose for the group's
    representative method (``GROUP_REPRESENTATIVE``) in the committed choice; the demo itself uses every method's
    own lr (``edit_configs``)."""
    path = Path(path)
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"the organism preset reads its learning rates from {path}, which is missing or unreadable "
                           f"({err}); restore it from git or run `mu-fast demo --choose-lr`") from None
    return {group: {**stored["base_edit"], "lr": stored["choices"][method]["lr"]}
            for group, method in GROUP_REPRESENTATIVE.items()}
