"""Update only a chosen subset of weights: WAGLE's mask, applied to any unlearning configuration.

WAGLE (Jia et al., NeurIPS 2024, arXiv 2410.17509) scores every weight of the starting model
(:mod:`lit_align.unlearning.attribution`), keeps the top ``ratio`` fraction
(:class:`~lit_align.unlearning.masks.ParameterMask`) and runs an unlearning method while only
those weights are updated. Per optimiser step, in the reference order:

1. gradients are accumulated (Lightning);
2. gradients are clipped with the **full** global norm (all weights, masked ones included), using
   the trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm``;
3. ``grad *= mask``;
4. the optimiser steps.

**Why this callback takes clipping over from the trainer.** Lightning 2.6 calls the callbacks'
``on_before_optimizer_step`` *before* its own clipping (``Precision._after_closure``), so the
callback clips and masks there. Letting Lightning clip again afterwards is *not* an exact no-op:
``clip_grad_norm_`` scales by ``min(1, max_norm / (norm + 1e-6))``, and after one clip the norm is
``max_norm * norm / (norm + 1e-6)``, which makes the second coefficient ``< 1`` by about
``1e-6 / max_norm`` whenever the first clip was active (unless the mask removed enough of the
norm). So for the duration of ``fit`` the callback keeps the clipping settings to itself and sets
``trainer.gradient_clip_val`` to ``None`` (restored at teardown); the module's
``configure_gradient_clipping`` is still what clips, called by the callback with the trainer's values.

**Weight decay.** AdamW's decay is decoupled from the gradient, so with ``strict=False`` (the
reference behaviour) masked-out weights still shrink by ``(1 - lr * wd)`` per step. ``strict=True``
keeps a copy of only the masked-out entries and writes them back after every optimiser step
(an optimiser step post-hook), so they stay bit-identical to the starting weights.

**When the mask is made.** At ``on_train_start``: before any optimiser step, and after every
checkpoint restore (``ModelParallelStrategy`` restores after ``on_fit_start``). A fresh run scores
the starting weights (or loads ``path``) and saves the mask; a resumed run reloads the mask named
in the checkpoint (its file and SHA-256 are kept in this callback's state) instead of scoring the
trained weights.

Attribution data: ``trainer.datamodule.attribution_loaders(num_replicas, rank, batch_size)``, keys
``forget`` / ``refusal`` (the forget target: the module's ``forget_term.target``; ``refusal`` = PO,
whose attribution uses the refusal answers) and ``retain``.

Other models (classifiers): a module that is not a causal-LM policy provides two hooks instead.
``weight_mask_model() -> nn.Module`` names the network whose weights are masked (default: ``policy``), and
``attribution_gradients(part) -> {name: gradient}`` (``part`` is ``"forget"`` or ``"retain"``) gives that
network's loss gradients summed over the part's rows at the current weights; when it exists the data
module's ``attribution_loaders`` is not used. SalUn's saliency mask (Fan et al., ICLR 2024) is then
``method: gradient`` (``|g_f|``) with ``ratio: 0.5`` on
:class:`~lit_align.methods.ClassifierUnlearningModule`.

Works under DDP (gradients summed over ranks; every rank holds the full mask) and FSDP2 (the mask
sharded like each parameter). A peft/LoRA policy is refused: the mask addresses base weights.

Example (YAML)::

    trainer:
      gradient_clip_val: 1.0
      callbacks:
        - class_path: lit_align.callbacks.WeightMask
          init_args: {method: wagle, ratio: 0.95, gamma: 1.0e-6}
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lit_align.unlearning.attribution import METHODS, AttributionMethod, accumulate_gradients, attribution_scores
from lit_align.unlearning.masks import ParameterMask, local_tensor, model_signature

__all__ = ["WeightMask"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class WeightMask(L.Callback):
    """Restrict unlearning updates to a weight mask (WAGLE or a baseline), see the module docstring."""

    def __init__(
        self,
        path: str | None = None,
        method: AttributionMethod = "wagle",
        ratio: float = 0.95,
        gamma: float = 1e-6,
        save_to: str | None = None,
        strict: bool = False,
        batch_size: int = 4,
        seed: int = 0,
        chunk_tokens: int | None = None,
    ) -> None:
        """
        Args:
            path: a saved mask to load (``ParameterMask.save``); then nothing is scored and ``method``,
                ``ratio`` and ``gamma`` are ignored.
            method: attribution when no ``path``: ``wagle`` ``|(theta - g_r/gamma) g_f|``, ``random``,
                ``magnitude`` ``|theta|``, ``gradient`` ``|g_f|``, ``snip`` ``|theta g_f|``.
            ratio: fraction of weights updated (the reference configs: TOFU 0.95 GradDiff/NPO, 0.8 PO;
                WMDP 0.4 GradDiff, 0.6 NPO).
            gamma: the retain-Hessian scalar; the reference configs' ``mu`` (1e-6), taken as is.
            save_to: where a computed mask is written; default
                ``<default_root_dir>/weight_mask/<method>_<ratio>.pt``.
            strict: False = the reference behaviour (AdamW's decoupled weight decay still shrinks
                masked-out weights); True = masked-out weights are restored bit-identically after every step.
            batch_size: examples per attribution batch (memory only: gradients are summed). Attribution
                runs with dropout off (``eval()``), which in HF models also turns activation
                checkpointing off: lower this for large models.
            seed: of the ``random`` baseline.
            chunk_tokens: LM-head chunk size in the attribution pass (memory only).
        """
        if method not in METHODS:
            raise ValueError(f"WeightMask.method must be one of {list(METHODS)}, got {method!r}")
        if path is None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"WeightMask.ratio is the fraction of weights updated, in [0, 1]; got {ratio}")
        if method == "wagle" and path is None and not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"WeightMask.gamma (the retain-Hessian scalar, the reference configs' mu = 1e-6) must be "
                             f"> 0, got {gamma!r}")
        if batch_size <= 0:
            raise ValueError(f"WeightMask.batch_size must be positive, got {batch_size}")
        self.path, self.method, self.ratio, self.gamma = path, method, ratio, gamma
        self.save_to, self.strict, self.batch_size, self.seed = save_to, strict, batch_size, seed
        self.chunk_tokens = chunk_tokens
        self.mask: ParameterMask | None = None
        self.mask_path: Path | None = None
        self._density: float | None = None
        self._sha: str | None = None
        self._restored: dict | None = None
        self._clip: tuple | None = None
        self._frozen: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _masked_model(pl_module: L.LightningModule) -> nn.Module | None:
        """The network whose weights are masked: ``pl_module.weight_mask_model()`` when the module has that hook,
        else its ``policy`` (the causal LM)."""
        hook = getattr(pl_module, "weight_mask_model", None)
        return hook() if callable(hook) else getattr(pl_module, "policy", None)

    @classmethod
    def _policy(cls, pl_module: L.LightningModule) -> nn.Module:
        policy = cls._masked_model(pl_module)
        if policy is None:
            raise AttributeError(f"WeightMask needs a module with a `policy` (the causal LM) or a `weight_mask_model()` "
                                 f"hook; {type(pl_module).__name__} has neither")
        if hasattr(policy, "peft_config") or any("lora_" in n for n, _ in policy.named_parameters()):
            raise ValueError("WeightMask addresses the base model's weights, but the policy is a peft/LoRA model "
                             "(model.lora is set). Remove model.lora to mask full weights, or drop the WeightMask callback.")
        return policy

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._policy(pl_module)  # refuse LoRA before anything runs
        if self.path is None and self._restored is None and self.method in ("wagle", "gradient", "snip"):
            if not hasattr(pl_module, "attribution_gradients") and not hasattr(trainer.datamodule, "attribution_loaders"):
                raise TypeError(f"WeightMask(method={self.method!r}) scores weights on the forget/retain sets, read from "
                                f"trainer.datamodule.attribution_loaders(...); {type(trainer.datamodule).__name__} has no "
                                "such method. Use a ForgetRetainDataModule, or pass WeightMask(path=...) to load a mask.")
        # take clipping over (see module docstring): clip with the full norm, then mask
        self._clip = (trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        trainer.gradient_clip_val, trainer.gradient_clip_algorithm = None, None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._clip is not None:
            trainer.gradient_clip_val, trainer.gradient_clip_algorithm = self._clip
            self._clip = None
        for h in self._hooks:
            h.remove()
        self._hooks, self._frozen = [], {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = self._policy(pl_module)
        if self._restored is not None:  # resumed: the mask of the first run, never re-scored on trained weights
            path = Path(self._restored["path"])
            if not path.is_file():
                raise FileNotFoundError(f"the checkpoint's weight mask {path} is missing; restore it, or start a new run")
            if _sha256(path) != self._restored["sha256"]:
                raise ValueError(f"weight mask {path} changed since the checkpoint was written (SHA-256 differs)")
            self.mask, self.mask_path = ParameterMask.load(path, policy), path
        elif self.path is not None:
            self.mask, self.mask_path = ParameterMask.load(self.path, policy), Path(self.path)
        else:
            self.mask = self._compute(trainer, pl_module, policy)
            self.mask_path = Path(self.save_to or Path(trainer.default_root_dir) / "weight_mask" / f"{self.method}_{self.ratio}.pt")
            self.mask.save(self.mask_path)  # collective when sharded; rank 0 writes
        # the mask file is assumed on a filesystem every rank sees (as checkpoints are)
        self._sha = trainer.strategy.broadcast(_sha256(self.mask_path) if trainer.is_global_zero else None)
        self._density = self.mask.density()
        if self.strict:
            self._keep_frozen(policy)
            for opt in trainer.optimizers:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self._restore_frozen(policy)))

    def _compute(self, trainer: L.Trainer, pl_module: L.LightningModule, policy: nn.Module) -> ParameterMask:
        g_f = g_r = None
        if self.method in ("wagle", "gradient", "snip") and hasattr(pl_module, "attribution_gradients"):
            g_f = pl_module.attribution_gradients("forget")  # the module's own loss, summed over the part
            g_r = pl_module.attribution_gradients("retain") if self.method == "wagle" else None
        elif self.method in ("wagle", "gradient", "snip"):
            loaders = trainer.datamodule.attribution_loaders(num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                             batch_size=self.batch_size)
            target = getattr(getattr(pl_module, "forget_term", None), "target", "forget")
            if target not in ("forget", "refusal"):
                raise ValueError(f"WeightMask scores the forget objective; forget_term.target is {target!r}, "
                                 "expected 'forget' or 'refusal'")
            if loaders.get(target) is None:
                raise ValueError(f"attribution_loaders() gave no {target!r} set, needed for the forget gradient"
                                 + ("; set data.refusals to a non-empty list" if target == "refusal" else ""))
            with trainer.precision_plugin.forward_context():  # the run's numerics (bf16 autocast under bf16-mixed)
                g_f = accumulate_gradients(policy, loaders[target], chunk_tokens=self.chunk_tokens)
                if self.method == "wagle":
                    if loaders.get("retain") is None:
                        raise ValueError("WeightMask(method='wagle') needs a retain set (the retain gradient); "
                                         "configure data.retain, or choose method: snip")
                    g_r = accumulate_gradients(policy, loaders["retain"], chunk_tokens=self.chunk_tokens)
        scores = attribution_scores(policy, g_f, g_r, method=self.method, gamma=self.gamma, seed=self.seed)
        del g_f, g_r
        return ParameterMask.select_top(scores, self.ratio, method=self.method, signature=model_signature(policy))

    # -- strict freezing ---------------------------------------------------------------------
    @torch.no_grad()
    def _keep_frozen(self, policy: nn.Module) -> None:
        self._frozen = {}
        for name, p in policy.named_parameters():
            if name in self.mask:
                self._frozen[name] = local_tensor(p.detach())[~local_tensor(self.mask[name])].clone()

    @torch.no_grad()
    def _restore_frozen(self, policy: nn.Module) -> None:
        for name, p in policy.named_parameters():
            kept = self._frozen.get(name)
            if kept is not None and kept.numel():
                local = local_tensor(p.detach())
                local.masked_scatter_(~local_tensor(self.mask[name]), kept)

    # -- every step --------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.mask is None:
            raise RuntimeError("WeightMask: an optimiser step before on_train_start made the mask")
        clip_val, clip_algorithm = self._clip or (None, None)
        if clip_val:
            pl_module.configure_gradient_clipping(optimizer, gradient_clip_val=clip_val,
                                                  gradient_clip_algorithm=clip_algorithm)
        self.mask.mask_gradients_(self._masked_model(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._density is not None:
            pl_module.log("train/mask_density", self._density, on_step=True, on_epoch=False)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.mask_path is None:
            return {}
        return {"path": str(self.mask_path.resolve()), "sha256": self._sha, "ratio": self.mask.ratio,
                "method": self.mask.method}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) if state_dict.get("path") else None
