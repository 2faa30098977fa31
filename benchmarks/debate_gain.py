"""Benchmark: does ACC-Collab training improve the tiny debate team on held-out questions?

Workload: ``configs/debate/tiny.yaml``'s module (builtin:tiny-debate-base as actor and critic, two LoRA
adapters on one base, 3 rounds), trained for one iteration (actor phase, then critic phase) on the
``builtin:tiny_qa`` training questions, with the overrides below. Then four teams debate the 80 held-out
``builtin:tiny_qa/val`` questions ``--repeats`` times each (seeded; every team sees the same draws):

* untrained: the base as both players (the adapters off);
* trained actor + untrained critic, and untrained actor + trained critic (the paper's Table 2 ablation);
* trained: both trained players.

Reported: accuracy after each round for each team (the mean over repeats, with the 95% interval
1.96 * std / sqrt(repeats) of the per-repeat final-round accuracies, as the reference code's
``display_acc``), the final-round gain of the trained team over the untrained one, the pairs each
phase built and the wall time. For each phase, ``phases`` says which way its pairs point (chosen right
and rejected wrong, the reverse, or neither) and how its DPO went: the loss on the DPO-validation pairs
at each evaluation, and the steps taken before early stopping.

Usage: ``python benchmarks/debate_gain.py [--questions 160] [--repeats 16] [--pair-rule paper] [--lr 1e-3]
[--set generate.trials=2]``
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/debate_gain.py`


def tiny_kwargs(overrides: dict[str, object] = ()) -> dict:
    """``configs/debate/tiny.yaml``'s ``DebateModule`` arguments (but ``actor``), as the CLI would build them, with
    ``overrides`` by dotted key (``generate.trials``, ``dpo.epochs``, ``lr``: both players' learning rate)."""
    import yaml

    from lit_align.engine import Optimization

    cfg = yaml.safe_load((ROOT / "configs/debate/tiny.yaml").read_text())["model"]["init_args"]
    kwargs = {k: v for k, v in cfg.items() if k != "actor"}
    for key, value in dict(overrides).items():
        if key == "lr":
            for block in kwargs["optimization"].values():
                block["optimizer"]["init_args"]["lr"] = value
            continue
        *path, last = key.split(".")
        target = kwargs
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    optimization = {}
    for player, block in kwargs["optimization"].items():
        block = dict(block)
        spec = block.pop("optimizer", None)
        if spec is not None:  # a class_path optimiser, as jsonargparse would make it
            module, _, name = spec["class_path"].rpartition(".")
            block["optimizer"] = functools.partial(getattr(importlib.import_module(module), name),
                                                   **spec.get("init_args", {}))
        optimization[player] = Optimization(**block)
    kwargs["optimization"] = optimization
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=None, help="questions_per_phase (default: the config's)")
    parser.add_argument("--val-questions", type=int, default=None, help="dpo_val_questions (default: the config's)")
    parser.add_argument("--pair-rule", choices=("paper", "code"), default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--dpo-epochs", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=16, help="debates per held-out question per team")
    parser.add_argument("--base", default=None, help="the base model (default: the config's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other DebateModule argument, the value read as YAML (repeatable)")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    import lightning as L
    import torch
    import yaml

    from lit_align.data.qa import QADataModule, load_qa
    from lit_align.data.records import DataSource
    from lit_align.debate.protocol import accuracy_by_round, extract_answer
    from lit_align.methods import DebateModule
    from lit_align.models import LoRASpec, ModelSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((ROOT / "configs/debate/tiny.yaml").read_text())["model"]["init_args"]
    rules = {"paper": {"class_path": "lit_align.debate.rules.PaperRule", "init_args": {"epsilon": 0.25}},
             "code": {"class_path": "lit_align.debate.rules.CodeRule"}}
    overrides = {k: v for k, v in (("generate.questions_per_phase", args.questions),
                                   ("generate.dpo_val_questions", args.val_questions),
                                   ("pair_rule", rules.get(args.pair_rule)), ("lr", args.lr),
                                   ("dpo.epochs", args.dpo_epochs)) if v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        top = key.split(".")[0]
        if not sep or (top not in cfg and top not in ("critic", "share_base", "reference", "iterations", "order",
                                                       "sample_seed", "lr")):
            parser.error(f"--set {item!r}: give KEY=VALUE with KEY a DebateModule argument (dotted: generate.trials)")
        overrides[key] = yaml.safe_load(value)
    kwargs = tiny_kwargs(overrides)
    actor = ModelSpec(name_or_path=args.base or cfg["actor"]["name_or_path"], lora=LoRASpec(**cfg["actor"]["lora"]))
    class PhaseReport(L.Callback):
        """Per phase: the direction of its pairs, then each DPO-validation loss and the steps taken."""

        def __init__(self) -> None:
            self.phases: dict[str, dict] = {}
            self.batch: tuple[str, str] | None = None  # (phase, player) of the DPO batch in flight
            self.seen: dict[str, float] = {}  # callback_metrics keeps old values: the last one read per key

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batch = None
            if pl_module.phase_state.stage != "train" or pl_module.current is None:
                return
            iteration, player = pl_module.current
            name = f"{iteration}/{player}"
            if name not in self.phases:  # the first DPO batch: the generate stage has just built the pairs
                by_index = {e.index: e for e in trainer.datamodule.examples("train")}
                ways = Counter()
                for pair in pl_module.phase_state.pairs:
                    ex = by_index[pair.question_index]
                    chosen, rejected = (extract_answer(t, ex) == ex.answer for t in (pair.chosen, pair.rejected))
                    ways["right_over_wrong" if chosen and not rejected else
                         "wrong_over_right" if rejected and not chosen else "neither"] += 1
                self.phases[name] = {"pairs": dict(ways), "val_loss": []}
            self.batch = (name, player)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.batch is None:
                return
            name, player = self.batch
            for key in ("val_loss", "dpo_steps"):
                value = trainer.callback_metrics.get(f"train/{player}/{key}")
                if value is None or round(float(value), 4) == self.seen.get(f"{player}/{key}"):
                    continue
                self.seen[f"{player}/{key}"] = round(float(value), 4)
                if key == "val_loss":
                    self.phases[name]["val_loss"].append(round(float(value), 4))
                else:
                    self.phases[name]["dpo_steps"] = int(value)

    report = PhaseReport()
    L.seed_everything(0)
    module = DebateModule(actor=actor, **kwargs)
    data = QADataModule(train=DataSource(path="builtin:tiny_qa"), batch_size=16, val_fraction=0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        L.Trainer(max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                  callbacks=[report]).fit(module, data)
    train_s = time.perf_counter() - start

    val = load_qa(DataSource(path="builtin:tiny_qa/val"))
    teams = {
        "untrained": (module.initial_agent("actor"), module.initial_agent("critic")),
        "trained_actor": (module.agent("actor"), module.initial_agent("critic")),
        "trained_critic": (module.initial_agent("actor"), module.agent("critic")),
        "trained": (module.agent("actor"), module.agent("critic")),
    }
    results: dict[str, dict] = {}
    module.eval()
    with torch.no_grad():
        for name, (actor_agent, critic_agent) in teams.items():
            per_repeat = []
            for repeat in range(args.repeats):
                generator = torch.Generator().manual_seed(1000 + repeat)
                transcripts = module.debate(val, generator, actor_agent, critic_agent)
                per_repeat.append(accuracy_by_round(transcripts))
            by_round = [statistics.fmean(r[t] for r in per_repeat) for t in range(module.rounds)]
            finals = [r[-1] for r in per_repeat]
            ci = 1.96 * statistics.stdev(finals) / len(finals) ** 0.5 if len(finals) > 1 else float("nan")
            results[name] = {"accuracy_by_round": [round(a, 4) for a in by_round], "final": round(by_round[-1], 4),
                             "final_ci95": round(ci, 4)}
    out = {
        "bench": "debate_gain",
        "teams": results,
        "gain": round(results["trained"]["final"] - results["untrained"]["final"], 4),
        "round0_gain": round(results["trained"]["accuracy_by_round"][0] - results["untrained"]["accuracy_by_round"][0], 4),
        "pairs": module.pair_counts,
        "phases": report.phases,
        "questions_per_phase": module.generate_cfg.questions_per_phase,
        "dpo_val_questions": module.generate_cfg.dpo_val_questions,
        "pair_rule": repr(module.pair_rule),
        "val_questions": len(val),
        "repeats": args.repeats,
        "train_seconds": round(train_s, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
