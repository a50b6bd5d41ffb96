"""The organisms mu_fast ships as weights: the demo's and the test suite's, the same on every machine.

Training the organism amplifies float round-off, so CPUs that round differently trained different organisms (an
Intel Xeon and an AMD EPYC gave different FLU selections and another demo table, even with portable kernels). The
demo and CI organisms are therefore trained once and committed under ``shipped/<name>/``:

* ``model.safetensors``, ``config.json``: the weights (float32) and the transformers config;
* ``tokenizer.json`` and its config files: the word-level tokenizer built from the facts;
* ``organism.json``: the ``OrganismConfig``, the facts' generator settings (athletes, cities, seed, conjunctive
  names), the digest of the generated facts, a sha256 of every other file, and how the weights were made (CPU,
  kernels, threads, versions, commit);
* ``report.json``: accuracy per format and the subject probes measured when they were trained.

``load_organism`` loads these whenever the requested settings hash to a shipped organism's, after checking every
checksum and that this mu_fast generates the same facts; it trains only for other settings or on request
(``retrain=True``; ``mu-fast demo --retrain-organism``). ``python -m mu_fast.organism.shipped demo ci`` retrains and
rewrites them (portable kernels, one thread); the tests pin the checksums, so a changed artifact fails CI until the
pins are updated on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from mu_fast.organism.config import OrganismConfig
from mu_fast.organism.facts import facts_digest, organism_facts

SHIPPED_DIR = Path(__file__).with_name("shipped")
# name -> the preset whose settings the shipped weights were trained with.
SHIPPED_PRESETS = ("demo", "ci")
MANIFEST = "organism.json"


def shipped_name(config: OrganismConfig) -> str | None:
    """The name of the shipped organism trained with ``config``'s settings (``threads`` aside), or None."""
    wanted = config.config_hash()
    for name in SHIPPED_PRESETS:
        if getattr(OrganismConfig, name)().config_hash() == wanted:
            return name
    return None


def shipped_path(config: OrganismConfig) -> Path | None:
    """The folder of the shipped weights for ``config``, or None when none are shipped (or the folder is missing)."""
    name = shipped_name(config)
    if name is None:
        return None
    path = SHIPPED_DIR / name
    return path if (path / MANIFEST).is_file() else None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` but the manifest, by file name."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify(folder: Path, config: OrganismConfig) -> dict[str, Any]:
    """The manifest of the shipped organism in ``folder`` after checking it: settings, every file's checksum and
    the facts this mu_fast generates. ``ValueError`` naming the file and the fix otherwise."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"the shipped organism's {folder / MANIFEST} is unreadable ({err}); restore it with "
                         "`git checkout -- mu_fast/organism/shipped`") from None
    if manifest.get("config_hash") != config.config_hash():
        raise ValueError(f"the shipped organism in {folder} was trained with settings hashing to "
                         f"{manifest.get('config_hash')}, not {config.config_hash()}; restore it with "
                         "`git checkout -- mu_fast/organism/shipped` or retrain it (retrain=True)")
    stored = manifest.get("sha256") or {}
    found = checksums(folder)
    if stored != found:
        bad = sorted(k for k in set(stored) | set(found) if stored.get(k) != found.get(k))
        raise ValueError(f"the shipped organism's files {bad} in {folder} do not match the checksums in its "
                         f"{MANIFEST}; restore them with `git checkout -- mu_fast/organism/shipped`")
    if manifest.get("facts_digest") != facts_digest(organism_facts(config)):
        raise ValueError(f"the facts this mu_fast generates for the shipped organism ({folder.name}) differ from the "
                         "ones its weights were trained on; fact generation changed: restore mu_fast/organism/facts.py "
                         "or retrain and re-ship the organism (python -m mu_fast.organism.shipped)")
    return manifest


def ship(name: str, progress: bool = True) -> Path:
    """Train the ``name`` preset's organism (portable kernels, one thread; call before torch is imported) and write
    it to ``shipped/<name>/``, replacing what was there."""
    from mu_fast.determinism import kernel_settings, use_portable_kernels

    portable = use_portable_kernels()
    import torch

    from mu_fast.organism.train import train_checkpoint
    from mu_fast.provenance import provenance_block

    if not portable:
        raise RuntimeError("ship() must choose the portable kernels before torch is imported; run "
                           "`python -m mu_fast.organism.shipped NAME`, which does")
    torch.set_num_threads(1)
    config = getattr(OrganismConfig, name)()
    SHIPPED_DIR.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=SHIPPED_DIR))
    try:
        train_checkpoint(config, tmp, progress)
        facts = organism_facts(config)
        manifest = {
            **json.loads((tmp / MANIFEST).read_text()),  # what the cache's settings file holds, then more
            "name": name, "preset": f"OrganismConfig.{name}()", "config": config.to_dict(),
            "config_hash": config.config_hash(),
            "facts": {"n_athletes": config.n_athletes, "n_cities": config.n_cities, "seed": config.seed,
                      "conjunctive": config.conjunctive, "generator": "mu_fast.organism.facts.make_facts"},
            "facts_digest": facts_digest(facts),
            "trained_with": {"kernels": kernel_settings(), "provenance": provenance_block()},
        }
        manifest["sha256"] = checksums(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        from mu_fast.files import as_new_file

        as_new_file(tmp, recursive=True)
        target = SHIPPED_DIR / name
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    from mu_fast.determinism import PORTABLE_KERNELS, portable_kernels_in_effect

    if not portable_kernels_in_effect():  # the package imported torch first: start again with the kernels chosen
        os.execve(sys.executable, [sys.executable, "-m", "mu_fast.organism.shipped", *sys.argv[1:]],
                  {**os.environ, **PORTABLE_KERNELS})
    for arg in sys.argv[1:] or list(SHIPPED_PRESETS):
        if arg not in SHIPPED_PRESETS:
            raise SystemExit(f"unknown shipped organism {arg!r}; choose from {SHIPPED_PRESETS}")
        print(f"{arg}: written to {ship(arg)}")
