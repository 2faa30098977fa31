"""FISModule through the real CLI on a tiny tabular file (others.md §4(c), §4(g) 3-4, §4(h)6; resume)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main
from lit_align.errors import ConfigError

FIS = "lit_align.classifiers.FairInfluenceSampler"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """400 rows: y = [f0 > 0] with 10% label noise, group g shifts f1 (a proxy), as a CSV."""
    rng = np.random.default_rng(0)
    g = (rng.random(400) < 0.5).astype(int)
    f0, f1 = rng.normal(size=400), rng.normal(size=400) + 1.5 * g
    y = ((f0 > 0) ^ (rng.random(400) < 0.1)).astype(int)
    path = tmp_path_factory.mktemp("fis_table") / "rows.csv"
    pd.DataFrame({"f0": f0, "f1": f1, "g": g, "y": y}).to_csv(path, index=False)
    return path


def _args(table, root, *extra, sampler: str | None = FIS, epochs: int = 3):
    data = ["--data", "lit_align.data.TabularDataModule", "--data.init_args.path", str(table),
            "--data.init_args.target", "y", "--data.init_args.group", "g", "--data.init_args.batch_size", "8",
            "--data.init_args.split", "lit_align.data.ActiveLearningSplit",
            "--data.init_args.split.init_args.val_ratio", "0.2", "--data.init_args.split.init_args.test_ratio", "0.2"]
    model = ["--model", "lit_align.methods.FISModule", "--model.init_args.backbone", "lit_align.classifiers.MLPBackbone",
             "--model.init_args.backbone.init_args.hidden", "[8]", "--model.init_args.budget", "6",
             "--model.init_args.round_steps", "2", "--model.init_args.warm_epochs", "1",
             "--model.init_args.sampler", sampler or "null",
             "--model.init_args.new_prob", "0.5",
             "--model.init_args.optimizer", "torch.optim.Adam", "--model.init_args.optimizer.init_args.lr", "0.05"]
    trainer = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir",
               str(root), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1", "--seed_everything", "0"]
    return ["fit", *trainer, *model, *data, *extra]


def test_fis_rounds_spend_the_budget_on_every_queried_row(table, tmp_path):
    """After the 1-epoch warm-up, a round every 2 steps: each queries at most `budget` rows through the oracle, the
    budget counts every queried row (kept or discarded by the true-label recheck), kept rows join the new data."""
    cli = cli_main([*_args(table, tmp_path), *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path)])
    model = cli.model
    state, oracle = model.state, model.oracle
    assert state.rounds >= 2
    assert 0 < oracle.spent <= state.rounds * 6
    assert oracle.spent == len(state.queried) == len(set(state.seen))
    assert set(state.new_indices) <= set(state.queried)
    assert set(state.queried) <= set(cli.datamodule.indices("pool").tolist())
    labels = cli.datamodule.labels(state.new_indices).tolist()
    assert state.new_labels == labels  # queried rows carry their true labels
    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = pd.read_csv(metrics)
    assert logged["fis/spent"].dropna().iloc[-1] == oracle.spent
    kept, discarded = logged["fis/kept"].dropna().iloc[-1], logged["fis/discarded"].dropna().iloc[-1]
    assert kept + discarded == oracle.spent and kept == len(state.new_indices) == state.kept
    assert logged["fis/new_batch"].dropna().max() == 1.0
    assert np.isfinite(logged["val/dp_gap"].dropna()).all()


def test_sampler_null_is_erm_on_the_labelled_set(table, tmp_path):
    cli = cli_main(_args(table, tmp_path, sampler=None, epochs=2))
    assert cli.model.state.rounds == 0 and cli.model.oracle.spent == 0 and not cli.model.state.new_indices
    assert cli.trainer.global_step == 2 * -(-len(cli.datamodule.indices("labelled")) // 8)


def test_budget_larger_than_the_pool_names_the_key(table, tmp_path):
    with pytest.raises(ConfigError, match=r"model.init_args.budget=100000 is larger than the unlabelled pool"):
        cli_main(_args(table, tmp_path, "--model.init_args.budget", "100000"))


def test_training_rows_with_nan_groups_change_nothing(table, tmp_path, monkeypatch):
    """§4(g)4: training batches (labelled and new data) given a NaN ``group`` train exactly as without it: the
    training code never reads it (a fairness term on training groups would turn the loss NaN)."""
    from lit_align.data.classification import ClassificationDataModule

    plain = cli_main(_args(table, tmp_path / "plain", epochs=2)).model
    original = ClassificationDataModule.on_after_batch_transfer

    def with_nan_group(self, batch, dataloader_idx):
        batch = original(self, batch, dataloader_idx)
        if self.trainer is not None and self.trainer.training:
            batch["group"] = torch.full((len(batch["y"]),), float("nan"))
        return batch

    monkeypatch.setattr(ClassificationDataModule, "on_after_batch_transfer", with_nan_group)
    nan = cli_main(_args(table, tmp_path / "nan", epochs=2)).model
    for (name, a), b in zip(plain.net.state_dict().items(), nan.net.state_dict().values()):
        assert torch.isfinite(b).all() and torch.equal(a, b), name
    assert nan.state.new_indices == plain.state.new_indices and nan.state.rounds > 0


def test_pseudo_label_epochs_add_rows_without_spending(table, tmp_path):
    """The last epoch's rounds add the sampler's picks with their pseudo-labels and query nothing (tol 1: the
    accuracy condition always holds): rows spent = rows queried before it, pseudo rows are not in the queried set."""
    cli = cli_main(_args(table, tmp_path, "--model.init_args.pseudo_label_epochs", "1", "--model.init_args.tol", "1.0"))
    state = cli.model.state
    assert state.pseudo_added > 0
    assert cli.model.oracle.spent == len(state.queried)
    pseudo = set(state.seen) - set(state.queried)
    assert len(pseudo) == state.pseudo_added
    assert not pseudo & set(state.queried)


CHECKPOINTS = """\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, every_n_train_steps: 9, dirpath: DIR}
"""


def test_resume_restores_the_selection_state_exactly(table, tmp_path):
    """Fit 3 epochs straight, or stop mid-epoch after step 9 (rounds already ran) and resume from that checkpoint:
    the same weights, selected rows, labels, budget spent and round count."""
    straight = cli_main(_args(table, tmp_path / "a")).model
    (tmp_path / "ckpt.yaml").write_text(CHECKPOINTS.replace("DIR", str(tmp_path / "ckpts")))
    ckpt = ["-c", str(tmp_path / "ckpt.yaml")]
    first = cli_main([*_args(table, tmp_path / "b", "--trainer.max_steps", "9"), *ckpt])
    assert 0 < first.model.state.rounds < straight.state.rounds
    last = tmp_path / "ckpts" / "last.ckpt"
    resumed = cli_main([*_args(table, tmp_path / "b"), *ckpt, "--ckpt_path", str(last)]).model
    assert vars(resumed.state) == vars(straight.state)
    assert resumed.oracle.spent == straight.oracle.spent
    for (name, a), b in zip(straight.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name


def test_samplers_by_class_path(table, tmp_path):
    """Random, entropy and JTT run the same rounds through the oracle, every queried row joins the new data (JTT's
    repeats of misclassified rows: test_influence.py::test_baseline_samplers)."""
    for sampler in ("lit_align.classifiers.RandomSampler", "lit_align.classifiers.EntropySampler",
                    "lit_align.classifiers.JTTSampler"):
        model = cli_main(_args(table, tmp_path / sampler, sampler=sampler, epochs=2)).model
        assert model.state.rounds > 0 and model.oracle.spent == model.state.rounds * 6 == len(model.state.queried)
        assert len(set(model.state.new_indices)) == model.oracle.spent


def test_compas_config_runs_a_short_fit(tmp_path):
    """configs/fis/compas.yaml through the CLI on the real COMPAS rows, shortened to 2 epochs."""
    cli = cli_main(["fit", "-c", str(REPO / "configs/fis/compas.yaml"), "--trainer.default_root_dir", str(tmp_path),
                    "--trainer.max_epochs", "2", "--model.init_args.warm_epochs", "1", "--model.init_args.round_steps",
                    "2", "--model.init_args.pseudo_label_epochs", "0",
                    "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"])
    assert cli.model.state.rounds >= 2 and cli.model.oracle.spent > 0
    assert cli.trainer.callback_metrics["val/dp_gap"] >= 0


def test_mix_probabilities_follow_the_code():
    """labelled / new / org with [1 - p, p (1 - r), p r]; while the new data fills < 2 batches p = (n_new + 1) /
    (n_new + n_labelled) in batches; no new data: labelled only."""
    from lit_align.methods.fis import mix_probabilities

    assert mix_probabilities(0.9, 0.5, 3, 9) == pytest.approx([0.1, 0.45, 0.45])
    assert mix_probabilities(0.9, 0.5, 1, 9) == pytest.approx([0.8, 0.1, 0.1])
    assert mix_probabilities(0.9, 0.0, 2, 9) == pytest.approx([0.1, 0.9, 0.0])
    assert mix_probabilities(0.9, 0.5, 0, 9) == [1.0, 0.0, 0.0]


def test_code_mixing_trains_on_one_batch_per_step(table, tmp_path, monkeypatch):
    """mix: code (default): each step runs ONE forward, on the labelled batch or a new-data batch (never both), and
    the new-data batches of a pass cover the new rows without repeats."""
    from lit_align.methods.fis import FISModule

    calls, per_step, batches = [0], [], []
    forward, step, stream_batch = FISModule.forward, FISModule.training_step, FISModule._stream_batch

    def counting_forward(self, x):
        calls[0] += 1
        return forward(self, x)

    def counting_step(self, batch, batch_idx):
        calls[0] = 0
        out = step(self, batch, batch_idx)
        per_step.append(calls[0])
        return out

    def recording(self, name):
        before = list(self.state.streams[name])
        x, y = stream_batch(self, name)
        batches.append((name, before, len(self.state.new_indices), len(y)))
        return x, y

    monkeypatch.setattr(FISModule, "forward", counting_forward)
    monkeypatch.setattr(FISModule, "training_step", counting_step)
    monkeypatch.setattr(FISModule, "_stream_batch", recording)
    cli_main(_args(table, tmp_path, "--model.init_args.new_prob", "0.9", epochs=4))
    assert per_step and set(per_step) == {1}
    assert {name for name, *_ in batches} == {"new", "org"}  # both new-data streams were drawn


def test_new_data_stream_shards_a_pass_over_ranks():
    """Two ranks' shards of one pass are disjoint and cover every new row (n divisible by the world)."""
    from lit_align.methods.fis import stream_rows

    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shards = [torch.cat([stream_rows(10, pos, 2, rank, 2, perm) for pos in range(0, 5, 2)]) for rank in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert stream_rows(10, 5, 2, 0, 2, perm).numel() == 0  # the pass is over


def test_every_round_reaches_the_log_whatever_log_every_n_steps(table, tmp_path):
    """Rounds log their totals and counts straight to the logger: with log_every_n_steps 50 (> the run's steps)
    every round still has a row, and the epoch end logs the totals."""
    cli = cli_main([*_args(table, tmp_path), *CSV_LOGGER, "--trainer.logger.save_dir", str(tmp_path),
                    "--trainer.log_every_n_steps", "50"])
    state = cli.model.state
    (metrics,) = tmp_path.rglob("metrics.csv")
    logged = pd.read_csv(metrics)
    assert logged["fis/round_selected"].notna().sum() == state.rounds == len(state.round_log) >= 2
    assert sorted(logged["fis/rounds"].dropna().unique().tolist())[-1] == state.rounds
    assert {"candidates", "pass_remove_pos", "negative", "selected"} <= set(state.round_log[0])
    assert cli.trainer.callback_metrics["fis/spent"] == cli.model.oracle.spent


def test_pseudo_label_epochs_need_max_epochs(table, tmp_path):
    """A run bounded by max_steps only has no 'last epochs': refused, naming both keys (it used to pseudo-label
    every round silently)."""
    with pytest.raises(ConfigError, match=r"pseudo_label_epochs=1.*trainer.max_epochs"):
        cli_main(_args(table, tmp_path, "--model.init_args.pseudo_label_epochs", "1", "--trainer.max_epochs", "-1",
                       "--trainer.max_steps", "20"))


def test_gradient_accumulation_is_refused(table, tmp_path):
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=2"):
        cli_main(_args(table, tmp_path, "--trainer.accumulate_grad_batches", "2"))


def test_failed_accuracy_check_runs_a_queried_round(table, tmp_path, monkeypatch):
    """Last epoch, validation accuracy 0.4 below the first round's: with tol 0.1 its rounds query (no pseudo-labels,
    the code's fallback to sample_by_infl); with tol 0.5 they add pseudo-labelled rows at no cost. (Random
    sampling: it always selects `budget` rows.)"""
    from lit_align.methods.fis import FISModule

    def fake_accuracy(self, validation):
        return 0.9 if self.state.reference_acc is None else 0.5

    monkeypatch.setattr(FISModule, "_validation_accuracy", fake_accuracy)
    rand = "lit_align.classifiers.RandomSampler"
    blocked = cli_main(_args(table, tmp_path / "a", "--model.init_args.pseudo_label_epochs", "1",
                             "--model.init_args.tol", "0.1", sampler=rand)).model.state
    last = [r for r in blocked.round_log if r["epoch"] == 2]
    assert last and blocked.pseudo_added == 0 and all(r["queried"] > 0 and not r["pseudo"] for r in last)
    allowed = cli_main(_args(table, tmp_path / "b", "--model.init_args.pseudo_label_epochs", "1",
                             "--model.init_args.tol", "0.5", sampler=rand)).model.state
    assert allowed.pseudo_added > 0 and all(r["pseudo"] for r in allowed.round_log if r["epoch"] == 2)


def test_random_baseline_adds_random_labels_in_the_last_epochs(table, tmp_path):
    """As the code's baselines: random sampling's last-epoch rounds add rows with random labels, no query."""
    model = cli_main(_args(table, tmp_path, "--model.init_args.pseudo_label_epochs", "1", "--model.init_args.tol", "1",
                           sampler="lit_align.classifiers.RandomSampler")).model
    assert model.state.pseudo_added > 0 and model.oracle.spent == len(model.state.queried)


def test_samplers_load_from_a_checkpoint_with_weights_only(tmp_path):
    """A module built in Python keeps its sampler object in the hyperparameters; every sampler class survives
    torch.load(weights_only=True) with its settings."""
    from lit_align.classifiers import EntropySampler, FairInfluenceSampler, JTTSampler, RandomSampler

    samplers = [RandomSampler(), EntropySampler(mc_samples=3), JTTSampler(upweight=4),
                FairInfluenceSampler(fairness="eop", mu=0.5)]
    torch.save({"hyper_parameters": {"samplers": samplers}}, tmp_path / "h.ckpt")
    loaded = torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["samplers"]
    assert loaded == samplers
