"""`make demo` (WAGLE + NPO unlearning on the tiny TOFU) prints its before/after table."""

from __future__ import annotations

from conftest import CSV_LOGGER, REPO

from lit_align.demo import unlearning_demo


def test_unlearning_demo_prints_the_table(tmp_path, capsys):
    table = unlearning_demo(str(REPO / "configs/wagle/npo_tiny.yaml"), tmp_path,
                            ["--trainer.enable_progress_bar", "false", *CSV_LOGGER, "--trainer.logger.save_dir",
                             str(tmp_path)])
    out = capsys.readouterr().out
    for text in ("forget_quality", "model_utility", "retain_only", "relearned", "weight mask (wagle, top 50%",
                 "unlearning_eval.png", "HF export"):
        assert text in out, text
    assert out.count("forget_quality") == 2, "one table and its legend: the evaluation's own table is not printed"
    for phase in ("[1/3]", "[2/3]", "[3/3]"):
        assert out.count(phase) == 1, phase
    assert table["unlearned"]["forget_quality"] > table["start"]["forget_quality"]
    assert table["unlearned"]["forget_rouge"] < table["start"]["forget_rouge"]
    assert table["unlearned"]["retain_rouge"] > 0.8
    assert list(tmp_path.rglob("unlearning_eval.csv")) and list(tmp_path.rglob("unlearning_eval.png"))
