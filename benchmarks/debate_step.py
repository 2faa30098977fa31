"""Benchmark: where an ACC-Debate phase's time goes, and how fast rewards are estimated.

Workload: ``configs/debate/tiny.yaml``'s module and data with 2 trials, K = 4 rollouts and 16 DPO-validation
questions (the config's own: 1, 2 and 32) (builtin:tiny-debate-base as actor and critic, two LoRA adapters on
one base; 3 rounds, up to 24 new tokens, batches of 16 built-in tiny QA questions), the actor's phase:
``--generate`` generate steps (each: for every trial a natural debate of all 16 questions, one sampler call
per role per round; per round two guided responses per question; the rewards of the natural, toward and away responses by K one-step rollouts, all states
of a round in one call per role) and then ``--dpo`` DPO steps of 8 pairs. The module reports per
generate step ``time/debate``, ``time/guided``, ``time/rewards`` and ``rollouts`` (rollout samples).

Reported: the medians of those phases, ``rollouts_per_s`` (rollout samples over the reward time),
``rewards_share`` (reward estimation over the whole generate step), ``generate_step_ms`` and
``dpo_step_ms``.

Usage: ``python benchmarks/debate_step.py [--generate 3] [--dpo 6] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/debate_step.py`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate", type=int, default=3, help="generate steps (batches of 16 questions)")
    parser.add_argument("--dpo", type=int, default=6, help="DPO steps after them")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    import lightning as L
    import torch
    import yaml

    from lit_align.data.qa import QADataModule
    from lit_align.data.records import DataSource
    from lit_align.methods import DebateModule
    from lit_align.models import LoRASpec, ModelSpec

    torch.set_num_threads(args.threads)
    from benchmarks.debate_gain import tiny_kwargs

    cfg = yaml.safe_load((ROOT / "configs/debate/tiny.yaml").read_text())["model"]["init_args"]
    # the workload the README row measured (tiny.yaml has since moved to 1 trial, K = 2, 32 DPO-validation questions)
    kwargs = tiny_kwargs({"generate.questions_per_phase": 16 * args.generate, "dpo.epochs": 1,
                          "generate.max_pairs": 8 * args.dpo, "generate.trials": 2, "generate.k": 4,
                          "generate.dpo_val_questions": 16})
    actor = ModelSpec(name_or_path=cfg["actor"]["name_or_path"], lora=LoRASpec(**cfg["actor"]["lora"]))
    L.seed_everything(0)
    module = DebateModule(actor=actor, **kwargs)
    data = QADataModule(train=DataSource(path="builtin:tiny_qa"), batch_size=16, val_fraction=0.0)

    rows: list[dict[str, float]] = []

    class Collect(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            rows.append(dict(pl_module.last_step_metrics, stage_was=1.0 if "time/generate" in pl_module.last_step_metrics else 0.0))
            if len([r for r in rows if "time/dpo" in r]) >= args.dpo:
                trainer.should_stop = True

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, limit_val_batches=0,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, callbacks=[Collect()],
                            num_sanity_val_steps=0)
        trainer.fit(module, data)
    generate = [r for r in rows if "time/generate" in r]
    dpo = [r for r in rows if "time/dpo" in r]

    def med(key: str, items: list[dict]) -> float:
        return statistics.median(r[key] for r in items)

    rewards = sum(r["time/rewards"] for r in generate)
    out = {
        "bench": "debate_step", "threads": args.threads, "generate_steps": len(generate), "dpo_steps": len(dpo),
        "questions_per_step": 16, "rounds": module.rounds, "trials": module.generate_cfg.trials, "k": module.generate_cfg.k,
        "debate_ms": round(1000 * med("time/debate", generate), 1),
        "guided_ms": round(1000 * med("time/guided", generate), 1),
        "rewards_ms": round(1000 * med("time/rewards", generate), 1),
        "generate_step_ms": round(1000 * med("time/generate", generate), 1),
        "rollouts_per_step": med("rollouts", generate),
        "rollouts_per_s": round(sum(r["rollouts"] for r in generate) / rewards, 1) if rewards else None,
        "rewards_share": round(rewards / sum(r["time/generate"] for r in generate), 3),
        "dpo_step_ms": round(1000 * med("time/dpo", dpo), 1) if dpo else None,
        "pairs": module.pair_counts[:1],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
