"""Build, cache and load the organism.

``load_organism(config)`` returns the trained organism, training it on first use. A checkpoint lives in
``<cache root>/<config_hash>/`` (root: the ``cache_dir`` argument, else ``$MU_FAST_CACHE_DIR/organism``,
else ``~/.cache/mu_fast/organism``) and holds the model and tokenizer (``save_pretrained``), the organism
settings (``organism.json``, with a digest of the generated facts) and the accuracy report
(``report.json``). It is written into a temporary sibling directory and renamed into place, so a crash
never leaves a half checkpoint; loading checks that the stored settings hash to the directory's name and
that the facts regenerate identically.

The demo's and the test suite's organisms are not trained here: their weights ship with mu_fast
(``mu_fast.organism.shipped``), so every machine loads the same organism. ``load_organism`` trains only for settings
without shipped weights, or when asked (``retrain=True``), and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mu_fast.organism.config import ORGANISM_FORMAT, REPORT_FILE, SETTINGS_FILE, OrganismConfig
from mu_fast.organism.facts import OrganismFacts, facts_digest, organism_facts
from mu_fast.organism.train import train_checkpoint

CACHE_ENV = "MU_FAST_CACHE_DIR"
_REQUIRED = (SETTINGS_FILE, REPORT_FILE, "config.json", "tokenizer.json")


@dataclass
class Organism:
    """A trained organism: ``model`` (HF CausalLM, float32, eval mode), ``tokenizer``
    (``PreTrainedTokenizerFast``), ``config``, ``facts`` and the ``report`` written at training time
    (``accuracy`` per format, ``subject_probe`` per layer, ``random_init_probe``, ``train`` timings).
    ``path``: the checkpoint directory; ``source``: where the weights came from (``"shipped"``, ``"cache"``,
    ``"trained"``)."""

    model: Any
    tokenizer: Any
    config: OrganismConfig
    facts: OrganismFacts
    report: dict[str, Any]
    path: Path
    source: str = "cache"  # "shipped" (the committed weights), "cache" (trained earlier here) or "trained" (now)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where checkpoints live: ``cache_dir``, else ``$MU_FAST_CACHE_DIR/organism``, else ``~/.cache/mu_fast/organism``;
    without ``cache_dir``, a process running the portable kernels (``mu_fast.determinism``: the demo) uses the sibling
    folder ``organism-portable``: an organism trained with other kernels is another organism."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from mu_fast.determinism import portable_kernels_in_effect

    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() / "organism" if env else Path.home() / ".cache" / "mu_fast" / "organism"
    return root.with_name("organism-portable") if portable_kernels_in_effect() else root


def checkpoint_dir(config: OrganismConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / config.config_hash()


def load_organism(
    config: OrganismConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    retrain: bool = False,
) -> Organism:
    """The trained organism for ``config`` (default ``OrganismConfig.demo()``).

    Settings with shipped weights (``OrganismConfig.demo()``, ``OrganismConfig.ci()``) load those, after checking
    their checksums and facts (``mu_fast.organism.shipped``). Other settings, or ``retrain=True``, train the
    organism (minutes on CPU for the demo preset) into the cache, saying so when ``progress``; a later call loads it
    from the cache (``retrain=True`` trains again and replaces the cached one)."""
    from mu_fast.organism.shipped import shipped_name, shipped_path, verify

    config = OrganismConfig.demo() if config is None else config
    if not isinstance(config, OrganismConfig):
        raise TypeError(f"config must be an OrganismConfig (e.g. OrganismConfig.demo()); got {type(config).__name__}")
    shipped = shipped_path(config)
    if shipped is not None and not retrain:
        verify(shipped, config)
        return _load(config, shipped, source="shipped")
    path = checkpoint_dir(config, cache_dir)
    if retrain or not path.exists():
        if progress:
            why = ("retraining on request; the shipped weights stay as they are" if shipped_name(config) else
                   "no shipped weights for these settings")
            print(f"training the organism {config.config_hash()} ({why}); it is cached in {path}", file=sys.stderr)
        _build(config, path, progress, replace=retrain)
        return _load(config, path, source="trained")
    return _load(config, path)


def _build(config: OrganismConfig, path: Path, progress: bool, replace: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        train_checkpoint(config, tmp, progress)
        from mu_fast.files import as_new_file

        as_new_file(tmp, recursive=True)  # mkdtemp / safetensors make owner-only files
        if replace and path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            if not path.exists():  # a concurrent build that finished first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(config: OrganismConfig, path: Path, source: str = "cache") -> Organism:
    import transformers
    from transformers import PreTrainedTokenizerFast

    from mu_fast.organism.train import attn_implementation

    missing = [f for f in _REQUIRED if not (path / f).exists()]
    if missing:
        raise ValueError(f"organism checkpoint {path} lacks {missing}; delete the directory to retrain it")
    settings = json.loads((path / SETTINGS_FILE).read_text())
    stored = OrganismConfig.from_dict(settings["config"])
    if settings.get("format") != ORGANISM_FORMAT or (source != "shipped" and stored.config_hash() != path.name):
        raise ValueError(
            f"organism checkpoint {path} holds settings hashing to {stored.config_hash()} (format "
            f"{settings.get('format')}), not to its name; delete the directory to retrain it"
        )
    if stored.config_hash() != config.config_hash():
        raise ValueError(f"organism checkpoint {path} is not the one for {config}; load it with its own settings")
    facts = organism_facts(config)
    if settings.get("facts_digest") != facts_digest(facts):
        raise ValueError(
            f"the facts of the organism in {path} differ from the ones this mu_fast generates for the same settings; "
            "fact generation changed without a bump of ORGANISM_FORMAT. Delete the directory to retrain it"
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation(config)
    )
    report = json.loads((path / REPORT_FILE).read_text())
    return Organism(model.eval(), tokenizer, config, facts, report, path, source)
