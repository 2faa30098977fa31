"""Shared test set-up: offline W&B, a private cache, one torch thread, tiny-model helpers."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

#: CSV logging instead of W&B for runs that do not test W&B itself (W&B offline costs seconds).
CSV_LOGGER = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIT_ALIGN_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))


def run_cli(args: list[str], cwd: Path = REPO, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``lit-align`` in a subprocess (needed for multi-process strategies) and fail with its output."""
    exe = Path(sys.executable).with_name("lit-align")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"lit-align {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init: str):
    """A gloo process group for a spawned test worker, one torch thread. Ranks meet at a barrier before the group
    is destroyed: a rank that tears down while its peer still has a collective in flight aborts the peer
    ("terminate called without an active exception", SIGABRT), which failed CI once."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, tmp_path, world: int = 2, timeout: float = 60) -> dict:
    """Run ``worker(rank, world, init, queue)`` in ``world`` spawned processes (``init``: a file:// rendezvous
    under ``tmp_path``; the worker opens it with :func:`gloo_group` and puts ``(rank, result)`` on the queue) and
    return ``{rank: result}`` once every process exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'pg'}"
    procs = [ctx.Process(target=worker, args=(rank, world, init, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def tiny_lm(family: str = "qwen2", *, vocab_size: int, hidden_size: int = 64, seed: int = 0, **config):
    """A tiny random HF causal LM built with transformers alone (tests of code that takes any HF model)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    config = cls(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=2 * hidden_size, vocab_size=vocab_size, **config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_actor_critic(vocab_size: int, hidden_size: int = 32):
    """A tiny actor (seed 0) and a critic on another tiny LM (seed 1) with a random value head (std 0.5), as the
    engine's PPO tests use them."""
    from lit_align.models.reward import RewardModel
    from lit_align.models.value import ValueModel

    actor = tiny_lm("qwen2", vocab_size=vocab_size, hidden_size=hidden_size, seed=0)
    head = torch.nn.Linear(hidden_size, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        torch.nn.init.normal_(head.weight, std=0.5)
    backbone = tiny_lm("qwen2", vocab_size=vocab_size, hidden_size=hidden_size, seed=1)
    return actor, ValueModel.from_reward_model(RewardModel(backbone, head, "scalar_head").eval())


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys (compared in float32)."""
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@functools.cache
def resolved_config(config: str) -> dict:
    """A config as the CLI resolves it (``fit --print_config``: parsed and validated, not instantiated,
    so real-scale configs are checked without downloading anything)."""
    import contextlib
    import io

    import yaml

    from lit_align.cli import cli_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / config), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


@pytest.fixture
def finish_wandb():
    """Finish the W&B run a test leaves open (Lightning does not): a later WandbLogger in the same process
    would otherwise join it, and write into the earlier test's directory."""
    yield
    import wandb

    wandb.finish()


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled tiny tokenizer, as lit_align builds it for a ``tiny`` model spec."""
    from lit_align.models import ModelSpec, TinyArch, build_tokenizer

    return build_tokenizer(ModelSpec(tiny=TinyArch()))


class StopAfter(L.Callback):
    """Stop training once ``module.step_count`` reaches ``n`` (mid-epoch: the checkpoint of that batch is
    not an epoch's last, so a resume continues the epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.step_count >= self.n:
            trainer.should_stop = True


class SampleCalls:
    """Counts the sampler calls of :func:`lit_align.retrieval.generate_texts` (each one generates a batch):
    ``SampleCalls(monkeypatch).calls``."""

    def __init__(self, monkeypatch) -> None:
        import lit_align.retrieval.generation as generation

        self.calls, real = 0, generation.sample

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(generation, "sample", counted)
