"""Evaluation: forget/maintain accuracy in every format, the relearning and soft-prompt attacks, latent-knowledge
probes, general capability through lm-eval.

Importing this package is cheap (torch only); peft is imported when the relearning attack runs, lm-eval when
``capability_eval`` runs.
"""

from mu_fast.evaluate.capability import capability_eval
from mu_fast.evaluate.known_facts import check_known_facts
from mu_fast.evaluate.formats import evaluate_task, evaluate_task_variants, task_prompt_sets, tokenize_task, tokenized_set
from mu_fast.evaluate.metrics import PromptScores, prompt_scores, prompt_scores_variants, set_accuracy
from mu_fast.evaluate.linear_probes import LinearProbes, collect_hidden, stratified_split, train_probes
from mu_fast.evaluate.probes import latent_probes
from mu_fast.evaluate.relearn import relearn_attack, relearn_halves
from mu_fast.evaluate.relearn_variants import relearn_attack_variants
from mu_fast.evaluate.softprompt import SoftPromptAdversaries, softprompt_attack

__all__ = [
    "capability_eval",
    "check_known_facts",
    "LinearProbes",
    "PromptScores",
    "collect_hidden",
    "evaluate_task",
    "evaluate_task_variants",
    "latent_probes",
    "prompt_scores",
    "prompt_scores_variants",
    "relearn_attack",
    "relearn_attack_variants",
    "relearn_halves",
    "set_accuracy",
    "SoftPromptAdversaries",
    "softprompt_attack",
    "stratified_split",
    "task_prompt_sets",
    "tokenize_task",
    "tokenized_set",
    "train_probes",
]
