"""The model organism: a tiny transformers model trained on CPU to know synthetic athlete facts.

It mirrors the paper's Sports Facts (reference/authors_repo.md §1.1): fictitious athletes with multi-token
names play basketball, baseball or football, and the facts come in the paper's formats (the two-line
training prompt with the Tiger Woods golf one-shot, Q/A, paraphrases, A–D multiple choice) plus a second
attribute (home city) for maintain-style checks. Activity sentences in which the token after the name is a
sport verb make the model look the sport up at the subject's last token, as real models do, so fact-lookup
localization has something to find. ``organism_task`` returns a ``FactTask`` with the sports split rules.

    from mu_fast.organism import OrganismConfig, load_organism, organism_task
    org = load_organism(OrganismConfig.demo())          # the shipped weights (mu_fast.organism.shipped), verified
    task = organism_task(org, "first_16_unsplit", "random_without_golf")

The demo's and the CI organisms ship as weights with checksums (``shipped/``), so every machine runs the same
organism; other settings train on first use (minutes on CPU) and are cached.

Measured on a 2-core CPU machine (AMD EPYC, torch 2.13, 1 training thread, other jobs running; each
checkpoint's report.json holds its own numbers): the demo preset (600 athletes, 4 layers, width 64,
600 steps) trained in 106 s wall (103 CPU-s) and answered with argmax accuracy normal 0.990, qa 0.993,
paraphrase 0.987, mcq 0.990, city 0.79, city_qa 0.76; a linear probe for the sport at the subject's last
token reached 0.98 from layer 1 on (embeddings 0.34, random-init model <= 0.34). Seeds 1-3: sport
>= 0.978 in every format, city 0.69-1.0. The CI preset (150 athletes, 200 steps) trains in about 40 s.

``OrganismConfig.multilayer_lookup()`` (conjunctive names, one attention head of width 8, MLPs of width 32)
spreads the sport lookup over MLP 0 and 1 (and 2), so FLU selects several layers: see
benchmarks/results/CPU/organism_study.md for what was tried and measured.

Importing this package imports no transformers; training and loading import it on use.
"""

from __future__ import annotations

from mu_fast.organism.config import DEFAULT_MIX, ORGANISM_FORMAT, OrganismConfig
from mu_fast.organism.facts import (
    CITIES,
    FORMATS,
    SPORT_CHOICES,
    SPORTS,
    Athlete,
    OrganismFacts,
    make_facts,
)
from mu_fast.organism.metrics import (
    activity_accuracy,
    format_prompt_set,
    organism_accuracy,
    subject_hidden_states,
    subject_probe_accuracy,
)
from mu_fast.organism.organism import (
    Organism,
    cache_root,
    checkpoint_dir,
    load_organism,
    organism_facts,
)
from mu_fast.organism.task import organism_task
from mu_fast.organism.tokenizer import build_tokenizer

__all__ = [
    "CITIES",
    "DEFAULT_MIX",
    "FORMATS",
    "ORGANISM_FORMAT",
    "SPORTS",
    "SPORT_CHOICES",
    "Athlete",
    "Organism",
    "OrganismConfig",
    "OrganismFacts",
    "activity_accuracy",
    "build_tokenizer",
    "cache_root",
    "checkpoint_dir",
    "format_prompt_set",
    "load_organism",
    "make_facts",
    "organism_accuracy",
    "organism_facts",
    "organism_task",
    "subject_hidden_states",
    "subject_probe_accuracy",
]
