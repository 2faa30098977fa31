"""Attacks on causal LMs, for adversarial training and robustness evaluation.

Modules:
    embedding  the continuous embedding attack of C-AdvUL / C-AdvIPO (Xhonneux et al. 2024): signed gradient
               descent on a per-token L2-bounded perturbation of the prompt's input embeddings
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

__all__ = [
    "AttackResult",
    "EmbeddingAttack",
    "attacked_generate",
    "embedding_radius",
    "left_padded_prompts",
    "perturbation_mask",
    "perturbed_embeddings",
    "transplant",
]
