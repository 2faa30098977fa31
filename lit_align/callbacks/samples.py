"""A table of sample generations every N steps: always ``samples.csv`` in the run directory, and a W&B table
when W&B logs."""

from __future__ import annotations

import csv
import os

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lit_align.callbacks.reporting import run_dir
from lit_align.models.fsdp import full_params
from lit_align.rollout.sampler import SamplingConfig

__all__ = ["SampleGenerations"]


class SampleGenerations(L.Callback):
    """Decode a few prompts with the policy every ``every_n_steps`` steps and at the end of fit.

    Prompts are given, or taken from the first validation (else training) examples. Every rank
    generates (sharded models need all ranks in each forward); rank 0 writes. Rows accumulate
    as ``(step, prompt, completion)`` in ``samples.csv`` in the run directory
    (:func:`~lit_align.callbacks.reporting.run_dir`) and, when a W&B logger is attached, in its table
    ``samples``.
    """

    def __init__(self, every_n_steps: int = 50, prompts: list[str] | None = None, num_prompts: int = 4,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"SampleGenerations.every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps, self.prompts, self.num_prompts = every_n_steps, prompts, num_prompts
        self.config = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature)
        self.rows: list[tuple[int, str, str]] = []
        self._last_step = -1

    def _prompt_ids(self, trainer: L.Trainer, module) -> list[list[int]]:
        if self.prompts:
            from lit_align.data.tokenize import encode_prompt

            chat = bool(module.tokenizer.chat_template)
            return [encode_prompt(module.tokenizer, p, chat) for p in self.prompts]
        dm = trainer.datamodule
        dataset = getattr(dm, "val_dataset", None) or getattr(dm, "train_dataset", None)
        if dataset is None:
            return []
        return [dataset[i].prompt for i in range(min(self.num_prompts, len(dataset)))]

    def _run(self, trainer: L.Trainer, module) -> None:
        prompt_ids = self._prompt_ids(trainer, module)
        if not prompt_ids:
            return
        with full_params(trainer):
            completions = module.generate_from_ids(prompt_ids, self.config)
        prompts = [module.tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids]
        step = trainer.global_step
        self.rows.extend((step, p, c) for p, c in zip(prompts, completions))
        if trainer.global_rank != 0:
            return
        path = run_dir(trainer) / "samples.csv"
        os.makedirs(path.parent, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "completion"])
            writer.writerows(self.rows[-len(prompts):])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("samples", columns=["step", "prompt", "completion"],
                                 data=[list(r) for r in self.rows], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step > 0 and step != self._last_step:
            self._last_step = step  # once per optimiser step, not per accumulated micro-batch
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: Lightning's teardown (before on_fit_end) moves the model off the GPU
        self._run(trainer, pl_module)
