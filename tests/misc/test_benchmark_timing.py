"""The timing harness of ``benchmarks/multiplayer_scaling.py`` and ``benchmarks/step_time.py``: the clock
callback on a real Trainer, and the pure functions that turn its rows into windows, intervals and tables (no
``lit-align`` subprocess runs here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO
from lightning.pytorch.demos.boring_classes import BoringModel

sys.path.append(str(REPO / "benchmarks"))  # last: its script names must not shadow other modules

import fit_timing  # noqa: E402
import multiplayer_scaling  # noqa: E402
import step_clock  # noqa: E402
import step_time  # noqa: E402


def _rows(ends: list[float], samples: int = 4, stages: list | None = None) -> list[dict]:
    stages = stages or [None] * len(ends)
    return [{"batch": i, "start": end - 0.5, "end": end, "samples": samples, "stage": stage}
            for i, (end, stage) in enumerate(zip(ends, stages))]


def test_steady_window_times_from_the_last_warmup_batch_and_sums_samples_over_ranks():
    # rank 0: batches end at 1, 2, 4, 7: after 1 warm-up batch, 3 batches from t=1 to t=7 (6 s)
    # rank 1 is slower (8.5 - 1.5 = 7 s): the window takes the slowest rank; samples add over ranks
    ranks = {0: _rows([1, 2, 4, 7]), 1: _rows([1.5, 2.5, 5, 8.5], samples=5)}
    window = fit_timing.steady_window(ranks, warmup=1)
    assert (window.steps, window.samples, window.seconds) == (3, 3 * 4 + 3 * 5, 7.0)
    assert window.samples_per_s == pytest.approx(27 / 7)
    assert window.step_s == pytest.approx(7 / 3)
    capped = fit_timing.steady_window(ranks, warmup=2, max_steps=1)  # batch 2 only: from t=2 to 4 (rank 1: 2.5)
    assert (capped.steps, capped.samples, capped.seconds) == (1, 9, 2.5)


def test_steady_window_is_the_slowest_ranks_wall_time_and_lockstep_the_sum_of_slowest_batches():
    # the slower rank alternates: rank 0's batches take 2 s then 1 s, rank 1's 1 s then 2 s; both end at t=4
    ranks = {0: _rows([1, 3, 4]), 1: _rows([1, 2, 4])}
    assert fit_timing.steady_window(ranks, warmup=1).seconds == 3.0  # the run's wall time, not 2 + 2
    assert fit_timing.steady_window(ranks, warmup=1, lockstep=True).seconds == 4.0  # each batch waits for the slower
    one = {0: _rows([1, 3, 4])}
    assert fit_timing.steady_window(one, warmup=1, lockstep=True).seconds == 3.0  # one rank: the same either way


def test_steady_window_can_leave_out_partial_batches():
    # batch 2 is an epoch's last, partial batch on rank 1: left out of samples and seconds (its 3 s) with full_batches
    ranks = {0: _rows([1, 2, 5, 6]), 1: _rows([1, 2, 5, 6])}
    ranks[1][2]["samples"] = 1
    everything = fit_timing.steady_window(ranks, warmup=1)
    assert (everything.steps, everything.samples, everything.seconds, everything.skipped) == (3, 21, 5.0, 0)
    full = fit_timing.steady_window(ranks, warmup=1, full_batches=True)
    assert (full.steps, full.samples, full.seconds, full.skipped) == (2, 16, 2.0, 1)


def test_steady_window_of_a_stage_and_one_window_per_stage():
    stages = ["generate"] * 4 + ["train"] * 3
    ranks = {0: _rows([1, 3, 5, 7, 20, 21, 23], stages=stages)}
    generate = fit_timing.steady_window(ranks, warmup=1, stage="generate")
    assert (generate.steps, generate.seconds) == (3, 6.0)  # batches 1-3, from t=1 to t=7
    windows = fit_timing.stage_windows(ranks, warmup=1)
    assert list(windows) == ["generate", "train"]
    assert (windows["train"].steps, windows["train"].seconds) == (2, 3.0)  # batches 5-6, from t=20 to 23
    assert list(fit_timing.stage_windows({0: _rows([1, 2, 3])}, warmup=1)) == ["all"]
    assert list(fit_timing.stage_windows({0: _rows([1, 2, 3], stages=["a", "a", "b"])}, warmup=1)) == ["a"]
    ranks[0][5]["samples"] = 1  # the train stage's first timed batch is partial: left out with full_batches
    assert fit_timing.stage_windows(ranks, warmup=1, full_batches=True)["train"].seconds == 2.0


def test_steady_window_refuses_what_it_cannot_time():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        fit_timing.steady_window({0: _rows([1, 2])}, warmup=0)
    with pytest.raises(ValueError, match="none of stage 'generate' left after 1"):
        fit_timing.steady_window({0: _rows([1, 2], stages=["train", "train"])}, warmup=1, stage="generate")
    with pytest.raises(ValueError, match="different numbers of batches"):
        fit_timing.steady_window({0: _rows([1, 2, 3]), 1: _rows([1, 2])}, warmup=1)
    with pytest.raises(ValueError, match="no clock rows"):
        fit_timing.steady_window({}, warmup=1)


def test_mean_interval_is_the_student_t_interval():
    # values 1..5: mean 3, sample sd sqrt(2.5) = 1.58114, t(0.975, 4 df) = 2.776445;
    # half-width 2.776445 * 1.58114 / sqrt(5) = 1.96324
    mean, low, high = fit_timing.mean_interval([1, 2, 3, 4, 5])
    assert mean == 3
    assert (low, high) == pytest.approx((3 - 1.96324, 3 + 1.96324), abs=1e-5)
    assert fit_timing.mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    one = fit_timing.mean_interval([4.0])
    assert one[0] == 4.0 and math.isnan(one[1]) and math.isnan(one[2])


def test_error_line_finds_the_exception_of_a_failed_run():
    ddp = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in setup\n"
           "[rank1]: NotImplementedError: GameModule runs on one device for now: set trainer.devices: 1\n"
           "W1206 10:00:00 process_group.py:12] destroy_process_group() was not called\n")
    assert fit_timing.error_line(ddp) == ("[rank1]: NotImplementedError: GameModule runs on one device for now: "
                                          "set trainer.devices: 1")
    assert fit_timing.error_line("Traceback\nlit_align.errors.ConfigError: model.k must be >= 1\n\n") == (
        "lit_align.errors.ConfigError: model.k must be >= 1")
    assert fit_timing.error_line("Killed\n") == "Killed"
    assert fit_timing.error_line("") == "(no output)"


def test_set_keys_finds_a_key_inside_a_config_block():
    cfg = {"init_args": {"actor": {"lora": {"r": 8}}, "phase": {"questions_per_phase": 160, "k": 2}}}
    assert fit_timing.set_keys(cfg, {"questions_per_phase": None}) == ["init_args.phase.questions_per_phase"]
    assert cfg["init_args"]["phase"] == {"questions_per_phase": None, "k": 2}
    assert fit_timing.set_keys(cfg, {"absent": 1}) == []


def test_command_adds_the_strategy_preset_and_the_clock(tmp_path):
    run = fit_timing.FitRun(tree=tmp_path, config="configs/debate/tiny.yaml", batches=8, world=2,
                            strategy="fsdp2", stage="generate")
    cmd = fit_timing.command(run, tmp_path / "tiny.yaml", tmp_path / "out", tmp_path / "clock")
    joined = " ".join(cmd)
    assert f"--config {tmp_path / 'callbacks/fsdp2_cpu.yaml'} --trainer.devices 2" in joined
    assert "--threads 1" in joined and "--trainer.limit_val_batches 0" in joined
    assert "--trainer.callbacks step_clock.StepClock" in joined
    assert "--trainer.callbacks.stop_after 8 --trainer.callbacks.stage generate" in joined
    single = fit_timing.command(fit_timing.FitRun(tree=tmp_path, config="c.yaml", batches=3), tmp_path / "c.yaml",
                                tmp_path / "out", tmp_path / "clock")
    assert "--trainer.devices" not in single and "callbacks/ddp_cpu.yaml" not in " ".join(single)


def test_check_meta_refuses_code_from_another_tree(tmp_path):
    clock = tmp_path / "clock"
    clock.mkdir()
    (clock / "meta_rank0.json").write_text('{"module_file": "/elsewhere/lit_align/methods/game.py", "world_size": 1}')
    with pytest.raises(fit_timing.RunFailed, match="not the code of"):
        fit_timing.check_meta(clock, tmp_path, world=1)
    with pytest.raises(fit_timing.RunFailed, match="1 rank\\(s\\) started training, expected 2"):
        fit_timing.check_meta(clock, tmp_path, world=2)
    (clock / "meta_rank0.json").write_text(f'{{"module_file": "{tmp_path}/lit_align/m.py", "world_size": 1}}')
    fit_timing.check_meta(clock, tmp_path, world=1)


def test_step_clock_on_a_real_trainer(tmp_path):
    """The callback writes one row per batch and stops the run after ``stop_after`` batches."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[step_clock.StepClock(str(tmp_path / "clock"), stop_after=5)],
                        default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    ranks = fit_timing.read_clock(tmp_path / "clock")
    assert list(ranks) == [0] and [r["batch"] for r in ranks[0]] == [0, 1, 2, 3, 4]
    assert all(r["samples"] == 1 and r["stage"] is None and r["end"] > r["start"] for r in ranks[0])
    fit_timing.check_meta(tmp_path / "clock", Path(L.__file__).parent, world=1)  # BoringModel lives in lightning
    assert fit_timing.steady_window(ranks, warmup=1).samples == 4  # BoringModel: batches of 1
    assert step_clock.batch_length({"ids": [1, 2, 3]}) == 3 and step_clock.batch_length(object()) is None


def test_scaling_summary_and_table():
    res = multiplayer_scaling.summarize([10.0, 12.0], [18.0, 24.0])  # ratios 1.8 and 2.0
    assert res["ratio"]["mean"] == pytest.approx(1.9) and res["met"] is True
    assert res["single_samples_s"]["values"] == [10.0, 12.0]
    failed = multiplayer_scaling.summarize([10.0], [])
    assert "ratio" not in failed and "met" not in failed and failed["single_samples_s"]["low"] is None
    table = multiplayer_scaling.markdown({"game": {**multiplayer_scaling.summarize([10.0, 10.0], [15.0, 16.0])},
                                          "debate": {**failed, "error": "2 rank(s): exit 1: NotImplementedError: x"}},
                                         world=2, strategy="ddp")
    lines = table.splitlines()
    assert lines[0].startswith("| method | 1 rank samples/s | 2 ranks (ddp) samples/s | ratio |")
    assert lines[2].startswith("| game | 10.0 [10.0, 10.0] | 15.5 [") and "| **no** |" in lines[2]
    assert lines[3] == "| debate | 10.0 | - | - | - | 2 rank(s): exit 1: NotImplementedError: x |"
    assert lines[1] == "|---|---|---|---|---|---|"
    # the machine's ceiling: 2 independent 1-rank runs at once gave 16 and 18 samples/s
    # in lockstep (each batch as long as the slower copy's) they would have given 15 and 17
    res = multiplayer_scaling.summarize([10.0, 10.0], [15.0, 16.0], independent=[16.0, 18.0], lockstep=[15.0, 17.0])
    assert res["ceiling"]["mean"] == pytest.approx(1.7) and res["efficiency"]["values"] == [15 / 16, 16 / 18]
    assert res["lockstep_ceiling"]["mean"] == pytest.approx(1.6)
    assert res["lockstep_efficiency"]["values"] == [1.0, 16 / 17]
    lines = multiplayer_scaling.markdown({"game": res}, world=2, strategy="ddp").splitlines()
    assert lines[0].endswith("| 2 independent 1-rank runs, samples/s | ceiling | efficiency | lockstep ceiling | "
                             "efficiency | note |")
    assert lines[1] == "|---" * 11 + "|" and lines[2].count("|") == 12
    assert "| 17.0 [" in lines[2] and "| 1.70 [" in lines[2] and "| 1.60 [" in lines[2]


def test_window_span_and_overlap():
    rows = [{"start": float(i), "end": i + 1.0, "samples": 2, "stage": None} for i in range(5)]
    assert fit_timing.window_span(rows, warmup=2) == (2.0, 5.0)
    assert fit_timing.window_span(rows, warmup=1, max_steps=2) == (1.0, 3.0)
    assert fit_timing.overlap_share([(0.0, 10.0), (1.0, 11.0)]) == pytest.approx(0.9)
    assert fit_timing.overlap_share([(0.0, 1.0), (2.0, 3.0)]) == 0.0
    with pytest.raises(ValueError, match="no timed batch"):
        fit_timing.window_span(rows, warmup=5)


def test_step_time_summary_and_table():
    res = step_time.summarize([0.102, 0.104], [0.100, 0.100])  # ratios 1.02 and 1.04, in ms 102 and 104
    assert res["ratio"]["mean"] == pytest.approx(1.03) and res["met"] is True
    assert res["current_ms"]["mean"] == pytest.approx(103.0)
    assert step_time.summarize([0.12], [0.1])["met"] is False
    table = step_time.markdown({"debate": {"stages": {"generate": res}}, "game": {"error": "baseline: exit 1: X"}},
                               baseline="2b9c0fc")
    lines = table.splitlines()
    assert lines[2].startswith("| debate | generate | 100.0 [100.0, 100.0] | 103.0 [") and "| yes |" in lines[2]
    assert lines[3] == "| game | - | - | - | - | - | baseline: exit 1: X |"
