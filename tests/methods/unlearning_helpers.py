"""Shared helpers of the unlearning tests: run a config in-process and measure forget/retain NLL."""

from __future__ import annotations

import torch

from lit_align.cli import cli_main
from lit_align.data.tokenize import SequenceCollator
from lit_align.rollout.logps import token_logps


@torch.no_grad()
def set_nll(module, dataset, batch_size: int = 32) -> float:
    """Token-mean NLL of a whole tokenized set's answers under ``module.policy`` (eval mode)."""
    was_training = module.policy.training
    module.policy.eval()
    collate = SequenceCollator(module.tokenizer.pad_token_id)
    total = count = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        out = token_logps(module.policy, batch.input_ids, batch.attention_mask, batch.loss_mask)
        total += float(-(out.logps * out.mask).sum())
        count += float(out.mask.sum())
    module.policy.train(was_training)
    return total / count


def unlearn(config: str, root, *extra: str) -> dict[str, float]:
    """Fit ``config`` (in-process, CSV logs under ``root``) and return forget/retain NLL before and after."""
    cli = cli_main(["--config", config, f"--trainer.default_root_dir={root}", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra], run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    data.tokenizer = module.tokenizer  # set up before the trainer attaches the module
    data.setup("fit")
    module.configure_model()
    before = {"forget": set_nll(module, data.forget_dataset), "retain": set_nll(module, data.retain_dataset)}
    trainer.fit(module, datamodule=data)
    after = {"forget": set_nll(module, data.forget_dataset), "retain": set_nll(module, data.retain_dataset)}
    return {"forget_before": before["forget"], "retain_before": before["retain"],
            "forget_after": after["forget"], "retain_after": after["retain"],
            "d_forget": after["forget"] - before["forget"], "d_retain": after["retain"] - before["retain"],
            "trainer": trainer, "module": module}
