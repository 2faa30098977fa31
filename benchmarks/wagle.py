"""Benchmark: what WAGLE costs, (a) the attribution pass and (b) the mask in every unlearning step.

Workload:

* model: Qwen2-shaped, hidden 64, 2 layers, 4 heads (2 KV heads), intermediate 128, vocab 4096,
  fp32, seed 0 (the ``dpo_step`` benchmark's model), built with transformers alone;
* data: synthetic token ids, every sequence 128 tokens (64 prompt + 64 answer tokens, the answer
  scored), a forget set and a retain set of ``--examples`` sequences each, batches of 8;
* one thread (``torch.set_num_threads(1)``).

(a) **Attribution** (``attribution_ms``): :func:`~lit_align.unlearning.accumulate_gradients` over
the forget set and over the retain set, :func:`~lit_align.unlearning.attribution_scores`
(``wagle``) and :meth:`~lit_align.unlearning.ParameterMask.select_top` (ratio 0.5), i.e. all the
work of the callback before training except saving. The peer (``fwd_bwd_ms``) is one plain
forward + backward pass over the same two sets with the same batches and the same loss
computation as a training step (``token_logps`` -> mean answer NLL -> ``backward``), without
anything else. ``attribution_ratio = attribution_ms / fwd_bwd_ms``, target ``<= 1.1`` (one pass,
plus scoring and selection). ``selection_ms`` is the scoring + selection part alone;
``hf_fwd_bwd_ms`` is the same pass through HF's full (B, T, V) logits, for scale.

(b) **Mask per step** (``masked_step_ms`` vs ``dense_step_ms``): a real ``lightning.Trainer``
runs GradDiff (``-NLL(forget) + NLL(retain)``, 8 + 8 sequences per step, AdamW, weight decay 0.1,
``gradient_clip_val=1.0``) once without and once with ``WeightMask(path=...)`` (a saved ratio-0.5
mask), and once with ``strict=True``. A step is timed from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward, clipping, masking, optimiser step); the first
``--warmup`` steps are dropped, the median of the rest is reported, runs interleaved over
``--rounds``. The clipping runs in both (Lightning's in the dense run, the callback's in the
masked run), so what the mask adds to a step is the masking itself: ``mask_apply_ms`` is the
median wall time of ``ParameterMask.mask_gradients_`` in the masked runs, and
``mask_step_overhead = mask_apply_ms / dense_step_ms``, target ``<= 0.10``. The end-to-end
difference ``end_to_end_overhead = masked_step_ms / dense_step_ms - 1`` is reported too, but on a
shared 2-core machine step medians move by +-10% between runs, more than the mask costs
(``strict_step_overhead`` likewise, reported only).

Prints one JSON line::

    {"bench": "wagle", "attribution_ms": ..., "fwd_bwd_ms": ..., "attribution_ratio": ...,
     "selection_ms": ..., "hf_fwd_bwd_ms": ..., "dense_step_ms": ..., "masked_step_ms": ..., "strict_step_ms": ...,
     "mask_apply_ms": ..., "mask_step_overhead": ..., "end_to_end_overhead": ..., "strict_step_overhead": ...,
     "targets_met": {...}, ...}

Usage: ``python benchmarks/wagle.py [--examples 32] [--steps 30] [--warmup 3] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as `python benchmarks/wagle.py`

VOCAB, SEQ_LEN, BATCH = 4096, 128, 8
TARGETS = {"attribution_ratio": 1.1, "mask_step_overhead": 0.10}


def _model():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _batches(n: int, seed: int):
    """``n`` sequences in batches of ``BATCH``: 64 prompt tokens then 64 scored answer tokens."""
    import torch

    from lit_align.data.batches import SequenceBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, BATCH):
        b = min(BATCH, n - start)
        ids = torch.randint(1, VOCAB, (b, SEQ_LEN), generator=g)
        loss = torch.zeros_like(ids)
        loss[:, SEQ_LEN // 2:] = 1
        out.append(SequenceBatch(ids, torch.ones_like(ids), loss, torch.arange(start, start + b)))
    return out


def _plain_fwd_bwd(model, batches, full_logits: bool = False) -> None:
    """One forward + backward per batch, the training loss's way (``token_logps``) or HF's full logits."""
    import torch.nn.functional as F

    from lit_align.rollout.logps import token_logps

    for batch in batches:
        if full_logits:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")  # (B, T-1)
            m = batch.loss_mask[:, 1:].float()
            ((nll * m).sum(-1) / m.sum(-1)).sum().backward()
        else:
            (-token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask).mean().sum()).backward()
    model.zero_grad(set_to_none=True)


def _attribution(model, forget, retain) -> float:
    import torch

    from lit_align.unlearning import ParameterMask, accumulate_gradients, attribution_scores

    ones = lambda bs: [(b, torch.ones(len(b))) for b in bs]  # noqa: E731
    g_f = accumulate_gradients(model, ones(forget))
    g_r = accumulate_gradients(model, ones(retain))
    start = time.perf_counter()
    ParameterMask.select_top(attribution_scores(model, g_f, g_r, method="wagle", gamma=1e-6), 0.5)
    return (time.perf_counter() - start) * 1e3


def bench_attribution(examples: int, rounds: int) -> dict:
    model = _model()
    forget, retain = _batches(examples, 1), _batches(examples, 2)
    attr, plain, hf, select = [], [], [], []
    _plain_fwd_bwd(model, forget[:1])  # warm-up
    for _ in range(rounds):
        t = time.perf_counter()
        _plain_fwd_bwd(model, forget + retain)
        plain.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        _plain_fwd_bwd(model, forget + retain, full_logits=True)
        hf.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        select.append(_attribution(model, forget, retain))
        attr.append((time.perf_counter() - t) * 1e3)
    a, p = statistics.median(attr), statistics.median(plain)
    return {"attribution_ms": round(a, 1), "fwd_bwd_ms": round(p, 1), "attribution_ratio": round(a / p, 3),
            "selection_ms": round(statistics.median(select), 1), "hf_fwd_bwd_ms": round(statistics.median(hf), 1)}


MASK_TIMES: list[float] = []  # wall time of every ParameterMask.mask_gradients_ call in the masked runs


def _timed_masking():
    """Patch ``ParameterMask.mask_gradients_`` to record its wall time (the work the mask adds)."""
    from lit_align.unlearning import ParameterMask

    original = ParameterMask.mask_gradients_

    def timed(self, model):
        t = time.perf_counter()
        original(self, model)
        MASK_TIMES.append((time.perf_counter() - t) * 1e3)

    ParameterMask.mask_gradients_ = timed


def _train(mask_path: str | None, strict: bool, steps: int, workdir: Path) -> list[float]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_align.callbacks.weight_mask import WeightMask
    from lit_align.rollout.logps import token_logps

    forget, retain = _batches(BATCH * steps, 3), _batches(BATCH * steps, 4)

    class GradDiff(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.policy = _model()

        def training_step(self, batch, batch_idx):
            f, r = batch
            nll = lambda b: -token_logps(self.policy, b.input_ids, b.attention_mask, b.loss_mask).mean().mean()  # noqa: E731
            return -nll(f) + nll(r)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.policy.parameters(), lr=1e-5, weight_decay=0.1)

    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append((time.perf_counter() - self.t) * 1e3)

    callbacks = [Timer()] + ([WeightMask(path=mask_path, strict=strict)] if mask_path else [])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        gradient_clip_val=1.0, callbacks=callbacks, default_root_dir=str(workdir))
    trainer.fit(GradDiff(), train_dataloaders=DataLoader(list(zip(forget, retain)), batch_size=None,
                                                          collate_fn=lambda b: b))
    return times


def bench_step(steps: int, warmup: int, rounds: int) -> dict:
    from lit_align.unlearning import ParameterMask, attribution_scores, model_signature

    runs: dict[str, list[float]] = {"dense": [], "masked": [], "strict": []}
    _timed_masking()
    with tempfile.TemporaryDirectory(prefix="wagle_bench_") as tmp:
        model = _model()
        path = str(Path(tmp) / "mask.pt")
        ParameterMask.select_top(attribution_scores(model, method="random"), 0.5, method="random",
                                 signature=model_signature(model)).save(path)
        for _ in range(rounds):  # interleaved, so a slow phase of a shared machine hits all alike
            runs["dense"] += _train(None, False, warmup + steps, Path(tmp))[warmup:]
            runs["masked"] += _train(path, False, warmup + steps, Path(tmp))[warmup:]
            runs["strict"] += _train(path, True, warmup + steps, Path(tmp))[warmup:]
    d, m, s = (statistics.median(runs[k]) for k in ("dense", "masked", "strict"))
    apply = statistics.median(MASK_TIMES)
    return {"dense_step_ms": round(d, 2), "masked_step_ms": round(m, 2), "strict_step_ms": round(s, 2),
            "mask_apply_ms": round(apply, 3), "mask_step_overhead": round(apply / d, 4),
            "end_to_end_overhead": round(m / d - 1, 4), "strict_step_overhead": round(s / d - 1, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32, help="sequences in each of the forget and retain sets")
    parser.add_argument("--steps", type=int, default=30, help="timed unlearning steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; times are pooled")
    args = parser.parse_args()

    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = {"bench": "wagle", **bench_attribution(args.examples, args.rounds),
           **bench_step(args.steps, args.warmup, args.rounds)}
    out["targets_met"] = {"attribution_ratio": out["attribution_ratio"] <= TARGETS["attribution_ratio"],
                          "mask_step_overhead": out["mask_step_overhead"] <= TARGETS["mask_step_overhead"]}
    out["workload"] = (f"Qwen2 hidden 64, 2 layers, vocab {VOCAB}; {args.examples} forget + {args.examples} retain "
                       f"sequences of {SEQ_LEN} tokens; steps of {BATCH}+{BATCH} sequences; ratio 0.5; 1 thread")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
