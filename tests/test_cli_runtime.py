"""What every CLI run shares: the CPU thread policy and a log free of library noise."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.callbacks import CPUThreads
from lit_align.cli import cli_main
from lit_align.models import ModelSpec, TinyArch, build_causal_lm, build_tokenizer
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

FAST = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


@pytest.fixture
def restore_threads(monkeypatch):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _fit(tmp_path, *extra: str):
    cli = cli_main(["fit", "-c", str(REPO / "configs/sft/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path), *FAST, *extra])
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, CPUThreads))


def test_auto_threads_use_one_thread_for_a_small_model_on_cpu(tmp_path, restore_threads):
    policy = _fit(tmp_path)
    assert policy.threads == "auto" and policy.chosen == 1 and torch.get_num_threads() == 1


def test_threads_from_the_command_line_and_omp_num_threads_win_over_auto(tmp_path, restore_threads, monkeypatch):
    policy = _fit(tmp_path / "a", "--threads", "2")
    assert policy.chosen == 2 and torch.get_num_threads() == 2
    policy = _fit(tmp_path / "b", "--threads", "0")  # torch's default: untouched
    assert policy.chosen is None and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    policy = _fit(tmp_path / "c")
    assert policy.chosen is None and torch.get_num_threads() == 2


def test_auto_keeps_torchs_default_for_a_model_above_the_threshold(tmp_path, restore_threads):
    cli = cli_main(["-c", str(REPO / "configs/sft/tiny.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path), *FAST], run=False)
    policy = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CPUThreads))  # the one the CLI added
    policy.small_model_params = 1000
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert policy.chosen == 0 and torch.get_num_threads() == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "all"])
def test_bad_threads_values_name_the_setting(bad):
    with pytest.raises(ValueError, match="threads must be 'auto' or an integer >= 0"):
        CPUThreads(bad)


def test_sampler_passes_the_cache_under_the_current_keyword():
    """transformers >= 5.25 deprecates ``past_key_values`` (removed in 5.40): the sampler must not use it."""
    spec = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
    tokenizer = build_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer)
    ids, mask = left_pad([[5, 6, 7], [8, 9]], tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = sample(model, ids, mask, SamplingConfig(max_new_tokens=4, do_sample=False),
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # decoding with the cache equals decoding without it (the cache really was used, not dropped)
    row = torch.tensor([[5, 6, 7]])
    for step in range(out.response_ids.shape[1]):
        logits = model(input_ids=row, use_cache=False).logits[:, -1]
        assert int(logits.argmax(-1)) == int(out.response_ids[0, step])
        row = torch.cat([row, out.response_ids[:1, step : step + 1]], dim=1)


NOISE = ("💡 Tip", "anonymous setting", "git root", "LeafSpec", "past_key_values", "in eval mode",
         "is_gradient_checkpointing")


def test_a_cli_run_prints_no_library_noise(tmp_path):
    """One real ``lit-align fit`` with the default (offline W&B) logger: none of the messages a user cannot act on."""
    exe = os.path.join(os.path.dirname(sys.executable), "lit-align")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([exe, "fit", "-c", "configs/dpo/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
                           *FAST], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    for text in NOISE:
        assert text not in log, f"{text!r} in the log:\n{log[-4000:]}"
    assert "torch uses 1 CPU thread(s) per process (a small model" in log
