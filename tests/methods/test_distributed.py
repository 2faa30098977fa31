"""2-process DDP and 2-process FSDP2 (ModelParallelStrategy over gloo) match one process.

One process with batch 16 and two processes with batch 8 each see the same 16 examples per
step (the sharded sampler interleaves ranks), so after the same number of optimiser steps the
exported weights agree up to floating-point reduction order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, max_diff, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = [
    "fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--trainer.max_steps", "4",
    "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
    "--trainer.callbacks", "lit_align.callbacks.HFExport",
]

FSDP2 = ["--config", str(REPO / "callbacks/fsdp2_cpu.yaml"), "--trainer.callbacks", "lit_align.callbacks.HFExport"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    run_cli([*COMMON, "--trainer.default_root_dir", str(root), "--trainer.logger.save_dir", str(root),
             "--data.init_args.batch_size", "16"])
    return load_file(root / "hf_export" / "model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one(strategy, single, tmp_path):
    if strategy == "ddp":
        extra = DDP
    else:  # also shards a frozen reference copy, and samples (KL estimate, sample table) on sharded weights
        extra = [*FSDP2, "--trainer.callbacks+=lit_align.callbacks.SampleGenerations", "--trainer.callbacks.every_n_steps",
                 "2", "--model.init_args.reference", "copy", "--model.init_args.kl_every_n_steps", "2"]
    proc = run_cli([*COMMON, *extra, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.save_dir",
                    str(tmp_path), "--data.init_args.batch_size", "8"])
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    multi = load_file(tmp_path / "hf_export" / "model.safetensors")
    if strategy == "fsdp2":
        assert list(tmp_path.rglob("samples.csv")), "no sample table written under FSDP2"

    from lit_align.models import ModelSpec, TinyArch, build_causal_lm, build_tokenizer

    spec = ModelSpec(tiny=TinyArch(family="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128))
    start = {k: v for k, v in build_causal_lm(spec, build_tokenizer(spec)).state_dict().items() if k in single}
    moved = max_diff(single, start)
    assert moved > 1e-3, "training did not move the weights"
    assert max_diff(multi, single) < 2e-4 < moved / 10
    torch.testing.assert_close(multi["lm_head.weight"], single["lm_head.weight"], rtol=0, atol=2e-4)



def _one_and_two(tmp_path, args: list[str], two_ranks: list[str], file: str = "model.safetensors"):
    """Run ``args`` once with one process (batch 16) and once with two (batch 8 each, ``two_ranks``);
    return both exported weight files."""
    out = []
    for name, extra, batch in (("one", [], "16"), ("two", two_ranks, "8")):
        root = tmp_path / name
        run_cli([*args, *extra, "--trainer.default_root_dir", str(root), "--trainer.logger.save_dir", str(root),
                 "--data.init_args.batch_size", batch])
        out.append(load_file(root / "hf_export" / file))
    return out


def test_fsdp2_with_tied_embeddings_matches_one_process(tmp_path):
    """Tied input/output embeddings live in the root FSDP2 unit with the rest of the LM."""
    tied = ["--model.init_args.model.tiny.tie_word_embeddings", "true", "--trainer.max_steps", "2"]
    one, two = _one_and_two(tmp_path, [*COMMON, *tied], FSDP2)
    assert "lm_head.weight" not in one  # tied: saved once, as the input embedding
    assert max_diff(two, one) < 2e-4


def test_sft_ddp_matches_one_process(tmp_path):
    """SFT normalises by the global token count, so 2 ranks x 8 equal 1 rank x 16 although the
    ranks' batches hold different numbers of response tokens."""
    sft = ["fit", "--config", str(REPO / "configs/sft/tiny.yaml"), "--trainer.max_steps", "4",
           "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
           "--trainer.callbacks", "lit_align.callbacks.HFExport"]
    one, two = _one_and_two(tmp_path, sft, DDP)
    assert max_diff(two, one) < 2e-4


def test_fsdp2_loads_a_local_model_on_rank_0_only_and_trains_lora_like_one_process(tmp_path):
    """A `save_pretrained` directory (as a hub model would be) under FSDP2: ranks build on the meta
    device, rank 0 alone reads the weights and broadcasts them; LoRA adapters with the adapter-disabled
    reference train as in one process."""
    from lit_align.models import ModelSpec, TinyArch, build_causal_lm, build_tokenizer

    spec = ModelSpec(tiny=TinyArch(family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                   intermediate_size=128), seed=5)
    local = tmp_path / "local_model"
    tokenizer = build_tokenizer(spec)
    build_causal_lm(spec, tokenizer).save_pretrained(local)
    tokenizer.save_pretrained(local)
    lora = ["--model.init_args.model", f"{{name_or_path: {local}, tiny: null, lora: {{r: 4, alpha: 8}}}}",
            "--model.init_args.reference", "adapter", "--trainer.max_steps", "3"]
    one, two = _one_and_two(tmp_path, [*COMMON, *lora], FSDP2, file="adapter_model.safetensors")
    assert one and max_diff(two, one) < 2e-4
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 0  # the adapters trained


UNLEARN = ["fit", "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false",
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.val_check_interval", "2"]


@pytest.mark.parametrize("config, strategy", [
    ("configs/wagle/npo_tiny.yaml", "ddp"),
    # about 50 s: in the integration tier, which CI also runs
    pytest.param("configs/unlearning/llmu/tiny.yaml", "fsdp2", marks=pytest.mark.integration),
], ids=["wagle-npo-strict-ddp", "llmu-fsdp2"])
def test_unlearning_two_processes_match_one(config, strategy, tmp_path):
    """Unlearning on 2 ranks x 8 forget examples == 1 rank x 16: the retain/mismatch pairing follows
    the stream position, token-mean terms use the global token count, the WAGLE mask (strict) is the
    same and frozen entries stay put; under FSDP2 the frozen reference copy and the KL are sharded."""
    callbacks = ["--trainer.callbacks", "lit_align.callbacks.HFExport"]
    if "wagle" in config:
        callbacks += ["--trainer.callbacks+=lit_align.callbacks.WeightMask", "--trainer.callbacks.ratio", "0.5",
                      "--trainer.callbacks.strict", "true"]
    two = DDP if strategy == "ddp" else [*FSDP2, *callbacks]
    one, multi = _one_and_two(tmp_path, [*UNLEARN, "--config", str(REPO / config), *callbacks], two)
    diff = torch.cat([(multi[k] - one[k]).abs().flatten() for k in one])
    # AdamW at lr 3e-3 moves every weight by ~lr per step whatever its gradient's size, so a weight
    # whose gradient is ~0 can take the other sign from reduction-order noise (FSDP2 reduce-scatters
    # in another order than one process sums): a handful of entries may differ by up to 2 lr per
    # step, everything else agrees to float precision
    assert (diff > 1e-5).float().mean() < 1e-3, (diff > 1e-5).float().mean()
    assert diff.max() < 2 * 3e-3 * 4
    if "wagle" in config:
        from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer

        spec = ModelSpec(name_or_path="builtin:tiny-tofu-full")
        start = build_causal_lm(spec, build_tokenizer(spec)).state_dict()
        mask = torch.load(next(tmp_path.rglob("wagle_0.5.pt")), weights_only=False)
        assert mask is not None
        frozen = sum(int((multi[k] == start[k]).sum()) for k in multi)
        total = sum(v.numel() for v in multi.values())
        assert frozen >= total // 2  # strict: at least the masked-out half is bit-identical
