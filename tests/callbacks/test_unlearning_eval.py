"""UnlearningEvaluation on a tiny SFT policy under a real Trainer, with a small stand-in DataModule.

The stand-in provides what the callback reads from ``ForgetRetainDataModule`` (``eval_records``,
``encode_prompt``, ``encode_response``) plus real SFT batches of the forget records to train on.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib import resources

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_align.callbacks.unlearning_eval import UnlearningEvaluation
from lit_align.data.tokenize import SequenceCollator, SequenceExample, encode_prompt, encode_response
from lit_align.methods import SFTModule
from lit_align.models import ModelSpec, TinyArch
from lit_align.rollout.logps import token_logps

SPEC = ModelSpec(tiny=TinyArch(family="llama", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=64))


def _records() -> dict[str, list[dict]]:
    """Fictitious-facts questions: 4 forget, 4 retain, 4 holdout; the holdout ones as multiple choice too."""
    path = resources.files("lit_align") / "data" / "builtin" / "fictitious_facts.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def record(r: dict, mc: bool = False) -> dict:
        out = {"prompt": r["question"], "response": r["answer"], "paraphrased_prompt": r["paraphrased_question"],
               "paraphrased_response": r["paraphrased_answer"], "perturbed_responses": r["perturbed_answers"]}
        if mc:
            out.update(choices=[*r["perturbed_answers"][:2], r["answer"]], label=2)
        return out

    return {"forget": [record(r) for r in raw[:4]], "retain": [record(r) for r in raw[4:8]],
            "holdout": [record(r, mc=True) for r in raw[8:12]]}


class EvalData(L.LightningDataModule):
    """Trains on the forget records (SFT batches of 2); evaluation records as given."""

    def __init__(self, records: dict[str, list[dict]]) -> None:
        super().__init__()
        self.records = records

    def setup(self, stage: str) -> None:
        self.tokenizer = self.trainer.lightning_module.tokenizer
        self.chat = bool(self.tokenizer.chat_template)

    def eval_records(self) -> dict[str, list[dict]]:
        return self.records

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat)

    def encode_response(self, response: str) -> list[int]:
        return encode_response(self.tokenizer, response)

    def _loader(self) -> DataLoader:
        examples = [SequenceExample(self.encode_prompt(r["prompt"]), self.encode_response(r["response"]), i)
                    for i, r in enumerate(self.records["forget"]) if "response" in r]  # bad records: the callback's job
        return DataLoader(examples, batch_size=2, collate_fn=SequenceCollator(self.tokenizer.pad_token_id))

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


class _Snapshot(L.Callback):
    """Keeps the policy weights as they are when training ends (before the evaluation callback runs)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def _fit(tmp_path, evaluation: UnlearningEvaluation, lr: float, records=None, steps: int = 2, extra=()):
    module = SFTModule(SPEC, optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, logger=CSVLogger(tmp_path), default_root_dir=tmp_path,
                        callbacks=[*extra, evaluation])
    trainer.fit(module, datamodule=EvalData(records or _records()))
    return trainer, module


def _callback(**kwargs) -> UnlearningEvaluation:
    return UnlearningEvaluation(**{"batch_size": 3, "max_new_tokens": 6, "verbose": False, **kwargs})


def test_unchanged_model_equals_start_and_relearning_zero_steps_changes_nothing(tmp_path):
    """Checklist 11.3: with lr = 0 the "unlearned" model is the original, so every metric equals its
    start value, and a relearning attack of 0 steps leaves every forget metric unchanged (deltas 0).
    The retain-only model here has the policy's own weights: forget quality 1 (identical truth ratios)."""
    evaluation = _callback(retain_model=SPEC, relearn_steps=0)
    trainer, module = _fit(tmp_path, evaluation, lr=0.0)
    res = evaluation.results
    assert list(res) == ["retain_only", "start", "unlearned", "relearned"]
    assert res["start"] == res["unlearned"] == res["retain_only"]
    for key in ("forget_nll", "forget_accuracy", "forget_prob", "forget_rouge", "forget_truth_ratio",
                "forget_truth_ratio_score", "retain_nll", "retain_rouge", "holdout_nll", "holdout_mc_accuracy",
                "mia_auc", "forget_quality", "model_utility"):
        assert key in res["start"], key
    assert res["start"]["forget_quality"] == 1.0
    deltas = {k: v for k, v in res["relearned"].items() if k.startswith("relearn_delta_")}
    assert set(deltas) >= {"relearn_delta_forget_rouge", "relearn_delta_forget_accuracy", "relearn_delta_forget_nll"}
    assert all(v == 0.0 for v in deltas.values()), deltas
    for key, value in res["relearned"].items():
        if not key.startswith("relearn_delta_"):
            assert value == res["unlearned"][key], key

    # the forget NLL and P(a|q) of the table equal a direct computation on the records
    dm = trainer.datamodule
    nlls = []
    for r in _records()["forget"]:
        p, a = dm.encode_prompt(r["prompt"]), dm.encode_response(r["response"])
        ids = torch.tensor([p + a])
        resp = torch.tensor([[0] * len(p) + [1] * len(a)])
        with torch.no_grad():
            out = token_logps(module.policy, ids, torch.ones_like(ids), resp)
        nlls.append((-out.sum().item(), len(a)))
    assert res["start"]["forget_nll"] == pytest.approx(sum(n for n, _ in nlls) / sum(t for _, t in nlls), rel=1e-5)
    assert res["start"]["forget_prob"] == pytest.approx(
        sum(torch.exp(torch.tensor(-n / t)).item() for n, t in nlls) / len(nlls), rel=1e-5)

    # validation logged the current policy's numbers
    assert trainer.callback_metrics["val/unlearn/forget_nll"].item() == pytest.approx(res["unlearned"]["forget_nll"])
    # files: CSV with every row and column, and the chart
    path = evaluation.files["csv"]
    assert path.name == "unlearning_eval.csv" and path.parent == tmp_path / "lightning_logs" / "version_0"
    with path.open(newline="", encoding="utf-8") as f:
        lines = f.readlines()
    comments = [line for line in lines if line.startswith("# ")]
    assert lines[: len(comments)] == comments and [c[2:].rstrip("\n") for c in comments] == evaluation.conventions
    assert "arithmetic" in comments[0] and "forget = positive" in comments[1] and "Porter stemmer" in comments[2]
    header, *rows = list(csv.reader(lines[len(comments):]))
    assert header[0] == "model" and set(header[1:]) == set(evaluation.columns())
    assert [r[0] for r in rows] == ["retain_only", "start", "unlearned", "relearned"]
    assert float(rows[1][header.index("forget_nll")]) == pytest.approx(res["start"]["forget_nll"])
    assert evaluation.files["png"].stat().st_size > 1000
    assert "unlearned" in evaluation.format_table()


def test_training_moves_metrics_and_relearning_leaves_the_policy_alone(tmp_path):
    """SFT on the forget records (lr 0.02) lowers forget NLL from start to end; a 3-step relearning
    attack at lr 0.02 changes the forget NLL of its copy while the trained policy stays bit-identical."""
    snapshot = _Snapshot()
    evaluation = _callback(relearn_steps=3, relearn_lr=2e-2, relearn_fraction=0.5, dirpath=str(tmp_path / "eval"),
                           every_n_validations=0, truth_ratio_mean="geometric", mia_convention="open_unlearning",
                           rouge_stemmer=False)
    _, module = _fit(tmp_path, evaluation, lr=2e-2, steps=4, extra=[snapshot])
    res = evaluation.results
    assert list(res) == ["start", "unlearned", "relearned"]  # no retain_model: no retain_only row
    assert "forget_quality" not in res["unlearned"]
    assert res["unlearned"]["forget_nll"] < res["start"]["forget_nll"] - 0.1
    assert res["relearned"]["relearn_delta_forget_nll"] != 0.0
    assert res["relearned"]["forget_nll"] == pytest.approx(
        res["unlearned"]["forget_nll"] + res["relearned"]["relearn_delta_forget_nll"])
    for name, value in module.policy.state_dict().items():
        assert torch.equal(value, snapshot.weights[name]), name
    head = (tmp_path / "eval" / "unlearning_eval.csv").read_text(encoding="utf-8").splitlines()[:5]
    assert "geometric" in head[0] and "open-unlearning's convention" in head[1] and "without stemming" in head[2]
    assert "original question" in head[3] and head[4].startswith("model,")
    restored = _callback()  # rows evaluated before a checkpoint survive a resume
    restored.load_state_dict(evaluation.state_dict())
    assert restored.results == res


def test_non_default_options_reach_the_scorer_and_move_the_numbers():
    """The callback's options are not only header text: its scorer settings give a geometric truth ratio that
    differs from the arithmetic one, the complementary MIA AUC, a different truth ratio after the paraphrased
    question, and an unstemmed ROUGE-L below the stemmed one on inflected words."""
    from lit_align.metrics.unlearning import RougeLRecall
    from lit_align.models import build_causal_lm, build_tokenizer
    from lit_align.unlearning.scoring import ModelScorer, encode_record, score_splits

    tok = build_tokenizer(SPEC)
    torch.manual_seed(0)
    model = build_causal_lm(SPEC, tok).eval()
    records = _records()
    items = {s: [encode_record(r, lambda p: encode_prompt(tok, p, False), lambda a: encode_response(tok, a), s)
                 for r in records[s]] for s in ("forget", "retain")}
    module = SFTModule(SPEC)

    def run(callback):
        settings = callback._settings(module)
        values, _ = score_splits(ModelScorer(model, tok, "cpu", settings), items, forget_splits=("forget",),
                                 mia_positive="forget", mia_negative="retain")
        stemmed = RougeLRecall(use_stemmer=settings.rouge_stemmer)
        stemmed.update(["the cats were running quickly"], ["the cat was run quick"])
        return values, float(stemmed.compute())

    default, rouge_default = run(_callback())
    other, rouge_other = run(_callback(truth_ratio_mean="geometric", mia_convention="open_unlearning",
                                       rouge_stemmer=False))
    para, _ = run(_callback(truth_ratio_question="paraphrased"))
    assert other["forget_truth_ratio"] != pytest.approx(default["forget_truth_ratio"])
    assert other["mia_auc"] == pytest.approx(1 - default["mia_auc"])
    assert para["forget_truth_ratio"] != pytest.approx(default["forget_truth_ratio"])
    assert para["forget_nll"] == default["forget_nll"]  # only the truth ratio reads the question choice
    assert rouge_other < rouge_default


def test_missing_required_split_fails_loudly(tmp_path):
    records = _records()
    del records["retain"]
    with pytest.raises(ValueError, match=r"required evaluation split\(s\) \['retain'\]"):
        _fit(tmp_path, _callback(), lr=0.0, records=records, steps=1)
    with pytest.raises(ValueError, match="unknown split"):
        _callback(required_splits=("forget", "in_scope"))


def test_bad_records_fail_with_the_field_named(tmp_path):
    records = _records()
    records["forget"][1] = {"prompt": "Who?"}
    with pytest.raises(ValueError, match=r"\['forget'\]\[1\] needs a string field 'response'"):
        _fit(tmp_path, _callback(), lr=0.0, records=records, steps=1)


_DISTRIBUTED_SCRIPT = """
import json, sys
sys.path[:0] = [{tests!r}, {callbacks!r}]
import torch
torch.set_num_threads(1)
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from test_unlearning_eval import SPEC, EvalData, _callback, _records
from lit_align.methods import SFTModule

strategy = sys.argv[1]
relearn_steps = None if strategy == "fsdp2" else 2  # the attack deep-copies the policy: not on FSDP2 shards
evaluation = _callback(retain_model=SPEC, relearn_steps=relearn_steps, relearn_lr=2e-2, every_n_validations=0)
module = SFTModule(SPEC, optimizer=lambda params: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0))
records = _records()
records["forget"] = records["forget"] + records["holdout"][:1]  # 5 records: uneven shards over 2 ranks
kwargs = {{"single": dict(devices=1), "ddp": dict(devices=2, strategy="ddp"),
          "fsdp2": dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))}}
trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, logger=CSVLogger({root!r}),
                    default_root_dir={root!r}, callbacks=[evaluation], use_distributed_sampler=False,
                    **kwargs[strategy])
trainer.fit(module, datamodule=EvalData(records))
with open({root!r} + f"/results_{{trainer.global_rank}}.json", "w") as f:
    json.dump(evaluation.results, f)
"""


def _distributed_tables(root, strategy: str) -> list[dict]:
    """Run the script above in a fresh process (Lightning relaunches it per rank); every rank's table."""
    from conftest import REPO

    root.mkdir()
    script = root / "run_eval.py"
    script.write_text(_DISTRIBUTED_SCRIPT.format(tests=str(REPO / "tests"), callbacks=str(REPO / "tests/callbacks"),
                                                 root=str(root)))
    proc = subprocess.run([sys.executable, str(script), strategy], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(path.read_text()) for path in sorted(root.glob("results_*.json"))]


@pytest.fixture(scope="module")
def single_table(tmp_path_factory):
    (table,) = _distributed_tables(tmp_path_factory.mktemp("single") / "run", "single")
    return table


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_give_the_one_process_table(tmp_path, strategy, single_table):
    """Each rank scores its shard of every split (5 forget records: 3 + 2) and the metric states are
    reduced, so both ranks hold the table one process computes. FSDP2: every rank runs as many
    forwards (the short shard repeats a batch). No distributed sampler: every rank trains on the same
    batches, hence reaches the single process's weights."""
    tables = _distributed_tables(tmp_path / "run", strategy)
    assert len(tables) == 2
    expected = dict(single_table)
    if strategy == "fsdp2":
        expected.pop("relearned")
    assert list(expected) == ["retain_only", "start", "unlearned", *(["relearned"] if strategy == "ddp" else [])]
    for table in tables:
        assert list(table) == list(expected)
        for row in expected:
            assert table[row] == pytest.approx(expected[row], rel=1e-4, abs=1e-6), row
