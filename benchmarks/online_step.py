"""Benchmark: one online RL step (GRPO, RLOO) of lit_align vs TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer``.

The setup (issue 16, "Performance"): a tiny Qwen2-shaped model (hidden 64, 2 layers, the bundled tiny
tokenizer, vocabulary 1,024) built once and saved with ``save_pretrained`` into a temporary directory that
both sides load and fully fine-tune; the first 8 built-in seed prompts (``builtin:seed_prompts``) rendered
``"Human: {p}\nAI:"``; 4 completions each of at most 32 new tokens, sampled at temperature 1 (no
top-k/top-p); a rule reward (the defender reward of :class:`lit_align.game.RuleJudge` on the prompt and the
decoded completion); one optimiser update per generation batch (lr 1e-6, gradient norm clipped at 1).

* lit_align: ``PPOModule.training_step`` in a real ``lightning.Trainer`` (``configs/grpo/tiny.yaml`` or
  ``configs/rloo/tiny.yaml`` on the saved model, see :func:`lit_align_config`), each batch timed from
  ``on_train_batch_start`` to ``on_train_batch_end``.
* TRL: ``GRPOTrainer`` / ``RLOOTrainer`` (``num_iterations=1``, ``steps_per_generation=1``, one batch of
  8 x 4), each step timed between its ``on_step_begin`` and ``on_step_end`` callbacks.

Equal: the KL coefficient, 0 on both sides (TRL ``beta=0.0``: no reference model; lit_align ``kl_coef: 0``
and ``ppo.kl_loss_coef: 0``); the generation (one prefill and one cached forward per further token); one
training forward + backward over the 32 rows; the group baselines (GRPO ``(r - mean) / (std + 1e-4)``, TRL
``scale_rewards="group"``; RLOO leave-one-out, ``normalize_advantages=False``). Not equal: the forward
passes without gradient. ``PPOModule`` builds its experience with two over the 32 rows, the old log-probs
and the reference's (a frozen copy, run although its KL weight is 0); TRL runs neither (its old log-probs
are the detached current ones when ``num_iterations=1``). ``--engine`` also times the step from the engine's
pieces with TRL's passes exactly (:func:`engine_step`: the sampler's log-probs as the old ones, no
reference), reported as ``engine_ms`` / ``engine_ratio``.

Each side runs in its own subprocess (this script with ``--child``) on one torch thread; the child reports
``--steps`` step times after ``--warmup`` steps and its peak RSS (``resource.getrusage``: the whole process,
imports included). The sides alternate for ``--rounds`` rounds, each in a fresh process, and the medians are
over all their timed steps (so a change of machine load hits both sides alike).

Prints one JSON line ``{"grpo": {"lit_align_ms", "trl_ms", "ratio", "lit_align_rss_mb", "trl_rss_mb"},
"rloo": {...}}``; with ``--write`` also saves it to ``benchmarks/results_online.json``. Targets: ratio <= 0.5
and lit_align's RSS <= TRL's.

Usage: ``python benchmarks/online_step.py [--steps 10] [--rounds 3] [--warmup 3] [--engine] [--write]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/online_step.py`

PROMPTS = 8
GROUP = 4
NEW_TOKENS = 32
LR = 1e-6
MAX_GRAD_NORM = 1.0
SEED = 0
TEMPLATE = "Human: {p}\nAI:"
RESULTS = ROOT / "benchmarks" / "results_online.json"


def prompts() -> list[str]:
    """The first ``PROMPTS`` built-in seed prompts, rendered."""
    from lit_align.data.records import BUILTIN_DIR

    lines = Path(str(BUILTIN_DIR / "seed_prompts.txt")).read_text(encoding="utf-8").splitlines()
    return [TEMPLATE.format(p=line.strip()) for line in lines[:PROMPTS]]


def rule_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The defender reward of the toy rule judge (1 - P(unsafe)), a pure-Python word count of each pair: what
    ``lit_align.rewards.JudgeReward(RuleJudge, output=defender_reward)`` gives the lit_align side."""
    from lit_align.game import RuleJudge

    judge = RuleJudge()
    return [1.0 - judge.p_unsafe(p, c) for p, c in zip(prompts, completions, strict=True)]


def build_model(directory: str) -> None:
    """Save the tiny Qwen2 model and the bundled tiny tokenizer into ``directory``."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(ROOT / "lit_align" / "models" / "assets" / "tiny_tokenizer"))
    config = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


# ----------------------------------------------------------------------------------------------- lit_align side


def lit_align_config(model_dir: str, method: str, total_steps: int) -> dict:
    """The ``lit-align`` config of the step: ``configs/<method>/tiny.yaml`` on the saved model with full
    fine-tuning (as TRL here: no LoRA), the first ``PROMPTS`` seed prompts in one batch, KL coefficient 0 (in the
    reward and in the loss), ``NEW_TOKENS`` new tokens, one PPO epoch, the TRL side's rate and clip; nothing else
    runs (no validation, checkpoint, logger or progress bar)."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / method / "tiny.yaml").read_text(encoding="utf-8"))
    model = config["model"]["init_args"]
    model["model"] = {"name_or_path": model_dir}
    model["estimator"]["init_args"]["group_size"] = GROUP
    model["sampling"] = {"max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    model["kl_coef"] = 0.0
    model["ppo"] = {"epochs": 1, "kl_loss_coef": 0.0, "aggregation": "token_mean"}
    model["optimization"] = {"policy": {"lr": LR, "gradient_clip": MAX_GRAD_NORM}}
    model["sample_seed"] = SEED
    data = config["data"]["init_args"]
    data.update(train={"path": "builtin:seed_prompts", "limit": PROMPTS}, val=None, val_fraction=0.0,
                batch_size=PROMPTS)
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "max_steps": total_steps, "max_epochs": -1,
                         "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "callbacks": [],
                         "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
    config["seed_everything"] = SEED
    return config


def timed_fit(config: dict, warmup: int, steps: int, out_dir: str) -> list[float]:
    """Run ``lit-align fit`` on ``config`` (a config dict, written to ``out_dir``) in a real ``lightning.Trainer``
    and return the wall-clock seconds of its training batches after the first ``warmup``, each timed from
    ``on_train_batch_start`` to ``on_train_batch_end`` (the whole ``training_step``, optimiser step and logging
    included). ``online_dpo_step.py`` times its side with it too."""
    import lightning as L
    import yaml

    from lit_align.cli import cli_main

    times: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)

    config_path = Path(out_dir) / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    cli = cli_main(["--config", str(config_path), "--trainer.default_root_dir", out_dir], run=False)
    cli.trainer.callbacks.append(StepClock())
    cli.trainer.fit(cli.model, cli.datamodule)
    if len(times) != warmup + steps:
        raise RuntimeError(f"lit_align ran {len(times)} steps, expected {warmup + steps}")
    return times[warmup:]


def run_lit_align(model_dir: str, method: str, warmup: int, steps: int, out_dir: str) -> list[float]:
    """``PPOModule.training_step`` (generation, reward, experience, PPO update, logging), timed per batch."""
    return timed_fit(lit_align_config(model_dir, method, warmup + steps), warmup, steps, out_dir)


def engine_step(policy, optimizer, tokenizer, prompt_ids, prompt_mask, texts: list[str], step: int,
                method: str) -> None:
    """``--engine``: the same step from the engine's pieces with TRL's forward passes (no reference forward, and
    the sampler's log-probs as the old ones, instead of ``make_experience``'s two no-grad forwards): sample
    ``GROUP`` completions per prompt (per-row generators), score, group advantages, one PPO update."""
    import torch

    from lit_align.engine.ppo import PPOConfig, ppo_update
    from lit_align.engine.seeds import row_generators
    from lit_align.losses.group import grpo_advantages, rloo_advantages
    from lit_align.rollout.experience import Experience
    from lit_align.rollout.sampler import SamplingConfig, sample

    rngs = row_generators(SEED, step, "sample", range(len(prompt_ids)))
    rollout = sample(policy, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=NEW_TOKENS),
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=rngs)
    completions = tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    rewards = torch.tensor(rule_reward(texts, completions))  # (B * k,)
    advantages = grpo_advantages(rewards, GROUP) if method == "grpo" else rloo_advantages(rewards, GROUP)
    prompt_zeros = torch.zeros_like(rollout.prompt_mask, dtype=torch.float32)  # (B, P)
    action_mask = torch.cat([prompt_zeros, rollout.response_mask.float()], dim=1)  # (B, T)
    old_logps = torch.cat([prompt_zeros, rollout.logps], dim=1)  # (B, T): the sampler's, no extra forward
    zeros = torch.zeros_like(action_mask)
    exp = Experience(sequences=rollout.sequences, attention_mask=rollout.attention_mask, action_mask=action_mask,
                     old_logps=old_logps, ref_logps=zeros, values=zeros, rewards=zeros,
                     advantages=advantages[:, None] * action_mask, returns=zeros, scores=rewards)

    def step_policy(loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    policy.train()
    ppo_update(policy, None, exp, PPOConfig(epochs=1, clip=0.2), step_policy=step_policy)


def run_engine(model_dir: str, method: str, warmup: int, steps: int) -> list[float]:
    import torch
    import transformers

    from lit_align.rollout.sampler import left_pad

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    texts = [p for p in prompts() for _ in range(GROUP)]
    prompt_ids, prompt_mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in texts],
                                       tokenizer.pad_token_id)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        engine_step(policy, optimizer, tokenizer, prompt_ids, prompt_mask, texts, step, method)
        times.append(time.perf_counter() - start)
    return times[warmup:]


# ----------------------------------------------------------------------------------------------------- TRL side


def run_trl(model_dir: str, method: str, warmup: int, steps: int, out_dir: str) -> list[float]:
    import datasets
    import transformers
    import trl

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    data = datasets.Dataset.from_dict({"prompt": prompts()})

    def reward(prompts, completions, **kwargs):
        return rule_reward(prompts, completions)

    common = dict(output_dir=out_dir, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                  max_completion_length=NEW_TOKENS, num_iterations=1, steps_per_generation=1,
                  gradient_accumulation_steps=1, beta=0.0, temperature=1.0, learning_rate=LR,
                  max_grad_norm=MAX_GRAD_NORM, max_steps=warmup + steps, use_cpu=True, report_to=[],
                  save_strategy="no", logging_steps=10_000, shuffle_dataset=False, seed=SEED,
                  dataloader_num_workers=0, disable_tqdm=True)
    if method == "grpo":
        args, trainer_cls = trl.GRPOConfig(**common, scale_rewards="group"), trl.GRPOTrainer
    else:
        args, trainer_cls = trl.RLOOConfig(**common, normalize_advantages=False), trl.RLOOTrainer
    return timed_trl_train(lambda callbacks: trainer_cls(model=model, reward_funcs=reward, args=args,
                                                         train_dataset=data, processing_class=tokenizer,
                                                         callbacks=callbacks), warmup, steps)


def timed_trl_train(make_trainer, warmup: int, steps: int) -> list[float]:
    """Train the TRL trainer ``make_trainer(callbacks)`` builds and return the seconds of its steps after the first
    ``warmup``, each timed between its ``on_step_begin`` and ``on_step_end`` callbacks (``online_dpo_step.py`` too)."""
    import transformers

    times: list[float] = []

    class StepClock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    make_trainer([StepClock()]).train()
    if len(times) != warmup + steps:
        raise RuntimeError(f"TRL ran {len(times)} steps, expected {warmup + steps}")
    return times[warmup:]


# ------------------------------------------------------------------------------------------------------- driver


def child(side: str, method: str, model_dir: str, warmup: int, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out_dir:
        if side == "lit_align":
            times = run_lit_align(model_dir, method, warmup, steps, out_dir)
        elif side == "engine":
            times = run_engine(model_dir, method, warmup, steps)
        else:
            times = run_trl(model_dir, method, warmup, steps, out_dir)
    report_child(times)


def report_child(times: list[float]) -> None:
    """A child's one JSON line: its step times (ms) and its peak RSS (the whole process, imports included)."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"ms": [t * 1e3 for t in times], "rss_mb": rss_mb}))


def run_child_process(script: str, args: list[str], label: str) -> dict:
    """Run ``script --child ...args`` on one thread, offline, and return its :func:`report_child` line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, script, "--child", *args], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(sides: list[str], rounds: int, run_side) -> tuple[dict[str, float], dict[str, float]]:
    """``(median ms, peak RSS MiB)`` per side over ``rounds`` of ``run_side(side)`` calls, the sides alternating
    (a change of machine load hits every side alike)."""
    times: dict[str, list[float]] = {side: [] for side in sides}
    rss: dict[str, float] = dict.fromkeys(sides, 0.0)
    for _ in range(rounds):
        for side in sides:
            out = run_side(side)
            times[side] += out["ms"]
            rss[side] = max(rss[side], out["rss_mb"])
    return {side: statistics.median(t) for side, t in times.items()}, rss


def run_child(side: str, method: str, model_dir: str, warmup: int, steps: int) -> dict:
    return run_child_process(__file__, [side, method, "--model-dir", model_dir, "--warmup", str(warmup),
                                        "--steps", str(steps)], f"{side} {method}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side (median of all steps)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--methods", default="grpo,rloo", help="comma-separated subset of grpo,rloo")
    parser.add_argument("--engine", action="store_true",
                        help="also time the step from the engine's pieces with TRL's forward passes (engine_ms)")
    parser.add_argument("--write", action="store_true", help=f"also save the JSON line to {RESULTS.name}")
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.model_dir, args.warmup, args.steps)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"grpo", "rloo"}:
        raise SystemExit(f"--methods must name grpo and/or rloo, got {args.methods!r}")
    result: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as model_dir:
        build_model(model_dir)
        for method in methods:
            sides = ["lit_align", "trl"] + (["engine"] if args.engine else [])
            ms, rss = alternate(sides, args.rounds,
                                lambda side, method=method: run_child(side, method, model_dir, args.warmup, args.steps))
            result[method] = {"lit_align_ms": round(ms["lit_align"], 1), "trl_ms": round(ms["trl"], 1),
                              "ratio": round(ms["lit_align"] / ms["trl"], 3),
                              "lit_align_rss_mb": round(rss["lit_align"], 1), "trl_rss_mb": round(rss["trl"], 1)}
            if args.engine:
                result[method].update(engine_ms=round(ms["engine"], 1), engine_ratio=round(ms["engine"] / ms["trl"], 3),
                                      engine_rss_mb=round(rss["engine"], 1))
    line = json.dumps(result)
    print(line)
    if args.write:
        RESULTS.write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
