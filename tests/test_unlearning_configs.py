"""The unlearning and WAGLE configs parse through the real CLI (no model or data is built, nothing is
downloaded) and carry the reference hyperparameters (spec core §4.7, others §1(d))."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, resolved_config

CONFIGS = sorted([*(REPO / "configs/wagle").glob("*.yaml"), *(REPO / "configs/unlearning").rglob("*.yaml")])
REAL_SCALE = [c for c in CONFIGS if "tiny" not in c.name]

#: config -> (seed, lr, weight decay, max steps, mask ratio (None: dense), forget term class), spec core §4.7
WAGLE_TABLE = {
    "configs/wagle/tofu_graddiff_llama2-7b.yaml": (0, 7e-6, 0.1, 500, 0.95, "GradientAscent"),
    "configs/wagle/tofu_npo_llama2-7b.yaml": (1, 1e-5, 0.1, 400, 0.95, "NPO"),
    "configs/wagle/tofu_po_llama2-7b.yaml": (0, 2e-5, 0.1, 500, 0.8, "Refusal"),
    "configs/wagle/wmdp_graddiff_zephyr-7b.yaml": (3, 5e-6, 0.0, 500, 0.4, "GradientAscent"),
    "configs/wagle/wmdp_npo_zephyr-7b.yaml": (0, 1e-5, 0.0, 500, 0.6, "NPO"),
    "configs/unlearning/npo/tofu_llama2-7b.yaml": (1, 1e-5, 0.1, 400, None, "NPO"),
}
LLMU = "configs/unlearning/llmu/opt-1.3b_pku.yaml"


def resolved(config: str) -> dict:
    return resolved_config(config)


def _callbacks(cfg: dict) -> dict[str, dict]:
    return {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in cfg["trainer"]["callbacks"] or []}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_real_scale_configs_are_found():
    assert {*WAGLE_TABLE, LLMU} <= {_rel(c) for c in REAL_SCALE}


@pytest.mark.parametrize("config", CONFIGS, ids=_rel)
def test_config_parses_to_an_unlearning_module(config):
    cfg = resolved(_rel(config))
    assert cfg["model"]["class_path"] == "lit_align.methods.UnlearningModule"
    assert cfg["model"]["init_args"]["forget_loss"]["class_path"].startswith("lit_align.losses.")


@pytest.mark.parametrize("config", REAL_SCALE, ids=_rel)
def test_real_scale_config_header_names_what_how_and_where(config):
    lines = config.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert len(header) >= 3, "a real-scale config starts with what it reproduces, the command and the hardware"
    assert f"lit-align fit --config {_rel(config)}" in text
    assert "GPU" in text


@pytest.mark.parametrize("config", list(WAGLE_TABLE), ids=str)
def test_wagle_reference_hyperparameters(config):
    seed, lr, wd, steps, ratio, forget = WAGLE_TABLE[config]
    cfg = resolved(config)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["seed_everything"] == seed and data["seed"] == seed
    # optimiser and schedule: AdamW, linear with warm-up max(1, max_steps // 10), clip 1.0
    assert module["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert module["optimizer"]["init_args"]["lr"] == pytest.approx(lr)
    assert module["optimizer"]["init_args"]["weight_decay"] == pytest.approx(wd)
    assert trainer["max_steps"] == steps
    assert module["scheduler"]["class_path"] == "lit_align.schedulers.WarmupLinearLR"
    assert module["scheduler"]["init_args"] == {"total_steps": steps, "warmup_steps": max(1, steps // 10),
                                                "last_epoch": -1}
    assert trainer["gradient_clip_val"] == 1.0
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "gpu"
    # 4 sequences per optimiser step: the reference's batch 1 x accumulation 4 on one GPU
    ranks = trainer["strategy"]["init_args"]["data_parallel_size"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert ranks == trainer["devices"]
    assert data["batch_size"] == 1 and data["batch_size"] * trainer["accumulate_grad_batches"] * ranks == 4
    assert data["retain_sampling"] == "random"
    # terms: forget term, retain NLL with lambda = 1
    assert module["forget_loss"]["class_path"] == f"lit_align.losses.{forget}"
    assert module["retain_loss"]["class_path"] == "lit_align.losses.RetainNLL"
    assert module["forget_weight"] == 1.0 and module["retain_weight"] == 1.0
    assert module["mismatch_loss"] is None
    if forget == "NPO":  # the WAGLE reference's NPO is on mean-token log-probs
        assert module["forget_loss"]["init_args"] == {"beta": 0.1, "reduction": "mean_token"}
    elif forget == "GradientAscent":
        assert module["forget_loss"]["init_args"] == {"reduction": "token"}
    # the mask (dense baseline: none)
    callbacks = _callbacks(cfg)
    if ratio is None:
        assert "WeightMask" not in callbacks
    else:
        mask = callbacks["WeightMask"]
        assert mask["method"] == "wagle" and mask["path"] is None and mask["strict"] is False
        assert mask["ratio"] == pytest.approx(ratio) and mask["gamma"] == pytest.approx(1e-6)
    assert "UnlearningEvaluation" in callbacks and "HFExport" in callbacks
    # benchmark-specific data and model
    if "tofu" in config:
        assert module["model"]["name_or_path"] == "locuslab/tofu_ft_llama2-7b"
        assert cfg["data"]["class_path"] == "lit_align.data.TOFUDataModule"
        assert data["split"] == "forget10" and data["reference_format"] is True and data["max_length"] == 512
        retain_model = callbacks["UnlearningEvaluation"]["retain_model"]
        assert retain_model["name_or_path"] == "open-unlearning/tofu_Llama-2-7b-chat-hf_retain90"
    else:
        assert module["model"]["name_or_path"] == "HuggingFaceH4/zephyr-7b-beta"
        assert cfg["data"]["class_path"] == "lit_align.data.WMDPDataModule"
        assert data["domains"] == ["bio", "cyber"] and data["max_length"] == 1024 and data["pad_in_loss"] is True
        assert callbacks["UnlearningEvaluation"]["required_splits"] == ["forget"]


def test_wagle_tofu_npo_matches_the_brief():
    cfg = resolved("configs/wagle/tofu_npo_llama2-7b.yaml")
    mask = _callbacks(cfg)["WeightMask"]
    opt = cfg["model"]["init_args"]["optimizer"]["init_args"]
    assert (mask["ratio"], mask["gamma"], opt["lr"], opt["weight_decay"]) == (0.95, 1e-6, 1e-5, 0.1)
    assert cfg["trainer"]["max_steps"] == 400
    assert cfg["model"]["init_args"]["forget_loss"]["init_args"]["reduction"] == "mean_token"


def test_dense_npo_differs_from_wagle_npo_only_by_the_mask():
    wagle = resolved("configs/wagle/tofu_npo_llama2-7b.yaml")
    dense = resolved("configs/unlearning/npo/tofu_llama2-7b.yaml")
    assert wagle["model"] == dense["model"] and wagle["data"] == dense["data"]
    assert wagle["seed_everything"] == dense["seed_everything"]
    strip = ("callbacks", "default_root_dir")
    assert {k: v for k, v in wagle["trainer"].items() if k not in strip} == \
        {k: v for k, v in dense["trainer"].items() if k not in strip}
    assert set(_callbacks(wagle)) - set(_callbacks(dense)) == {"WeightMask"}
    assert set(_callbacks(dense)) <= set(_callbacks(wagle))


def test_po_attributes_with_refusals():
    module = resolved("configs/wagle/tofu_po_llama2-7b.yaml")["model"]["init_args"]
    assert module["forget_loss"]["class_path"] == "lit_align.losses.Refusal"
    assert resolved("configs/wagle/tofu_po_llama2-7b.yaml")["data"]["init_args"]["refusals"] is None  # built-in list


def test_llmu_reference_hyperparameters():
    cfg = resolved(LLMU)
    trainer, module, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert cfg["seed_everything"] == 8888 and data["seed"] == 8888
    assert module["model"]["name_or_path"] == "facebook/opt-1.3b" and module["model"]["lora"] is None
    assert cfg["data"]["class_path"] == "lit_align.data.PKUSafeRLHFDataModule"
    assert data["batch_size"] == 2 and data["num_mismatch"] == 5
    assert trainer["max_steps"] == 1000 and trainer["accumulate_grad_batches"] == 1 and trainer["devices"] == 1
    assert trainer["gradient_clip_val"] is None
    assert module["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert module["optimizer"]["init_args"]["lr"] == pytest.approx(2e-6)
    assert module["optimizer"]["init_args"]["weight_decay"] == pytest.approx(0.01)  # torch AdamW's default
    assert module["scheduler"]["init_args"]["total_steps"] == 1000
    assert module["scheduler"]["init_args"]["warmup_steps"] == 0
    terms = {k: module[f"{k}_loss"]["class_path"].rsplit(".", 1)[-1] for k in ("forget", "mismatch", "retain")}
    assert terms == {"forget": "GradientAscent", "mismatch": "MismatchNLL", "retain": "RetainKL"}
    assert (module["forget_weight"], module["mismatch_weight"], module["retain_weight"]) == (0.5, 1.0, 1.0)
    assert module["forget_loss"]["init_args"]["reduction"] == "sequence"
    assert module["reference"] == "copy" and module["stop_forget_nll"] is None
