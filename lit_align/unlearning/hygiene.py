"""Method hygiene (others.md §11.1 F): which weights an unlearning run changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["named_weights", "parameter_changes"]


def named_weights(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s parameters by name, each shared (tied) tensor once and no buffers (``named_parameters()``)."""
    return {name: p.detach() for name, p in model.named_parameters()}


def parameter_changes(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, Any]:
    """Which weights differ between two ``{name: tensor}`` maps (give :func:`named_weights` of both models, so
    tied weights count once and buffers not at all).

    Returns ``changed_tensors``, ``changed_parameters`` (elements not bit-identical; a tensor whose shape changed,
    e.g. a resized embedding, counts as wholly changed), ``total_parameters`` (of ``after``), ``changed_share``,
    ``modules_touched`` (names of the changed or added tensors less their last part), ``lora_only`` (every changed
    or added tensor is a LoRA tensor), ``reshaped`` / ``added`` / ``removed`` (names whose shape changed, or that
    only one of the two has, e.g. adapters).
    """
    changed_names, reshaped, changed, total = [], [], 0, 0
    for name, value in after.items():
        total += value.numel()
        old = before.get(name)
        if old is None:
            continue
        if old.shape != value.shape:
            reshaped.append(name)
            changed_names.append(name)
            changed += value.numel()
            continue
        diff = int((old.to(value.device) != value).sum())
        if diff:
            changed_names.append(name)
            changed += diff
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    touched = sorted({n.rsplit(".", 1)[0] for n in [*changed_names, *added]})
    lora = [*changed_names, *added]
    return {"changed_tensors": len(changed_names), "changed_parameters": changed, "total_parameters": total,
            "changed_share": changed / total if total else 0.0, "modules_touched": touched,
            "lora_only": bool(lora) and all("lora_" in n for n in lora), "reshaped": sorted(reshaped),
            "added": added, "removed": removed}
