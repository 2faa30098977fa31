"""SelfAlignmentModule on 2 DDP processes (gloo) grows the pool one process grows.

Each rank writes its share of a round's questions and answers (slot ``i`` on rank ``i mod 2``, seeded by the slot),
then every rank gathers them and rank 0 alone filters, retrieves and decides the pool, sent to every rank; with the
same global batch (2 x 4 vs 8) the two rounds' pools, provenance included, and the generated texts in the
checkpoint's cache are those of one process, even with an encoder whose cosines differ on rank 1
(``isara_rank_skew.RankSkewedEncoder``: rank 1's own retrieval would write other answer prompts, its own filters
another pool, and its loader another length).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import CSV_LOGGER, REPO, run_cli

pytestmark = pytest.mark.slow


def _args(root, batch: int) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/isara/tiny.yaml"), *CSV_LOGGER, "--trainer.logger.save_dir",
            str(root), "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
            "--data.init_args.rounds", "2", "--trainer.max_epochs", "2", "--model.init_args.stage_lrs", "null",
            "--data.init_args.epochs_per_round", "1", "--model.init_args.questions_per_round", "8",
            "--data.init_args.batch_size", str(batch), "--model.init_args.encoder",
            '{"class_path": "lit_align.retrieval.HashEncoder", "init_args": {"dim": 256, "ngram": 1}}']


def _saved(root) -> tuple[list[dict], dict]:
    state = torch.load(next(root.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    return state["SelfAlignmentDataModule"]["pool"], state["isara"]["cache"]["entries"]


@pytest.mark.integration  # about 45 s (two processes and one): CI runs the integration tier too
def test_ddp_grows_the_pool_one_process_grows(tmp_path):
    run_cli([*_args(tmp_path / "one", 8)])
    cache_file = tmp_path / "ddp_cache.jsonl"
    skewed = '{"class_path": "isara_rank_skew.RankSkewedEncoder", "init_args": {"dim": 256}}'
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "methods"), os.environ.get("PYTHONPATH", "")])
    run_cli([*_args(tmp_path / "ddp", 4), "--trainer.devices", "2", "--trainer.strategy", "ddp",
             "--model.init_args.generation_cache", str(cache_file), "--model.init_args.encoder", skewed],
            env={"PYTHONPATH": path}, timeout=240)
    (pool_one, cache_one), (pool_ddp, cache_ddp) = _saved(tmp_path / "one"), _saved(tmp_path / "ddp")
    # one writer (rank 0) per cache file: every text once, on whole lines, with what produced it
    records = [json.loads(line) for line in cache_file.read_text(encoding="utf-8").splitlines()]
    assert {r["key"]: r["text"] for r in records} == cache_ddp and len(records) == len(cache_ddp)
    assert all({"prompt", "seed", "sampling", "model", "tokenizer"} <= set(r) for r in records)
    assert len(pool_one) > 64 and sorted({r["round"] for r in pool_one}) == [0, 1, 2]
    assert pool_ddp == pool_one
    # rank 0's checkpoint holds both ranks' generations, uncut. Round 1's keys hold the trained policy's fingerprint,
    # whose weights differ in the last bits between 2 x 4 and 8 rows (gradient all-reduce): compare the texts
    assert len(cache_ddp) == len(cache_one) and sorted(cache_ddp.values()) == sorted(cache_one.values())
    assert len(set(cache_ddp) & set(cache_one)) >= 8  # round 0 (the base model): the same keys
