"""Settings of the model organism: what facts it holds, the model that learns them and how it is trained.

Every field but ``threads`` changes the trained checkpoint, so it goes into ``config_hash()``, which names
the cache directory. ``ORGANISM_FORMAT`` is hashed too: bump it whenever fact generation, the tokenizer or
the training recipe change meaning, so stale checkpoints are never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

# Bumped whenever the generated facts, the tokenizer or the training recipe change what a config produces.
ORGANISM_FORMAT = 1
# A checkpoint's settings (config, its hash, the facts' digest) and accuracy report, beside the model and tokenizer.
SETTINGS_FILE = "organism.json"
REPORT_FILE = "report.json"

ARCHS = ("llama", "gemma", "gemma2")
# Length of facts.CITIES (kept here so this module imports nothing).
MAX_CITIES = 8

# Share of each training batch per pool (normalised in training). Fact formats are supervised at the answer
# token only. "activity": sentences in which the token after the name is a sport verb, which makes the
# model look the sport up at the subject's last token; "city_activity": roster lines in which the token
# after the name is the home city; "filler": generic text for a general LM loss. Measured (1 CPU thread,
# demo preset, seeds 0-3): at this share the sport reached >= 0.978 argmax accuracy in every format and the
# city 0.69-1.0; at 1.5x the city share the city reached 1.0 but the sport stalled below 0.9 for seed 1 and
# the CI organism's MCQ at 0.69 (the attribute learned first delays the other).
DEFAULT_MIX: dict[str, float] = {
    "normal": 2.5,
    "qa": 1.0,
    "paraphrase": 1.5,
    "mcq": 1.0,
    "city": 1.0,
    "city_qa": 0.5,
    "activity": 3.0,
    "city_activity": 1.0,
    "filler": 0.5,
}


@dataclass(frozen=True)
class OrganismConfig:
    """A synthetic-facts model organism: facts (``n_athletes`` from ``seed``), model shape and training recipe.

    arch: "llama" | "gemma" | "gemma2" (transformers config class). d_model / d_mlp / n_heads / n_kv_heads /
    head_dim (``None``: d_model // n_heads) / n_layers: the model shape. n_cities: classes of the second
    attribute (home city, shared by a family name). conjunctive: sports balanced within every name part, so
    only the whole name predicts the sport (see ``facts.make_facts``; needs more steps). Training: ``steps`` AdamW steps of ``batch_size``
    sequences at peak ``lr`` (linear warm-up over ``warmup_frac`` of the steps, cosine decay to
    ``lr * final_lr_frac``), gradient-norm clip 1.0. Curriculum: during the first ``curriculum_frac`` of the
    steps athletes are drawn from a prefix of the list that grows linearly from ``curriculum_start`` of
    them to all (the first facts form the lookup mechanism sooner). ``mix``: batch share per training pool
    (see ``DEFAULT_MIX``). ``threads``: torch CPU threads while training (0: leave torch's setting). The
    default is 1: on 2 idle cores 2 threads trained the CI organism only about 1.2x faster (34 s vs about
    40 s), while on a loaded 2-core machine (load average 3-4) the demo training with 2 threads had not
    finished after 11 minutes where 1 thread took 106 s (OpenMP threads wait for each other at every op).
    Not hashed: it changes only speed (and, in principle, float summation order).
    """

    arch: str = "llama"
    n_athletes: int = 600
    n_cities: int = 4
    conjunctive: bool = False
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int | None = None
    d_mlp: int = 256
    seed: int = 0
    steps: int = 600
    batch_size: int = 96
    lr: float = 5e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.05
    curriculum_frac: float = 0.3
    curriculum_start: float = 0.1
    mix: tuple[tuple[str, float], ...] = field(default_factory=lambda: tuple(DEFAULT_MIX.items()))
    threads: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"OrganismConfig.arch must be one of {ARCHS}; got {self.arch!r}")
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"OrganismConfig.{name} must be a positive integer; got {value!r}")
        if not isinstance(self.n_athletes, int) or self.n_athletes < 20:
            raise ValueError(f"OrganismConfig.n_athletes={self.n_athletes!r}: use an integer >= 20 (the splits need it)")
        if not 2 <= self.n_cities <= MAX_CITIES:
            raise ValueError(f"OrganismConfig.n_cities must be in 2..{MAX_CITIES}; got {self.n_cities}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (GQA groups)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if not 0.0 < self.lr < 1.0:
            raise ValueError(f"OrganismConfig.lr must be in (0, 1); got {self.lr}")
        for name in ("warmup_frac", "final_lr_frac", "curriculum_frac", "curriculum_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"OrganismConfig.{name} must be in [0, 1]; got {getattr(self, name)}")
        if isinstance(self.mix, dict):  # accept a plain dict; store it hashable and in a fixed order
            object.__setattr__(self, "mix", tuple(self.mix.items()))
        mix = dict(self.mix)
        unknown = sorted(set(mix) - set(DEFAULT_MIX))
        if unknown:
            raise ValueError(f"OrganismConfig.mix has unknown pools {unknown}; known pools are {sorted(DEFAULT_MIX)}")
        if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"OrganismConfig.mix needs non-negative shares with a positive sum; got {mix}")

    # ------------------------------------------------------------- presets
    @classmethod
    def demo(cls, **overrides: Any) -> OrganismConfig:
        """The `make demo` organism: ``multilayer_lookup()`` (600 athletes with conjunctive names, 4 layers of one
        attention head of width 8 and MLPs of width 32), whose sport lookup at the subject's last token spans MLPs
        0-2 (benchmarks/results/CPU/organism_study.md); about 70-100 CPU seconds to train. The earlier demo
        organism (one MLP finished the lookup) is ``OrganismConfig()``."""
        return cls.multilayer_lookup(**overrides)

    @classmethod
    def ci(cls, **overrides: Any) -> OrganismConfig:
        """The test-suite organism: 150 athletes, 4 layers of width 64; about 35-45 s on 2 CPU cores."""
        settings: dict[str, Any] = dict(n_athletes=150, steps=200, curriculum_frac=0.0, final_lr_frac=0.3)
        settings.update(overrides)
        return cls(**settings)

    @classmethod
    def multilayer_lookup(cls, **overrides: Any) -> OrganismConfig:
        """An organism whose sport lookup at the subject's last token spans several MLP layers (issue 13).

        Conjunctive names (only first and family name together predict the sport), one attention head of width 8
        and MLPs of width 32 in each of 4 layers, 800 steps: no single attention or MLP block can finish the
        whole-name lookup, so FLU's probe rises over MLP 0 and MLP 1 (and 2). Measured in
        benchmarks/results/CPU/organism_study.md (native kernels, 1 thread): seeds 0 and 2 meet the criteria
        (FLU MLP layers [0, 1, 2] and [0, 1]; every format >= 0.99; 65-68 CPU-s, faster than the demo preset's
        117); with seed 1's facts MLP 0 alone reaches 0.94 and FLU selects only it.
        """
        settings: dict[str, Any] = dict(conjunctive=True, steps=800, n_heads=1, n_kv_heads=1, head_dim=8, d_mlp=32)
        settings.update(overrides)
        return cls(**settings)

    # ------------------------------------------------------------- identity
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mix"] = dict(self.mix)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrganismConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OrganismConfig fields {unknown}; the file was written by another mu_fast version")
        return cls(**data)

    def config_hash(self) -> str:
        """16 hex digits identifying the checkpoint these settings produce (``threads`` excluded)."""
        data = self.to_dict()
        data.pop("threads")
        payload = json.dumps({"format": ORGANISM_FORMAT, "config": data}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]
