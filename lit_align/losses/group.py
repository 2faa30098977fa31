"""Critic-free advantages from groups of samples of one prompt: RLOO and GRPO.

Both take ``rewards`` of shape (B * k,): the k samples of each of B prompts contiguous (rows ``g k`` to
``g k + k - 1`` answer prompt ``g``), and return (B * k,) sequence advantages, one per sample, that the
policy loss broadcasts over the sample's tokens.

* **RLOO** (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
  Human Feedback in LLMs", arXiv 2402.14740, eq. 6): each sample's baseline is the mean reward of the
  *other* k - 1 samples of its prompt, ``A_i = r_i - (sum_j r_j - r_i) / (k - 1)``, which equals
  ``k / (k - 1) (r_i - mean_j r_j)``: unbiased, since the baseline does not depend on the sample itself.
* **GRPO** (Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300, sec. 4.1.2, outcome supervision):
  ``A_i = (r_i - mean_j r_j) / (std_j r_j + eps)``, the std the sample std of the group (``n - 1``), as TRL
  computes it; ``scale_by_std=False`` keeps only the mean baseline (Liu et al. 2025, "Understanding
  R1-Zero-Like Training", arXiv 2503.20783, "Dr. GRPO", which argues the std scaling biases towards
  groups of near-equal reward).
"""

from __future__ import annotations

from torch import Tensor

from lit_align.errors import ConfigError

__all__ = ["grpo_advantages", "rloo_advantages"]


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B * k,) -> (B, k), checking the shape and the group size."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ConfigError(f"group_size (samples per prompt) must be an int >= 2 for a group baseline, got "
                          f"{group_size!r}: one sample has no other sample to compare with")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be (B * k,) with each prompt's k = {group_size} samples contiguous, got "
                         f"shape {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages: each reward minus the mean of the other samples of its prompt.

    Hand check, one prompt, k = 3, ``r = [1, 2, 6]``: the baselines are ``(2 + 6) / 2 = 4``, ``(1 + 6) / 2 =
    3.5`` and ``(1 + 2) / 2 = 1.5``, so ``A = [-3, -1.5, 4.5]`` (= 3/2 * (r - 3)).

    Args:
        rewards: (B * k,) sequence rewards, each prompt's k samples contiguous.
        group_size: k >= 2.

    Returns:
        (B * k,) float advantages (they sum to 0 within each group).
    """
    r = _groups(rewards, group_size)  # (B, k)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # (B, k) mean of the others
    return (r - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, group_size: int, *, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-normalised advantages.

    Hand check, one prompt, k = 3, ``r = [1, 2, 6]``: mean 3, sample std ``sqrt((4 + 1 + 9) / 2) = sqrt(7)``,
    so ``A = [-2, -1, 3] / (sqrt(7) + eps)``; with ``scale_by_std=False``, ``A = [-2, -1, 3]``. A group whose
    rewards are all equal gets ``A = 0`` either way.

    Args:
        rewards: (B * k,) sequence rewards, each prompt's k samples contiguous.
        group_size: k >= 2.
        scale_by_std: divide by the group's sample std plus ``eps`` (GRPO); False: the mean baseline alone.
        eps: added to the std.

    Returns:
        (B * k,) float advantages.
    """
    if not eps > 0:
        raise ConfigError(f"eps must be positive, got {eps}")
    r = _groups(rewards, group_size)  # (B, k)
    centred = r - r.mean(-1, keepdim=True)  # (B, k)
    if scale_by_std:
        centred = centred / (r.std(-1, keepdim=True) + eps)  # unbiased (n - 1) std
    return centred.reshape(-1)
