"""Attacks on causal LMs, for adversarial training and robustness evaluation.

Modules:
    embedding  the continuous embedding attack of C-AdvUL / C-AdvIPO (Xhonneux et al. 2024): signed gradient
               descent on a per-token L2-bounded perturbation of the prompt's input embeddings
    gcg        the discrete suffix attack GCG (Zou et al. 2023), an evaluation attack
"""

from lit_align.attacks.embedding import (
    AttackResult,
    EmbeddingAttack,
    attacked_generate,
    embedding_radius,
    left_padded_prompts,
    perturbation_mask,
    perturbed_embeddings,
    transplant,
)
from lit_align.attacks.gcg import GCG, GCGResult, split_template

__all__ = [
    "AttackResult",
    "EmbeddingAttack",
    "GCG",
    "GCGResult",
    "attacked_generate",
    "embedding_radius",
    "left_padded_prompts",
    "perturbation_mask",
    "perturbed_embeddings",
    "split_template",
    "transplant",
]
