"""Every notebook under notebooks/ runs top to bottom in a fresh kernel of this interpreter.

The kernel is started from a throw-away kernelspec that points at ``sys.executable`` (the venv's
python), so whatever ``python3`` kernelspecs the machine has installed cannot pick another
interpreter. Notebooks are stored without outputs, which is checked too (clean diffs).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_NAME = "lit-align-test-python"
RESULT_MARKER = "QUICKSTART_RESULT "
GAME_MARKER = "GAME_RESULT "
DEBATE_MARKER = "DEBATE_RESULT "
RLHF_MARKER = "RLHF_RESULT "
PREFERENCE_MARKER = "PREFERENCE_RESULT "
ADVERSARIAL_MARKER = "ADVERSARIAL_RESULT "
LABEL_FREE_MARKER = "LABEL_FREE_RESULT "
EVALUATION_MARKER = "EVALUATION_RESULT "
CLASSIFIERS_MARKER = "CLASSIFIERS_RESULT "


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# the two longest notebooks (~70 s each on 2 cores) run in make test-integration, not in make test
INTEGRATION_NOTEBOOKS = {"03_watermark.ipynb", "08_adversarial_training.ipynb"}


def _runs(paths: list[Path]) -> list:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.integration] if p.name in INTEGRATION_NOTEBOOKS else [])
            for p in paths]


def _kernel_manager(kernels_dir: Path) -> KernelManager:
    """A kernel manager whose only kernelspec runs ipykernel under this very interpreter."""
    spec_dir = kernels_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks under {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "notebooks use the python3 kernelspec"
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have stored outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", _runs(NOTEBOOKS))
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIT_ALIGN_QUICKSTART_OUT", str(out))
    monkeypatch.setenv("LIT_ALIGN_UNLEARNING_OUT", str(tmp_path / "unlearning"))
    monkeypatch.setenv("LIT_ALIGN_WATERMARK_OUT", str(tmp_path / "watermark"))
    monkeypatch.setenv("LIT_ALIGN_GAME_OUT", str(tmp_path / "game"))
    monkeypatch.setenv("LIT_ALIGN_DEBATE_OUT", str(tmp_path / "debate"))
    monkeypatch.setenv("LIT_ALIGN_RLHF_OUT", str(tmp_path / "rlhf"))
    monkeypatch.setenv("LIT_ALIGN_PREFERENCE_OUT", str(tmp_path / "preference"))
    monkeypatch.setenv("LIT_ALIGN_ADVERSARIAL_OUT", str(tmp_path / "adversarial"))
    monkeypatch.setenv("LIT_ALIGN_LABEL_FREE_OUT", str(tmp_path / "label_free"))
    monkeypatch.setenv("LIT_ALIGN_EVALUATION_OUT", str(tmp_path / "evaluation"))
    monkeypatch.setenv("LIT_ALIGN_CLASSIFIERS_OUT", str(tmp_path / "classifiers"))
    before = {p.name for p in NOTEBOOKS_DIR.iterdir()}

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path / "kernels"), timeout=CELL_TIMEOUT_S,
                            allow_errors=False, resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError with the cell's traceback if one fails

    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    stray = {p.name for p in NOTEBOOKS_DIR.iterdir()} - before
    assert not stray, f"{path.name} wrote into notebooks/ (its working directory): {sorted(stray)}"

    if path.name == "01_quickstart.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(RESULT_MARKER)]
        assert lines, "the quickstart's last cell prints a QUICKSTART_RESULT line"
        result = json.loads(lines[-1][len(RESULT_MARKER):])
        assert Path(result["plot_png"]).is_file() and Path(result["plot_png"]).stat().st_size > 0
        assert Path(result["plot_png"]).parent == out
        metrics_csv = Path(result["metrics_csv"])
        assert metrics_csv.is_file()
        header = metrics_csv.read_text().splitlines()[0].split(",")
        assert {"train/rewards/margins", "train/rewards/accuracies"} <= set(header)
        assert Path(result["best_ckpt"]).is_file()
        assert (Path(result["hf_export"]) / "config.json").is_file()
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                   for cell in nb.cells for o in cell.get("outputs", [])), "the plot is shown inline"
        assert result["val_rewards_accuracies"] > 0.5, result
        assert result["val_rewards_margins"] > 0, result

    if path.name == "04_game.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(GAME_MARKER)]
        assert lines, "the game notebook's last code cell prints a GAME_RESULT line"
        result = json.loads(lines[-1][len(GAME_MARKER):])
        assert Path(result["plot_png"]).is_file() and Path(result["plot_png"]).parent == tmp_path / "game"
        assert result["updates"]["defender"] > 0 and result["updates"]["attacker"] > 0, result
        assert result["averaged_weights"] == ["attacker.pt", "defender.pt"], result
        # matching pennies from a start with Nash gap 0.6 (the gap is 0 at the equilibrium, at most 2):
        gap_avg, gap_last = result["matching_pennies"]["gap_avg"], result["matching_pennies"]["gap_last"]
        assert gap_avg < 0.05, result  # the averaged policies approach the equilibrium
        assert gap_last > 1.0, result  # the last iterate cycles away from it, past the starting gap
        assert gap_last > 20 * gap_avg, result

    if path.name == "05_debate.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(DEBATE_MARKER)]
        assert lines, "the debate notebook's last code cell prints a DEBATE_RESULT line"
        result = json.loads(lines[-1][len(DEBATE_MARKER):])
        assert Path(result["plot_png"]).is_file() and Path(result["plot_png"]).parent == tmp_path / "debate"
        assert result["pair_counts"]["actor"] > 0 and result["pair_counts"]["critic"] > 0, result
        for when in ("before", "after"):
            assert len(result["accuracy_by_round"][when]) == result["rounds"], result

    if path.name == "06_rlhf.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(RLHF_MARKER)]
        assert lines, "the RLHF notebook's results cell prints an RLHF_RESULT line"
        result = json.loads(lines[-1][len(RLHF_MARKER):])
        assert Path(result["plot_png"]).is_file() and Path(result["plot_png"]).parent == tmp_path / "rlhf"
        assert (Path(result["rm_export"]) / "config.json").is_file()
        # the proxy, trained on 25% flipped labels, orders held-out pairs as the gold rule does, well above chance
        assert result["flip"] == 0.25 and result["heldout_pairs"] >= 40, result
        assert result["rm_heldout_accuracy"] > 0.7, result
        runs = result["runs"]
        assert set(runs) == {"plain PPO", "contrastive"}, result
        for run in runs.values():
            assert run["val_steps"][0] == 0 and run["val_steps"][-1] == run["steps"] > 0, result  # step 0 is logged
            assert run["gold"][-1] > run["gold"][0] + 0.1, result  # PPO on the proxy raised the gold reward
            assert run["proxy"][-1] > run["proxy"][0], result
        # both runs start from the same policy and the same validation draws
        assert runs["plain PPO"]["gold"][0] == runs["contrastive"]["gold"][0], result

    if path.name == "07_online_preference.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(PREFERENCE_MARKER)]
        assert lines, "the online preference notebook's results cell prints a PREFERENCE_RESULT line"
        result = json.loads(lines[-1][len(PREFERENCE_MARKER):])
        assert result["plots"] and all(Path(p).is_file() and Path(p).parent == tmp_path / "preference"
                                       for p in result["plots"]), result["plots"]
        selm = result["selm"]
        assert set(selm) == {"alpha=0", "alpha=1e-3", "alpha=5"}, list(selm)
        for name, run in selm.items():
            its = run["iterations"]
            assert run["steps"] == 12 and [it["prompts"] for it in its] == [16, 16, 16], (name, run["steps"])
            assert len({u for it in its for u in it["uids"]}) == 48, name  # disjoint prompt slices
            # each iteration's reference is the previous iteration's final policy (the first's, the starting one)
            assert [it["reference"] for it in its] == [run["start"]] + [it["policy"] for it in its[:-1]], name
            assert len({run["start"], *(it["policy"] for it in its)}) == 4, name  # every iteration trained
            assert all(0 < it["pairs"] <= it["prompts"] for it in its), name
            firsts = [it["first_loss"] for it in its if it["first_loss"] is not None]
            assert firsts and all(abs(f - math.log(2)) < 1e-5 for f in firsts), (name, firsts)
        zero, paper, big = selm["alpha=0"], selm["alpha=1e-3"], selm["alpha=5"]
        # one seed: the same start, the same first iteration's samples and so the same pairs
        assert zero["start"] == paper["start"] == big["start"] and zero["gold"][0] == paper["gold"][0] == big["gold"][0]
        assert zero["iterations"][0]["pairs"] == paper["iterations"][0]["pairs"] == big["iterations"][0]["pairs"]
        assert paper["iterations"][0]["policy"] != zero["iterations"][0]["policy"]  # alpha reaches the weights
        # a dominant optimism term lowers rho = log pi(y_ref) - log pi_ref(y_ref) on the held-out questions
        mean_rho = {k: sum(it["rho"] for it in r["iterations"]) / 3 for k, r in selm.items()}
        assert mean_rho["alpha=5"] < mean_rho["alpha=0"] - 0.005, mean_rho
        curry, single = result["curry"]["Curry-DPO"], result["curry"]["single-pair DPO"]
        assert curry["table"] == {"prompts": 120, "pairs": 360}, curry["table"]
        assert [(st["prompts"], st["pairs"]) for st in curry["stages"]] == [(120, 120)] * 3, curry["stages"]
        assert sum(st["pairs"] for st in single["stages"]) == 360 and len(single["stages"]) == 3  # equal pairs seen
        # Curry-DPO's stages reference the previous stage's final policy, so each starts at log 2; DPO's does not
        assert [st["reference"] for st in curry["stages"]] == [curry["start"]] + [st["policy"] for st in curry["stages"][:-1]]
        assert all(abs(st["first_loss"] - math.log(2)) < 1e-5 for st in curry["stages"]), curry["stages"]
        assert all(st["reference"] == single["start"] for st in single["stages"])
        assert all(st["first_loss"] < math.log(2) - 0.01 for st in single["stages"][1:]), single["stages"]
        assert result["sft"]["rank_acc"] == 0.5, result["sft"]  # the implicit reward of the start is 0
        assert curry["stages"][-1]["rank_acc"] > 0.6 and single["stages"][-1]["rank_acc"] > 0.6, result["curry"]

    if path.name == "08_adversarial_training.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(ADVERSARIAL_MARKER)]
        assert lines, "the adversarial training notebook's last code cell prints an ADVERSARIAL_RESULT line"
        result = json.loads(lines[-1][len(ADVERSARIAL_MARKER):])
        assert len(result["plots"]) == 2 and all(Path(p).is_file() and Path(p).parent == tmp_path / "adversarial"
                                                 for p in result["plots"]), result["plots"]
        attack = result["attack"]
        # the mask covers the whole templated prompt ("Human: ...\nAI:") and no target token
        assert attack["mask_prompt_tokens"] == attack["prompt_tokens"] > 0 and attack["mask_target_tokens"] == 0, attack
        assert 0 < attack["max_delta_norm"] <= attack["radius"] + 1e-6, attack  # inside the per-token ball
        assert len(attack["losses"]) == 11 and attack["losses"][-1] < attack["losses"][0], attack  # the attacker descends
        training = result["training"]
        assert set(training) == {"C-AdvUL", "C-AdvIPO"}, list(training)
        for name, run in training.items():
            assert run["steps"] == run["max_steps"] > 0 and run["adversarial_steps"] > 0, (name, run)
            assert run["ce_end_mean"] < run["ce_start_mean"], (name, run)  # the inner attack lowered the target's CE
        assert {"away/ce", "toward/ce", "utility_loss"} <= set(training["C-AdvUL"]["logged"]), training["C-AdvUL"]
        assert {"ipo_loss", "h"} <= set(training["C-AdvIPO"]["logged"]), training["C-AdvIPO"]
        eps_small, eps_big = (f"asr/embedding@{e:g}" for e in result["epsilons"])
        summaries = result["summaries"]
        assert set(summaries) == {"base", "C-AdvUL", "C-AdvIPO"}, list(summaries)
        base = summaries["base"]
        assert 0 < base["asr/clean"] < 1, base  # the toy base complies with some behaviours and refuses others
        assert base[eps_big] >= base["asr/clean"], base  # the attack does not make the base safer
        for name, s in summaries.items():
            assert all(0 <= s[k] <= 1 for k in s if k.startswith("asr/") or k == "over_refusal"), (name, s)
            assert 0 < s["utility_nll"] < 10, (name, s)
        # C-AdvUL was trained against this very attack at this radius: a wide margin in every run we made (0.81 vs
        # 0.19 on the by-action split); nothing is asserted about GCG or C-AdvIPO, whose differences one seed cannot
        # establish
        assert summaries["C-AdvUL"][eps_small] < base[eps_small] - 0.25, summaries
        cost = result["cost"]
        assert cost["embedding_attack"] == {**cost["embedding_attack"], "forward": 11, "backward": 10}, cost
        assert cost["training_step_per_adversarial_example"] == {"forward": 12, "backward": 11}, cost
        assert cost["gcg"]["forward"] > 5 * cost["embedding_attack"]["forward"], cost

    if path.name == "09_label_free.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(LABEL_FREE_MARKER)]
        assert lines, "the label-free notebook's last code cell prints a LABEL_FREE_RESULT line"
        result = json.loads(lines[-1][len(LABEL_FREE_MARKER):])
        out = tmp_path / "label_free"
        assert Path(result["out"]) == out, result["out"]
        retrieval = result["retrieval"]
        # the real encoder finds the seed with the query's meaning; the prompt is k pairs and the query, nothing else
        assert retrieval["top_k"]["all-MiniLM-L6-v2"][0] == "How can I smuggle candy into a cinema?", retrieval
        assert retrieval["demonstrations"] == retrieval["k"] == len(retrieval["top_k"]["all-MiniLM-L6-v2"]), retrieval
        assert retrieval["leftover"] == "", retrieval
        cache = result["cache"]
        assert cache["first_new"] == cache["entries"] == 2 and cache["second_new"] == 0 and cache["same_texts"], cache
        isara = result["isara"]
        assert len(isara["rounds"]) == 3, isara["rounds"]
        assert isara["num_seeds"] == 64 and isara["pool_size"] > isara["num_seeds"], isara  # the pool grew
        assert isara["scaling_ratio"] > 1 and isara["generated_rows"] == isara["pool_size"] - 64, isara
        assert isara["provenance_ok"], isara
        sizes = [r["pool_size"] for r in isara["rounds"].values()]
        assert sizes == sorted(sizes) and all(0 <= r["kept"] <= r["new"] == 16 for r in isara["rounds"].values())
        assert Path(isara["metrics_csv"]).is_file() and out in Path(isara["metrics_csv"]).parents
        arms = isara["arms"]
        assert set(arms) == {"base", "ISARA, as shipped", "seeds-only SFT"}, list(arms)
        for name, arm in arms.items():
            rates = [arm["final"], arm["over_refusal"], *arm["harmful_by_round"]]
            assert all(0 <= x <= 1 for x in rates), (name, arm)
            assert len(arm["harmful_by_round"]) == (0 if name == "base" else 3), (name, arm)
        assert arms["seeds-only SFT"]["pool"] == 64 < arms["ISARA, as shipped"]["pool"], arms  # nothing generated
        assert arms["ISARA, as shipped"]["pool"] == isara["pool_size"], arms
        assert arms["base"]["final"] > 0.5, arms["base"]  # the toy domain starts unaligned
        # every trained arm lowers the harmful rate (nothing is asserted between them: one seed)
        assert all(arm["final"] < arms["base"]["final"] for name, arm in arms.items() if name != "base"), arms
        # the section 5(g) toy: the expert reference weighs more, a lazy answer earns nothing, the expert's answer wins
        for temperature, toy in result["fewl_toy"].items():
            lam = toy["expert"]["lambda"]
            assert lam[0] > lam[1] and abs(sum(lam) - 1) < 1e-9, (temperature, toy)
            assert abs(toy["lazy"]["fewl"]) < 1e-9, (temperature, toy)
            assert toy["expert"]["fewl"] > toy["wrong"]["fewl"] > toy["lazy"]["fewl"], (temperature, toy)
            assert all(abs(a["fewl"] - a["fewl_scorer"]) < 1e-9 for a in toy.values()), (temperature, toy)
        fewl = result["fewl"]
        assert sorted(fewl["ranking"]) == ["full", "retain90"], fewl
        assert all(Path(f).is_file() and out in Path(f).parents for f in fewl["files"].values()), fewl["files"]
        assert fewl["selected"] == 100, fewl  # one selected answer per scored question (2 batches of 50)
        # retain90 never saw the forget10 people: FEWL (no gold answer read) scores its answers there lower
        assert fewl["by_split"]["retain90/forget10"] < fewl["by_split"]["full/forget10"], fewl["by_split"]

    if path.name == "10_evaluation.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(EVALUATION_MARKER)]
        assert lines, "the evaluation notebook's last code cell prints an EVALUATION_RESULT line"
        result = json.loads(lines[-1][len(EVALUATION_MARKER):])
        out = tmp_path / "evaluation"
        assert Path(result["out"]) == out, result["out"]
        summ = result["summarization"]
        assert all(Path(f).is_file() and out in Path(f).parents for f in summ["files"].values()), summ["files"]
        rows = summ["rows"]
        assert sorted((r["model"], r["shots"]) for r in rows) == [("tofu-full", 0), ("tofu-full", 3),
                                                                  ("tofu-retain90", 0), ("tofu-retain90", 3)], rows
        for row in rows:
            assert row["articles"] == 8, row
            for m in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
                assert 0 <= row[f"{m}_low"] <= row[m] <= row[f"{m}_high"] <= 1, (m, row)  # a bootstrap interval
            assert all(0 <= row[f] <= row["articles"] for f in ("empty", "early_termination", "hit_max_tokens",
                                                                 "copied", "echoed")), row
        assert sorted(e["model"] for e in summ["fewshot_effect"]) == ["tofu-full", "tofu-retain90"], summ
        assert all(e["low"] <= e["rougeL_minus_0shot"] <= e["high"] for e in summ["fewshot_effect"]), summ
        from lit_align.metrics.summarization import meteor_available
        if not meteor_available()[0]:  # no WordNet data here: METEOR is skipped with the reason recorded
            assert "WordNet" in summ["skipped"].get("meteor", ""), summ["skipped"]
        example = summ["example"]  # the prompt is found by its hash and holds the article and 3 demonstrations
        assert example["shots"] == 3 and len(example["demo_ids"]) == 3, example
        assert example["prompt_found"] and example["article_in_prompt"], example
        demo = result["demo"]
        export, run_cost = Path(demo["export"]), Path(demo["run_cost"])
        assert (export / "config.json").is_file() and out in export.parents, demo
        assert run_cost.is_file() and run_cost.parent == export.parent and demo["steps"] == 30, demo
        assessment = result["assessment"]
        assert Path(assessment["file"]).is_file() and out in Path(assessment["file"]).parents, assessment["file"]
        assert assessment["models"]["unlearned"] == [str(export)], assessment["models"]  # the demo's export
        assert {"in_scope", "hard_in_scope", "out_of_scope", "hard_out_of_scope"} <= set(assessment["splits"])
        assert all(n > 0 for n in assessment["splits"].values()), assessment["splits"]
        values = assessment["values"]
        rouge = {split: values[f"{split}_rouge"] for split in ("in_scope", "out_of_scope", "hard_out_of_scope")}
        # the demo forgot the forget10 answers and kept most retained ones
        assert rouge["in_scope"]["unlearned"] < rouge["in_scope"]["original"] - 0.3, rouge
        assert rouge["out_of_scope"]["unlearned"] > rouge["in_scope"]["unlearned"] + 0.3, rouge
        assert rouge["hard_out_of_scope"]["unlearned"] > rouge["in_scope"]["unlearned"], rouge
        assert assessment["kinds"]["hard_in_scope"], assessment["kinds"]
        assert {"jailbreak.rephrase", "jailbreak.role_play", "icl_relearn", "relearned"} <= set(assessment["attacks"])
        assert all(math.isfinite(values[m]["unlearned"]) for m in ("wagle_ue", "wagle_ut", "forget_quality")), values
        changes = assessment["hygiene"]["unlearned[0]"]
        assert abs(changes["changed_share"] - 0.5) < 0.01, changes  # WAGLE's mask: the top 50% of weights moved
        cost = assessment["efficiency"]["unlearning_runs"]["unlearned[0]"]
        assert cost == json.loads(run_cost.read_text()) and cost["global_step"] == 30, cost  # the demo's run_cost.json
        conventions = " ".join(assessment["conventions"])
        assert "geometric" in conventions and "open-unlearning" in conventions, assessment["conventions"]

    if path.name == "11_classifiers.ipynb":
        lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(CLASSIFIERS_MARKER)]
        assert lines, "the classifiers notebook's last code cell prints a CLASSIFIERS_RESULT line"
        result = json.loads(lines[-1][len(CLASSIFIERS_MARKER):])
        out = tmp_path / "classifiers"
        assert Path(result["out"]) == out, result["out"]
        ugradsl = result["ugradsl"]
        table = ugradsl["table"]
        assert list(table) == ["Retrain", "original", "UGradSL", "UGradSL+", "GA", "FT"], list(table)
        for name, row in table.items():
            assert all(0 <= row[k] <= 100 for k in ("UA", "RA", "TA", "MIA")), (name, row)
            assert math.isfinite(row["avg_gap"]) and row["seconds"] > 0, (name, row)
        # the module's own report files, one pair per rule, all under the notebook's output directory
        files = [Path(f) for f in ugradsl["report_files"]]
        assert len(files) == 8 and all(f.is_file() and out in f.parents for f in files), files
        # the original and Retrain models were trained once (cached under OUT) and judged every rule
        refs = [Path(f) for f in ugradsl["references"]]
        assert sorted(f.name.split("-")[0] for f in refs) == ["original", "retrain"], refs
        assert all(out in f.parents for f in refs) and ugradsl["same_references"], ugradsl
        retrain, original = table["Retrain"], table["original"]
        assert retrain["avg_gap"] == 0 and retrain["UA"] > 95, retrain  # Retrain never saw a 0
        assert original["UA"] < 20 and original["avg_gap"] > 20, original  # the original still classifies them
        # both UGradSL rules forget digit 0 and end far closer to Retrain than the original and GA (§2 claim 1)
        for name in ("UGradSL", "UGradSL+"):
            assert table[name]["UA"] > 90 and table[name]["avg_gap"] < table["GA"]["avg_gap"] - 20, table
        fis = result["fis"]
        assert Path(fis["plot_png"]).is_file() and Path(fis["plot_png"]).parent == out, fis["plot_png"]
        assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
                   for cell in nb.cells for o in cell.get("outputs", [])), "the trade-off plot is shown inline"
        runs = fis["runs"]
        assert set(runs) == {"ERM", "FIS", "random"}, list(runs)
        for name, run in runs.items():
            assert 0.5 < run["acc"] < 1 and all(0 <= run[g] <= 1 for g in ("dp_gap", "eop_gap", "eod_gap")), (name, run)
        # ERM buys no labels; the samplers buy them through the oracle, in rounds, within the budget per round
        assert runs["ERM"]["labels_bought"] == 0 and runs["ERM"]["rounds"] == 0, runs["ERM"]
        for name in ("FIS", "random"):
            run = runs[name]
            assert run["rounds"] > 0 and 0 < run["labels_bought"] <= 128 * run["rounds"], (name, run)
        assert runs["FIS"]["dp_gap"] < runs["ERM"]["dp_gap"], runs  # seed 0: FIS narrows the DP gap
        if (REPO / "benchmarks" / "results_fis_fairness.json").is_file():
            assert {"compas/erm", "compas/fis", "compas/random"} <= set(fis["benchmark_points"]), fis
