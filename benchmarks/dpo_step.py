"""Benchmark: one DPO optimiser step, lit_align vs TRL ``DPOTrainer`` vs a hand-written PyTorch loop.

Workload, identical for every implementation:

* model: Qwen2-shaped, hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128, vocab 4096,
  fp32, seed 0: lit_align builds it from ``ModelSpec(tiny=TinyArch(...))``, TRL and the hand loop
  get the same config built with transformers alone (so their processes never import Lightning);
  each worker reports the hash of its starting weights (``model_fingerprint``'s algorithm) and the
  parent checks they agree; nothing is downloaded;
* tokenizer: the bundled tiny tokenizer (``lit_align.models.TINY_TOKENIZER``, vocab 1024), no chat
  template, so prompt and responses are plain text;
* data: synthetic pairs made of words that are each one token: prompt 64 tokens, chosen and
  rejected 63 tokens + EOS, i.e. every sequence is exactly 128 tokens and nothing is padded or
  truncated; 8 pairs per step (16 sequences, 2,048 tokens, 1,024 of them scored); each worker
  counts the real tokens it was given per step and the parent asserts the counts agree;
* optimiser: AdamW, lr 1e-5; DPO sigmoid loss, beta 0.1.

Implementations (each in its own fresh subprocess):

* ``lit_align``: the real ``DPOModule`` (default ``reference="precomputed"``; cache directory in a
  temporary directory so it is always computed, never loaded) + ``PreferenceDataModule`` over a
  JSONL file of the pairs (``val_fraction=0``, ``chat_template=False``, ``max_length=256``) + a
  real ``lightning.Trainer`` (CPU, no logger, checkpointing, progress bar, model summary or
  validation). ``kl_every_n_steps=0`` (neither peer samples during the step). The reference
  precompute pass in ``on_fit_start`` is timed separately (``lit_align_precompute_ms``, the
  whole pass over the ``8 * (warmup + steps)`` pairs) and is not part of any step.
* ``lit_align_copy``: the same with ``reference="copy"`` (frozen copy run every step).
* ``trl``: ``trl.DPOTrainer`` with a frozen ``ref_model`` copy and gradient checkpointing off
  (its defaults otherwise, e.g. ``max_grad_norm=1.0`` and the linear LR schedule).
* ``hand``: plain PyTorch: chosen and rejected concatenated, full logits -> log_softmax ->
  gather -> masked sum, frozen reference copy under ``no_grad``, sigmoid DPO loss, AdamW step.

Time: a step is one optimiser step, from the framework's "step begins" hook to its "step ends"
hook, measured with ``time.perf_counter``: Lightning ``Callback.on_train_batch_start`` ->
``on_train_batch_end`` (forward, backward, optimiser step, zero_grad, ``self.log``), TRL
``TrainerCallback.on_step_begin`` -> ``on_step_end`` (forward, backward, clipping, optimiser
and scheduler step, zero_grad), and for the hand loop the same span around its own code. Batch
loading is outside the span in all three. The first ``--warmup`` steps are dropped; reported is
the median of the next ``--steps``. ``cpu_ms`` gives the median process CPU time over the same spans
(``time.process_time``), which other load on a shared machine disturbs less than wall time.

Memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read by each worker after training, i.e.
the peak resident set of that fresh process from interpreter start: imports (Lightning, TRL,
``datasets``), models, reference copy, optimiser state, data and activations. It is what a user
pays to run the job, not only the tensors of a step.

One thread (``torch.set_num_threads(1)``) everywhere.

Prints one JSON line (times in ms, memory in MiB)::

    {"bench": "dpo_step", "lit_align_ms": ..., "lit_align_copy_ms": ..., "trl_ms": ..., "hand_ms": ...,
     "lit_align_peak_rss_mb": ..., "trl_peak_rss_mb": ..., "hand_peak_rss_mb": ..., "ratio_vs_trl": ...,
     "ratio_vs_hand": ..., "rss_ratio_vs_trl": ..., "targets_met": {...}, ...}

``ratio_vs_*`` is ``lit_align_ms / peer_ms`` (lower is better); targets: ``ratio_vs_trl <= 0.5``,
``ratio_vs_hand <= 1.3``, ``rss_ratio_vs_trl <= 1.0``.

Usage: ``python benchmarks/dpo_step.py [--steps 30] [--warmup 5] [--rounds 1]``
(``--only lit_align,hand`` runs a subset; ``--profile DIR`` writes a cProfile of each worker).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/dpo_step.py`

IMPLS = ("lit_align", "lit_align_copy", "trl", "hand")
VOCAB = 4096
PAIRS_PER_STEP = 8
PROMPT_WORDS, RESPONSE_WORDS = 64, 63  # + EOS: 64 + 64 = 128 tokens per sequence
SEQ_LEN = PROMPT_WORDS + RESPONSE_WORDS + 1
LR, BETA = 1e-5, 0.1
TARGETS = {"ratio_vs_trl": 0.5, "ratio_vs_hand": 1.3, "rss_ratio_vs_trl": 1.0}


# -- shared workload (built identically in every worker) -----------------------------------------
# The TRL and hand workers build the model and tokenizer with transformers alone, so their peak RSS
# does not include Lightning (which `lit_align.models` imports); the parent checks that every worker
# starts from the same weights (`_fingerprint`, the algorithm of `lit_align.models.model_fingerprint`).
TINY_TOKENIZER = ROOT / "lit_align" / "models" / "assets" / "tiny_tokenizer"  # lit_align.models.TINY_TOKENIZER
ARCH = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=VOCAB)


def _spec():
    """The lit_align model spec (used by the lit_align workers)."""
    from lit_align.models import ModelSpec, TinyArch

    return ModelSpec(tiny=TinyArch(family="qwen2", **ARCH), seed=0)


def _tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    return tokenizer


def _build_model(tokenizer):
    """What ``lit_align.models.build_causal_lm(_spec(), tokenizer)`` builds, with transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=ARCH["hidden_size"], num_hidden_layers=ARCH["num_layers"],
        num_attention_heads=ARCH["num_heads"], num_key_value_heads=ARCH["num_kv_heads"],
        intermediate_size=ARCH["intermediate_size"], max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _fingerprint(model) -> str:
    """sha256 over parameter names, shapes, dtypes, sums and sums of squares (as lit_align's)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            t = p.detach().double()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{t.sum().item():.12e}|{t.square().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


def _one_token_words(tokenizer) -> list[str]:
    """Lower-case words that the tokenizer encodes as exactly one token when preceded by a space."""
    words = sorted(k[1:] for k in tokenizer.get_vocab() if k.startswith("Ġ") and k[1:].isalpha() and k[1:].islower())
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def _pairs(n: int, tokenizer) -> list[dict[str, str]]:
    """``n`` synthetic preference records; every word is one token, every string starts with a space,
    so prompt + response tokenizes to exactly the concatenation of the two (no merges across the seam)."""
    words = _one_token_words(tokenizer)
    rng = random.Random(0)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    return [{"prompt": text(PROMPT_WORDS), "chosen": text(RESPONSE_WORDS), "rejected": text(RESPONSE_WORDS)}
            for _ in range(n)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def trl_step_timer(times: _StepTimes):
    """A transformers ``TrainerCallback`` that records each optimiser step's span in ``times``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.begin()

        def on_step_end(self, args, state, control, **kwargs):
            times.end()

    return Timer()


class _StepTimes:
    """Step spans and the real tokens per step, filled by each framework's hooks."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.cpu_ms: list[float] = []
        self.tokens: list[int] = []
        self.scored: list[int] = []
        self._start = self._cpu_start = 0.0

    def begin(self) -> None:
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def end(self) -> None:
        self.ms.append((time.perf_counter() - self._start) * 1e3)
        self.cpu_ms.append((time.process_time() - self._cpu_start) * 1e3)


# -- workers -------------------------------------------------------------------------------------
def _run_lit_align(reference: str, total_steps: int, workdir: Path) -> dict:
    import lightning as L

    from lit_align.data import PreferenceDataModule
    from lit_align.data.records import DataSource
    from lit_align.methods import DPOModule

    tokenizer = _tokenizer()  # only to write the data; the module builds its own (the same files)
    path = workdir / "pairs.jsonl"
    with path.open("w") as f:
        for rec in _pairs(PAIRS_PER_STEP * total_steps, tokenizer):
            f.write(json.dumps(rec) + "\n")

    times = _StepTimes()
    extra: dict = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            times.tokens.append(batch.num_tokens)
            times.scored.append(int(batch.chosen.loss_mask.sum() + batch.rejected.loss_mask.sum()))
            times.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.end()

        def on_train_start(self, trainer, pl_module):
            extra["fingerprint"] = _fingerprint(pl_module.policy)

    module = DPOModule(model=_spec(), reference=reference, reference_cache_dir=str(workdir / "cache"),
                       kl_every_n_steps=0)  # optimizer: its default AdamW(lr=1e-5)
    precompute = module._precompute_reference  # time the reference pass run in on_fit_start

    def timed_precompute() -> None:
        start = time.perf_counter()
        precompute()
        extra["precompute_ms"] = (time.perf_counter() - start) * 1e3

    module._precompute_reference = timed_precompute
    data = PreferenceDataModule(train=DataSource(path=str(path)), val_fraction=0.0, batch_size=PAIRS_PER_STEP,
                                max_length=2 * SEQ_LEN, chat_template=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=total_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Timer()],
        default_root_dir=str(workdir),
    )
    trainer.fit(module, datamodule=data)
    assert data.train_dataset.truncated == 0, "lit_align truncated examples"
    out = {"fingerprint": extra["fingerprint"], "times": times}
    if reference == "precomputed":
        out["precompute_ms"] = extra["precompute_ms"]
    return out


def _run_trl(total_steps: int, workdir: Path) -> dict:
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = _tokenizer()
    model = _build_model(tokenizer)
    fingerprint = _fingerprint(model)
    ref_model = copy.deepcopy(model)
    dataset = Dataset.from_list(_pairs(PAIRS_PER_STEP * total_steps, tokenizer))
    times = _StepTimes()

    config = DPOConfig(
        output_dir=str(workdir / "trl"), gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none",
        per_device_train_batch_size=PAIRS_PER_STEP, max_length=2 * SEQ_LEN, precompute_ref_log_probs=False,
        logging_steps=10**6, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
        learning_rate=LR, beta=BETA, max_steps=total_steps, num_train_epochs=1, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[trl_step_timer(times)])
    collate = trainer.data_collator

    def counting_collate(examples):  # runs in this process (num_workers=0), once per step
        batch = collate(examples)
        times.tokens.append(int(batch["attention_mask"].sum()))
        times.scored.append(int(batch["completion_mask"].sum()))
        return batch

    trainer.data_collator = counting_collate
    trainer.train()
    return {"fingerprint": fingerprint, "times": times}


def _run_hand(total_steps: int, workdir: Path) -> dict:
    import copy

    import torch
    import torch.nn.functional as F

    tokenizer = _tokenizer()
    model = _build_model(tokenizer).train()
    fingerprint = _fingerprint(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False)  # frozen reference copy
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    # Tokenize exactly as the others do: prompt ids, response ids, EOS; no padding is needed.
    def encode(rec: dict) -> tuple[list[int], list[int], list[int]]:
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        eos = [tokenizer.eos_token_id]
        return ids(rec["prompt"]), ids(rec["chosen"]) + eos, ids(rec["rejected"]) + eos

    batches = []
    records = _pairs(PAIRS_PER_STEP * total_steps, tokenizer)
    for s in range(total_steps):
        rows = [encode(r) for r in records[s * PAIRS_PER_STEP : (s + 1) * PAIRS_PER_STEP]]
        seqs = [p + c for p, c, _ in rows] + [p + r for p, _, r in rows]  # (2B,) chosen then rejected
        input_ids = torch.tensor(seqs)  # (2B, T)
        loss_mask = torch.zeros_like(input_ids)  # (2B, T)
        for i, (p, _, _) in enumerate(rows + rows):
            loss_mask[i, len(p) :] = 1
        batches.append((input_ids, torch.ones_like(input_ids), loss_mask))

    def seq_logps(m, input_ids, attention_mask, loss_mask):
        logits = m(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (2B, T-1, V)
        logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (2B, T-1)
        return (logps * loss_mask[:, 1:]).sum(-1)  # (2B,)

    times = _StepTimes()
    b = PAIRS_PER_STEP
    for input_ids, attention_mask, loss_mask in batches:
        times.tokens.append(int(attention_mask.sum()))
        times.scored.append(int(loss_mask.sum()))
        times.begin()
        pol = seq_logps(model, input_ids, attention_mask, loss_mask)
        with torch.no_grad():
            ref_l = seq_logps(ref, input_ids, attention_mask, loss_mask)
        h = (pol[:b] - ref_l[:b]) - (pol[b:] - ref_l[b:])  # (B,)
        loss = -F.logsigmoid(BETA * h).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.end()
    return {"fingerprint": fingerprint, "times": times}


def timed_worker(impl: str, run, warmup: int, total: int, profile: str | None, prof_name: str) -> dict:
    """Run one implementation's ``run()`` (returns ``{"times": _StepTimes, ...}``), optionally under cProfile
    (``<profile>/<prof_name>``), check it timed every step, and report the steps after ``warmup``."""
    if profile:
        import cProfile

        prof = cProfile.Profile()
        out = prof.runcall(run)
        Path(profile).mkdir(parents=True, exist_ok=True)
        prof.dump_stats(str(Path(profile) / prof_name))
    else:
        out = run()
    times: _StepTimes = out.pop("times")
    if len(times.ms) != total or len(times.tokens) < total:
        raise RuntimeError(f"{impl}: timed {len(times.ms)} steps and saw {len(times.tokens)} batches, expected {total}")
    return {"impl": impl, "step_ms": times.ms[warmup:], "step_cpu_ms": times.cpu_ms[warmup:],
            "tokens_per_step": statistics.mean(times.tokens[:total]), "peak_rss_mb": _peak_rss_mb(), "times": times,
            **out}


def _worker(impl: str, steps: int, warmup: int, profile: str | None) -> dict:
    import torch

    torch.set_num_threads(1)
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix=f"dpo_step_{impl}_") as tmp:
        run = {
            "lit_align": lambda: _run_lit_align("precomputed", total, Path(tmp)),
            "lit_align_copy": lambda: _run_lit_align("copy", total, Path(tmp)),
            "trl": lambda: _run_trl(total, Path(tmp)),
            "hand": lambda: _run_hand(total, Path(tmp)),
        }[impl]
        result = timed_worker(impl, run, warmup, total, profile, f"{impl}.prof")
    times = result.pop("times")
    return {**result, "scored_tokens_per_step": statistics.mean(times.scored[:total])}


def _run_worker(impl: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if args.profile:
        cmd += ["--profile", args.profile]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {impl} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimiser steps per implementation")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimiser steps first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every worker this many times, interleaved; step times are pooled")
    parser.add_argument("--only", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--profile", default=None, help="directory for a cProfile dump of each worker")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.steps, args.warmup, args.profile)))
        return

    impls = [i for i in IMPLS if i in args.only.split(",")]
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for _ in range(args.rounds):
        for impl in impls:  # interleaved so slow phases of a shared machine hit all alike
            runs[impl].append(_run_worker(impl, args))

    res = {}
    for impl, rs in runs.items():
        res[impl] = {
            "ms": statistics.median([t for r in rs for t in r["step_ms"]]),
            "cpu_ms": statistics.median([t for r in rs for t in r["step_cpu_ms"]]),
            "rss": max(r["peak_rss_mb"] for r in rs),
            "tokens": rs[0]["tokens_per_step"],
            "scored": rs[0]["scored_tokens_per_step"],
            "fingerprint": rs[0]["fingerprint"],
            "precompute_ms": statistics.median([r["precompute_ms"] for r in rs]) if "precompute_ms" in rs[0] else None,
        }
    # Same weights and the same real tokens per step for everyone, or the comparison is meaningless.
    if len({r["fingerprint"] for r in res.values()}) != 1:
        raise SystemExit(f"initial weights differ: { {k: r['fingerprint'] for k, r in res.items()} }")
    if len({r["tokens"] for r in res.values()}) != 1 or len({r["scored"] for r in res.values()}) != 1:
        raise SystemExit(f"token counts differ: { {k: (r['tokens'], r['scored']) for k, r in res.items()} }")

    def r(x: float | None, nd: int = 1) -> float | None:
        return None if x is None else round(x, nd)

    def get(impl: str, key: str):
        return res[impl][key] if impl in res else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    out = {
        "bench": "dpo_step",
        "lit_align_ms": r(get("lit_align", "ms")),
        "lit_align_copy_ms": r(get("lit_align_copy", "ms")),
        "trl_ms": r(get("trl", "ms")),
        "hand_ms": r(get("hand", "ms")),
        "lit_align_precompute_ms": r(get("lit_align", "precompute_ms")),
        # the precompute pass covers the same pairs as the steps (one epoch): its share per step
        "lit_align_ms_incl_precompute": (
            r(get("lit_align", "ms") + get("lit_align", "precompute_ms") / (args.warmup + args.steps))
            if "lit_align" in res else None
        ),
        "lit_align_peak_rss_mb": r(get("lit_align", "rss")),
        "lit_align_copy_peak_rss_mb": r(get("lit_align_copy", "rss")),
        "trl_peak_rss_mb": r(get("trl", "rss")),
        "hand_peak_rss_mb": r(get("hand", "rss")),
        "ratio_vs_trl": ratio(get("lit_align", "ms"), get("trl", "ms")),
        "ratio_vs_hand": ratio(get("lit_align", "ms"), get("hand", "ms")),
        "copy_ratio_vs_trl": ratio(get("lit_align_copy", "ms"), get("trl", "ms")),
        "copy_ratio_vs_hand": ratio(get("lit_align_copy", "ms"), get("hand", "ms")),
        "rss_ratio_vs_trl": ratio(get("lit_align", "rss"), get("trl", "rss")),
    }
    out["targets_met"] = {k: out[k] <= v for k, v in TARGETS.items() if out[k] is not None}
    # CPU time of the worker process over the same spans: less sensitive to other load on a shared machine.
    out["cpu_ms"] = {impl: r(res[impl]["cpu_ms"]) for impl in res}
    first = next(iter(res.values()))
    out.update(
        tokens_per_step=first["tokens"],
        scored_tokens_per_step=first["scored"],
        pairs_per_step=PAIRS_PER_STEP,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
