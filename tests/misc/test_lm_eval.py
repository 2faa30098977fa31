"""EleutherAI lm-eval on a lit_align model: the HF export loads as ``--model hf`` and a local YAML task over local
JSON files runs without downloads (docs/lm_eval.md). Its accuracy equals lit_align's own multiple-choice scoring."""

from __future__ import annotations

import json

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev extra (pip install -e '.[dev]')")

from conftest import CSV_LOGGER, REPO  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lit_align.cli import cli_main  # noqa: E402
from lit_align.data.records import BUILTIN_DIR  # noqa: E402
from lit_align.metrics import MultipleChoiceAccuracy  # noqa: E402
from lit_align.rollout.logps import token_logps  # noqa: E402

TASK = "fictitious_facts_mc"


def _questions(n: int = 6) -> list[dict]:
    """n fictitious-facts questions (one per person): the true answer among its 4 perturbed ones, at position i % 5."""
    rows = [json.loads(line) for line in (BUILTIN_DIR / "fictitious_facts.jsonl").read_text(encoding="utf-8").splitlines()]
    picked = [rows[5 * i + i % 5] for i in range(n)]
    out = []
    for i, r in enumerate(picked):
        choices = list(r["perturbed_answers"])
        choices.insert(i % 5, r["paraphrased_answer"])
        out.append({"question": r["question"], "choices": choices, "label": i % 5})
    return out


def _task_yaml(directory, data_file, cache_dir) -> None:
    """A multiple-choice task over a local JSON file; lm-eval scores each choice as " " + choice after the question."""
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: '{data_file}'}}, cache_dir: '{cache_dir}'}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n",
        encoding="utf-8",
    )


def _lit_align_choice_loglik(model, tok, question: str, choice: str) -> float:
    """Summed log-likelihood of " " + choice after the question, with lit_align's token_logps (lm-eval's split:
    the question's tokens, then the rest of the tokenised question + continuation)."""
    context = tok(question, add_special_tokens=False)["input_ids"]
    whole = tok(question + " " + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([whole])
    scored = torch.tensor([[0] * len(context) + [1] * (len(whole) - len(context))])
    with torch.no_grad():
        return token_logps(model, ids, torch.ones_like(ids), scored).sum().item()


def _hf_export_of_a_one_step_fit(root):
    """The directory lit_align.callbacks.HFExport writes at the end of a 1-step tiny DPO fit (its own
    inference config and ``lit_align_run.json`` included), as a user would hand it to ``lm-eval --model hf``."""
    root.mkdir(parents=True, exist_ok=True)
    stack = root / "callbacks.yaml"
    stack.write_text(json.dumps({"trainer": {"callbacks": [{"class_path": "lit_align.callbacks.HFExport"}]}}))
    cli_main(["fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--config", str(stack),
              "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1", *CSV_LOGGER,
              "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
              "--trainer.limit_val_batches", "0", "--model.init_args.reference_cache_dir", str(root / "cache")])
    export = root / "hf_export"
    assert (export / "lit_align_run.json").is_file() and (export / "model.safetensors").is_file()
    return export


def test_lm_eval_local_task_on_the_exported_model_matches_lit_align(tmp_path, monkeypatch):
    """The HFExport directory of a 1-step tiny fit runs under lm-eval's hf model on a local YAML task; the
    accuracy is in [0, 1] and equals MultipleChoiceAccuracy over the same summed choice log-likelihoods (from the
    exported model), which match lm-eval's per choice."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    export = _hf_export_of_a_one_step_fit(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(export)

    questions = _questions()
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(questions), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    _task_yaml(tasks, data, tmp_path / "datasets_cache")

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={export},dtype=float32,device=cpu", tasks=[TASK], batch_size=8,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),  # the default index takes ~25 s
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    acc = out["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0

    scores = torch.tensor([[_lit_align_choice_loglik(model, tok, q["question"], c) for c in q["choices"]]
                           for q in questions], dtype=torch.float64)
    labels = torch.tensor([q["label"] for q in questions])
    ours = MultipleChoiceAccuracy()
    ours.update(scores, labels)
    assert acc == pytest.approx(ours.compute().item())
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    theirs = torch.tensor([[float(r[0]) for r in s["filtered_resps"]] for s in samples], dtype=torch.float64)
    torch.testing.assert_close(theirs, scores, rtol=1e-4, atol=1e-4)
