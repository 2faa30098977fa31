"""Benchmark: one online DPO step of lit_align vs TRL 1.16's experimental ``OnlineDPOTrainer``.

The setup (issue 17, "Performance"): a tiny Qwen2-shaped policy (hidden 64, 2 layers, the bundled tiny tokenizer)
and a tiny Qwen2-shaped sequence-classification reward model (hidden 32, one label, random head), each built once
and saved with ``save_pretrained`` into a temporary directory that both sides load; the built-in seed prompts
(``builtin:seed_prompts``, in order) rendered ``"Human: {p}\\nAI:"``, 8 per step; 2 completions each of at most 32
new tokens sampled at temperature 1 (no top-k/top-p); the reward model picks chosen (higher score) and rejected;
sigmoid DPO (beta 0.1) against a frozen reference copy; one AdamW update per step (lr 1e-6, gradient norm clipped
at 1); full fine-tuning.

* lit_align: ``OnlineDPOModule.training_step`` in a real ``lightning.Trainer`` (``configs/online_dpo/tiny.yaml`` on
  the saved models, see :func:`lit_align_config`: a ``RewardRanker`` over ``ModelReward``, no dataset responses),
  each batch timed from ``on_train_batch_start`` to ``on_train_batch_end``.
* TRL: ``trl.experimental.online_dpo.OnlineDPOTrainer`` with the reward model as ``reward_funcs``, each step timed
  between its ``on_step_begin`` and ``on_step_end`` callbacks.

Equal: the generation (2 x 8 rows, KV cache), the reward forward over the 16 completions, one policy forward +
backward and one reference forward over chosen and rejected (16 rows), one optimiser step. Not equal: who
generates. TRL's online DPO generates with the *current* policy; lit_align's with the start-of-iteration policy
(the frozen reference), as the iterative method (and SELM) does. The cost is the same model and the same work.
lit_align also re-encodes the decoded completions for the ranker (the ranker reads text, so generated and dataset
responses are scored alike), and logs more metrics.

Each side runs in its own subprocess (this script with ``--child``) on one torch thread; the child reports
``--steps`` step times after ``--warmup`` steps and its peak RSS (``resource.getrusage``: the whole process,
imports included). The sides alternate for ``--rounds`` rounds, each in a fresh process; the medians are over all
their timed steps. Prints one JSON line ``{"online_dpo": {"lit_align_ms", "trl_ms", "ratio", "lit_align_rss_mb",
"trl_rss_mb"}}``; ``--write`` also saves it to ``benchmarks/results_online_dpo.json``. Targets (issue 17): ratio
<= 0.5 and lit_align's RSS <= TRL's.

Usage: ``python benchmarks/online_dpo_step.py [--steps 10] [--rounds 3] [--warmup 3] [--write]``
(a smoke run: ``--steps 1 --rounds 1 --warmup 0``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/online_dpo_step.py`

# the online GRPO / RLOO benchmark's clocks and driver (this script's folder is on sys.path when it runs)
from online_step import alternate, report_child, run_child_process, timed_fit, timed_trl_train  # noqa: E402

PROMPTS = 8
NEW_TOKENS = 32
LR = 1e-6
BETA = 0.1
MAX_GRAD_NORM = 1.0
SEED = 0
TEMPLATE = "Human: {prompt}\nAI:"
RESULTS = ROOT / "benchmarks" / "results_online_dpo.json"


def prompts(n: int) -> list[str]:
    """The first ``n`` built-in seed prompts (raw text)."""
    from lit_align.data.records import BUILTIN_DIR

    lines = Path(str(BUILTIN_DIR / "seed_prompts.txt")).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines[:n]]


def build_models(policy_dir: str, reward_dir: str) -> None:
    """Save the tiny Qwen2 policy and the tiny Qwen2 reward model (one label), each with the bundled tokenizer."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(ROOT / "lit_align" / "models" / "assets" / "tiny_tokenizer"))

    def config(hidden: int) -> transformers.Qwen2Config:
        return transformers.Qwen2Config(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=2 * hidden, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)

    torch.manual_seed(SEED)
    policy = transformers.AutoModelForCausalLM.from_config(config(64))
    policy.generation_config.pad_token_id = tok.pad_token_id
    policy.generation_config.eos_token_id = tok.eos_token_id
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    rm_config = config(32)
    rm_config.num_labels = 1
    reward = transformers.AutoModelForSequenceClassification.from_config(rm_config)
    with torch.no_grad():
        reward.score.weight.normal_(0.0, 0.5)  # a random head: distinct scores, so every prompt gives a pair
    reward.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)


# ----------------------------------------------------------------------------------------------- lit_align side


def lit_align_config(policy_dir: str, reward_dir: str, total_steps: int) -> dict:
    """``configs/online_dpo/tiny.yaml`` on the saved models, full fine-tuning, 8 prompts per step in order, 2
    sampled candidates of ``NEW_TOKENS`` ranked by the reward model, DPO beta ``BETA``, TRL's rate and clip; one
    iteration; nothing else runs (no validation, checkpoint, logger or progress bar)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "online_dpo" / "tiny.yaml").read_text(encoding="utf-8"))
    model = config["model"]["init_args"]
    model["model"] = {"name_or_path": policy_dir}
    model["ranker"] = {"class_path": "lit_align.rewards.RewardRanker", "init_args": {
        "reward": {"class_path": "lit_align.rewards.ModelReward", "init_args": {
            "model": {"model": {"name_or_path": reward_dir}, "kind": "sequence_classification"}}},
        "template": TEMPLATE, "chat_template": False}}
    model["loss"] = {"class_path": "lit_align.losses.DPOLoss", "init_args": {"beta": BETA}}
    model["num_candidates"] = 2
    model["use_dataset_responses"] = False
    model["sampling"] = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    model["sample_seed"] = SEED
    model["stage_lrs"] = None
    model["optimizer"] = {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR}}
    data = config["data"]["init_args"]
    data.update(train={"path": "builtin:seed_prompts", "limit": PROMPTS * total_steps}, val=None, val_fraction=0.0,
                batch_size=PROMPTS, shuffle=False, iterations=None, template=TEMPLATE, chat_template=False)
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "max_steps": total_steps, "max_epochs": 1,
                         "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "callbacks": [],
                         "gradient_clip_val": MAX_GRAD_NORM, "enable_checkpointing": False,
                         "enable_progress_bar": False, "enable_model_summary": False}
    config["seed_everything"] = SEED
    return config


def run_lit_align(policy_dir: str, reward_dir: str, warmup: int, steps: int, out_dir: str) -> list[float]:
    """``OnlineDPOModule.training_step`` in a real ``lightning.Trainer``, timed per batch (``online_step.timed_fit``)."""
    return timed_fit(lit_align_config(policy_dir, reward_dir, warmup + steps), warmup, steps, out_dir)


# ----------------------------------------------------------------------------------------------------- TRL side


def run_trl(policy_dir: str, reward_dir: str, warmup: int, steps: int, out_dir: str) -> list[float]:
    import datasets
    import transformers
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = transformers.AutoTokenizer.from_pretrained(policy_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1)
    data = datasets.Dataset.from_dict({"prompt": [TEMPLATE.format(prompt=p) for p in prompts(PROMPTS * (warmup + steps))]})
    args = OnlineDPOConfig(
        output_dir=out_dir, per_device_train_batch_size=PROMPTS, gradient_accumulation_steps=1,
        max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=[BETA], loss_type="sigmoid",
        learning_rate=LR, max_grad_norm=MAX_GRAD_NORM, max_steps=warmup + steps, use_cpu=True, report_to=[],
        gradient_checkpointing=False,  # its default is on; lit_align runs without it
        save_strategy="no", logging_steps=10_000, seed=SEED, dataloader_num_workers=0, disable_tqdm=True)
    return timed_trl_train(lambda callbacks: OnlineDPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
        reward_processing_classes=tokenizer, callbacks=callbacks), warmup, steps)


# ------------------------------------------------------------------------------------------------------- driver


def child(side: str, policy_dir: str, reward_dir: str, warmup: int, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out_dir:
        run = run_lit_align if side == "lit_align" else run_trl
        times = run(policy_dir, reward_dir, warmup, steps, out_dir)
    report_child(times)


def run_child(side: str, policy_dir: str, reward_dir: str, warmup: int, steps: int) -> dict:
    return run_child_process(__file__, [side, "--policy-dir", policy_dir, "--reward-dir", reward_dir,
                                        "--warmup", str(warmup), "--steps", str(steps)], side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (median of all steps)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--write", action="store_true", help=f"also save the JSON line to {RESULTS.name}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--policy-dir", help=argparse.SUPPRESS)
    parser.add_argument("--reward-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.policy_dir, args.reward_dir, args.warmup, args.steps)
        return
    with tempfile.TemporaryDirectory() as policy_dir, tempfile.TemporaryDirectory() as reward_dir:
        build_models(policy_dir, reward_dir)
        ms, rss = alternate(["lit_align", "trl"], args.rounds,
                            lambda side: run_child(side, policy_dir, reward_dir, args.warmup, args.steps))
    result = {"online_dpo": {"lit_align_ms": round(ms["lit_align"], 1), "trl_ms": round(ms["trl"], 1),
                             "ratio": round(ms["lit_align"] / ms["trl"], 3),
                             "lit_align_rss_mb": round(rss["lit_align"], 1), "trl_rss_mb": round(rss["trl"], 1)}}
    line = json.dumps(result)
    print(line)
    if args.write:
        RESULTS.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
