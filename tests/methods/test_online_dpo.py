"""OnlineDPOModule (online DPO and SELM, others.md §7(g) 4-7 and §7(h)): the iteration driver's reference is the
previous iteration's policy by checksum and never moves within one; prompts are never reused across iterations;
y_ref is the reference's greedy answer; ranking with the dataset's responses (a new response may win); the
Zephyr recipe's offline first iteration; exact resume mid-iteration with the generation cache restored; bad input.
"""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main
from lit_align.data import PromptDataModule
from lit_align.data.records import DataSource
from lit_align.errors import DataError
from lit_align.losses import SELMLoss
from lit_align.methods import OnlineDPOModule
from lit_align.models import ModelSpec
from lit_align.models.reference import model_fingerprint
from lit_align.rewards import CallableRanker
from lit_align.rewards.rankers import Ranker
from lit_align.rollout.sampler import SamplingConfig, sample


def gold(prompts: list[str], candidates: list[list[str]]) -> list[list[float]]:
    """A test judge: longer answers are better, ties broken by the text (so every prompt with two different
    answers gives a pair)."""
    return [[len(c) + (sum(map(ord, c)) % 997) / 1000 for c in cs] for cs in candidates]


def _cli(root, *extra: str, config: str = "configs/selm/tiny.yaml", run: bool = True, judge=gold):
    """The tiny SELM config on 24 prompts (3 iterations of 8, 2 steps each), no validation; ``judge`` replaces the
    rule-judge ranker (which ties often) when given."""
    ckpt = _ckpt(extra)
    extra = tuple(a for a in extra if a not in ("--ckpt_path", ckpt))
    args = ["--config", str(REPO / config), "--trainer.default_root_dir", str(root), *CSV_LOGGER,
            "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--data.init_args.train.limit", "24", *extra]
    cli = cli_main(args, run=False)
    if judge is not None:
        cli.model.ranker = CallableRanker(judge)
    if run:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt)
    return cli


def _ckpt(extra) -> str | None:
    return extra[extra.index("--ckpt_path") + 1] if "--ckpt_path" in extra else None


class Record(L.Callback):
    """What the iteration driver did: fingerprints of the reference at each step (and of the policy at the start and at
    each iteration's end), the prompts of each iteration, the step losses, reference gradients."""

    def __init__(self) -> None:
        self.start, self.ref, self.ref_after, self.end, self.uids, self.losses = None, {}, {}, {}, {}, []
        self.ref_grads = False

    def on_train_start(self, trainer, module) -> None:
        self.start = model_fingerprint(module.policy)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.ref.setdefault(trainer.current_epoch, []).append(model_fingerprint(module.reference.copy))
        self.uids.setdefault(trainer.current_epoch, []).extend(batch.uids)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.ref_after.setdefault(trainer.current_epoch, []).append(model_fingerprint(module.reference.copy))
        self.ref_grads |= any(p.grad is not None or p.requires_grad for p in module.reference.copy.parameters())
        self.losses.append((trainer.current_epoch, batch_idx, float(outputs["loss"]), float(module.last_pairs)))

    def on_train_epoch_end(self, trainer, module) -> None:
        self.end[trainer.current_epoch] = model_fingerprint(module.policy)


def test_iteration_driver_reference_prompts_and_the_reference_left_untouched(tmp_path):
    """§7(g)5 and 7, §7(h)2 and 6. Iteration 0's reference is the starting model; iteration k's reference has the
    checksum of the policy at the end of iteration k - 1; within an iteration the reference never changes and is
    bit-identical after every step (frozen, no gradient); the policy does change. Every iteration trains on its own
    contiguous slice of 8 prompts, none reused. At each iteration's first step policy == reference, so the loss is
    log 2 (SELM: Delta = rho = 0)."""
    record = Record()
    cli = _cli(tmp_path, run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert record.ref[0][0] == record.start
    for k in (1, 2):
        assert record.ref[k][0] == record.end[k - 1] != record.ref[k - 1][0]
    for k in (0, 1, 2):
        assert set(record.ref[k]) == set(record.ref_after[k]) == {record.ref[k][0]}
    assert not record.ref_grads
    assert record.end[2] != record.start
    slices = [set(record.uids[k]) for k in (0, 1, 2)]
    assert all(len(s) == 8 for s in slices) and not (slices[0] & slices[1] | slices[1] & slices[2] | slices[0] & slices[2])
    train = cli.datamodule.train_dataset
    for k in (0, 1, 2):
        assert slices[k] == {train[i].uid for i in range(8 * k, 8 * k + 8)}
    firsts = [(loss, kept) for epoch, batch_idx, loss, kept in record.losses if batch_idx == 0]
    assert len(firsts) == 3 and all(kept > 0 and loss == pytest.approx(math.log(2), abs=1e-5) for loss, kept in firsts)


class FixedRanks(Ranker):
    """Ranks fixed per candidate position (§7(g)6's stub)."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__()
        self.fixed = ranks

    def _rank(self, prompts, candidates):
        return [list(self.fixed) for _ in candidates]


def _module_and_batch(ranks: list[int], loss=None, **kwargs):
    module = OnlineDPOModule(ModelSpec(name_or_path="builtin:tiny-game-base"), FixedRanks(ranks),
                             loss=loss or SELMLoss(), sampling=SamplingConfig(max_new_tokens=8, do_sample=False),
                             max_length=128, max_prompt_length=64, **kwargs)
    module.configure_model()
    dm = PromptDataModule(train=DataSource(path="builtin:preferences", limit=4), val_fraction=0.0, format="prompt",
                          template="Human: {prompt}\nAI:", chat_template=False, shuffle=False, batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return module, next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(("ranks", "chosen", "rejected"), [([1, 2, 3], 0, 2), ([2, 1, 3], 1, 2), ([3, 2, 1], 2, 0)],
                         ids=["new-wins", "dataset-chosen-wins", "new-loses"])
def test_ranking_with_dataset_responses_and_the_greedy_reference_response(ranks, chosen, rejected):
    """§7(g)6 in the module, §7(h)2: the greedy answer of the reference and the dataset's chosen and rejected are
    ranked together (candidates in that order); chosen = lowest rank, rejected = highest, the new answer included.
    y_ref is the reference's own greedy answer (sampled here again with sample() on the frozen copy)."""
    module, batch = _module_and_batch(ranks)
    pairs, stats = module._pairs(batch, "train")
    prompts = [ids[m.bool()].tolist() for ids, m in zip(batch.input_ids, batch.attention_mask)]
    greedy = sample(module.reference.copy, batch.input_ids, batch.attention_mask,
                    SamplingConfig(max_new_tokens=8, do_sample=False), eos_token_id=module.tokenizer.eos_token_id,
                    pad_token_id=module.tokenizer.pad_token_id)
    tok = module.tokenizer
    for b in range(len(batch)):
        y_ref = greedy.response_ids[b][greedy.response_mask[b].bool()].tolist()
        candidates = [y_ref] + [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                for r in batch.responses[b]]
        for seq, want in ((pairs.chosen, candidates[chosen]), (pairs.rejected, candidates[rejected]),
                          (pairs.reference, y_ref)):
            row = seq.input_ids[b][seq.attention_mask[b].bool()].tolist()
            assert row == prompts[b] + want
    assert pairs.chosen_new.tolist() == [chosen == 0] * 4 and pairs.rejected_new.tolist() == [rejected == 0] * 4
    assert stats["generated"] == 4.0
    assert module._generate(batch, module.sampling, 1, "online_dpo/candidates")[1] == 0  # cached: nothing generated


def test_reference_log_probs_all_come_from_the_frozen_reference_and_only_the_policy_gets_gradients():
    """§7(h)4 and §7(g)5: after the policy moves (one manual step), the loss's reference log-probs of chosen, rejected
    and y_ref are the frozen copy's (not the policy's), the copy gets no gradient and stays bit-identical."""
    module, batch = _module_and_batch([1, 2, 3])
    before = {k: v.clone() for k, v in module.reference.copy.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pairs, _ = module._pairs(batch, "train")
    loss, _, metrics = module._pair_loss(pairs, "train")
    loss.backward()
    from lit_align.rollout import sequence_logps

    ref = sequence_logps(module.reference.copy, pairs.reference.input_ids, pairs.reference.attention_mask,
                         pairs.reference.loss_mask)
    assert metrics["logps/ref_response"].item() == pytest.approx(ref.mean().item(), abs=1e-5)
    assert metrics["logps/pi_response"].item() != pytest.approx(ref.mean().item(), abs=1e-5)
    assert all(p.grad is None for p in module.reference.copy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.policy.parameters())
    after = module.reference.copy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _losses(root) -> dict[int, float]:
    rows = [r for f in sorted(root.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def _generated(root) -> float:
    rows = [r for f in sorted(root.rglob("metrics.csv")) for r in csv.DictReader(f.open())]
    return sum(float(r["train/generated"]) for r in rows if r.get("train/generated"))


def test_resume_mid_iteration_is_exact_and_keeps_the_generation_cache(tmp_path):
    """6 steps (3 iterations of 2) straight == 3 steps (the first step of iteration 1, after a refresh), stop,
    resume from that checkpoint, 3 more: same losses, same final weights bit for bit, no second refresh (the
    checkpoint's reference), and the checkpoint's generations come back (keyed by the reference's fingerprint);
    nothing is generated twice."""
    ckpt_args = ["--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.save_last", "true", "--trainer.callbacks.every_n_train_steps", "1",
                 "--trainer.callbacks.save_top_k", "-1"]
    straight = _cli(tmp_path / "a", *ckpt_args)
    _cli(tmp_path / "b", *ckpt_args, "--trainer.max_steps", "3")
    ckpt = next((tmp_path / "b").rglob("*step=3.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cache = state["online_dpo"]
    assert cache["generations"] and all(k.startswith(cache["generator_fingerprint"]) for k in cache["generations"])
    assert any(k.startswith("reference.copy.") for k in state["state_dict"])  # a refreshed copy is saved
    assert not any(k.startswith("ranker.") for k in state["state_dict"])
    resumed = _cli(tmp_path / "c", *ckpt_args, "--ckpt_path", str(ckpt))
    a, c = straight.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)
    losses_a, losses_b, losses_c = _losses(tmp_path / "a"), _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert sorted(losses_b) == [0, 1, 2] and sorted(losses_c) == [3, 4, 5]
    for step, value in {**losses_b, **losses_c}.items():
        assert value == pytest.approx(losses_a[step], abs=1e-6), step
    assert _generated(tmp_path / "b") + _generated(tmp_path / "c") == _generated(tmp_path / "a")
    assert model_fingerprint(resumed.model.reference.copy) == model_fingerprint(straight.model.reference.copy)


def test_offline_first_iteration_trains_on_the_dataset_pairs_without_generating(tmp_path):
    """The Zephyr recipe: iteration 0 is offline DPO on the dataset's (chosen, rejected), nothing generated; iteration
    1 generates (SELM)."""
    generated = {}

    class Cache(L.Callback):
        def on_train_epoch_end(self, trainer, module) -> None:
            generated[trainer.current_epoch] = len(module.generations)

    cli = _cli(tmp_path, "--data.init_args.train", "{path: builtin:preferences, limit: 16}", "--data.init_args.format",
               "prompt", "--data.init_args.iterations", "2", "--trainer.max_epochs", "2",
               "--model.init_args.offline_first_iteration", "true", "--model.init_args.num_candidates", "1",
               "--model.init_args.sampling", "{max_new_tokens: 8, do_sample: false}",
               "--model.init_args.use_dataset_responses", "true", "--model.init_args.stage_lrs", "[1.0e-4, 1.0e-4]",
               run=False)
    cli.trainer.callbacks.append(Cache())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert generated[0] == 0 and generated[1] > 0


def test_bad_input_is_a_clear_error(tmp_path):
    """An alpha with the IPO loss (SELM is sigmoid only), a mean-reduced loss, iterations needing more prompts than
    the data has, and one candidate with no dataset responses: each names the key."""
    # jsonargparse reports an error raised while building the loss inside its own ValueError, message kept
    with pytest.raises(ValueError, match="model.loss.init_args.loss_type: SELM's optimism term"):
        _cli(tmp_path, "--model.init_args.loss", "{class_path: lit_align.losses.SELMLoss, init_args: {alpha: 0.001, "
             "loss_type: ipo}}", run=False, judge=None)
    with pytest.raises(ValueError, match="model.loss: online DPO scores summed log-probs; IPOLoss"):
        _cli(tmp_path, "--model.init_args.loss", "lit_align.losses.IPOLoss", run=False, judge=None)
    with pytest.raises(ValueError, match="model.num_candidates is 1"):
        _cli(tmp_path, "--model.init_args.num_candidates", "1", run=False, judge=None)
    with pytest.raises(ValueError, match="greedy candidates of one prompt are all the same text"):
        _cli(tmp_path, "--model.init_args.num_candidates", "2", "--model.init_args.use_dataset_responses", "false",
             "--model.init_args.sampling", "{do_sample: false}", run=False, judge=None)
    with pytest.raises(DataError, match="data.iterations = 3 needs at least 3 training prompts"):
        _cli(tmp_path, "--data.init_args.train.limit", "2")


@pytest.mark.parametrize(("config", "alpha", "lrs", "batch", "offline"), [
    ("configs/selm/zephyr-7b_ultrafeedback.yaml", 0.001, [5e-7, 5e-7, 5e-7, 1e-7], 256, True),
    ("configs/selm/llama-3-8b-instruct.yaml", 0.0001, [5e-7, 3e-7, 1e-7], 128, False),
], ids=["zephyr", "llama3"])
def test_real_scale_selm_configs_carry_the_papers_settings(config, alpha, lrs, batch, offline):
    """§7(d): beta 0.01 (not 0.1, §7(h)7), alpha per model, one learning rate per iteration, warm-up 0.1, global batch
    (per device x accumulation x GPUs), max_length 1024 / prompt 512, greedy single answer ranked with the dataset's
    two, Zephyr's first iteration offline DPO; iterations == epochs."""
    from conftest import resolved_config

    cfg = resolved_config(config)
    model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
    assert model["loss"]["init_args"]["beta"] == 0.01 and model["loss"]["init_args"]["alpha"] == alpha
    assert model["stage_lrs"] == lrs and model["warmup_ratio"] == 0.1 and model["offline_first_iteration"] is offline
    assert data["iterations"] == len(lrs) == trainer["max_epochs"]
    assert data["batch_size"] * trainer["accumulate_grad_batches"] * trainer["devices"] == batch
    assert (model["max_length"], model["max_prompt_length"], model["num_candidates"]) == (1024, 512, 1)
    assert model["sampling"]["do_sample"] is False and model["use_dataset_responses"] is True
    assert cfg["seed_everything"] == 42


class RefAtValidation(L.Callback):
    """At each validation batch: the y_ref the module used (its cache) and a fresh greedy sample of the reference
    copy as it is then, for the same prompts."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list, list]] = []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        greedy = SamplingConfig(**{**module.sampling.__dict__, "do_sample": False})
        used, generated = module._generate(batch, greedy, 1, "online_dpo/reference")
        assert generated == 0  # validation generated it already
        out = sample(module.reference.copy, batch.input_ids, batch.attention_mask, greedy,
                     eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id)
        fresh = [r[m.bool()].tolist() for r, m in zip(out.response_ids, out.response_mask)]
        self.seen.append((trainer.current_epoch, [u[0] for u in used], fresh))


def test_y_ref_of_a_recurring_prompt_is_regenerated_by_each_iterations_reference(tmp_path):
    """§7(h)2: the validation prompts recur in every iteration; iteration 1's y_ref of them is the greedy answer of
    the refreshed reference (the policy at the end of iteration 0), not iteration 0's cached answer. A large learning
    rate makes the two references answer differently, so a cache that ignored the reference would fail here."""
    record = RefAtValidation()
    cli = _cli(tmp_path, "--trainer.limit_val_batches", "1", "--data.init_args.train.limit", "16",
               "--data.init_args.iterations", "2", "--trainer.max_epochs", "2", "--model.init_args.stage_lrs",
               "[0.01, 0.01]", run=False)
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert [epoch for epoch, _, _ in record.seen] == [0, 1]
    for _, used, fresh in record.seen:
        assert used == fresh
    assert record.seen[0][1] != record.seen[1][1]


class TieFirstBatch(Ranker):
    """Scores by length (ties broken by text), except that every candidate of the prompts in ``tied`` ties."""

    def __init__(self, tied: set[str]) -> None:
        super().__init__()
        self.tied = tied

    def _rank(self, prompts, candidates):
        scores = gold(prompts, candidates)
        return [[1] * len(s) if p in self.tied else [1 + sum(o > v for o in s) for v in s]
                for p, s in zip(prompts, scores)]


def test_validation_without_pairs_logs_the_same_keys_and_weighs_by_pairs(tmp_path):
    """A validation batch whose prompts all tie keeps no pair: it logs the same keys as a batch with pairs (the
    metrics are synced over ranks, so differing keys would hang DDP) and counts for nothing in the pair-weighted
    ``val/loss`` (it used to log a loss of 0 weighted by its prompts, halving the mean here); ``val/num_pairs``
    counts the pairs kept."""
    cli = _cli(tmp_path, "--trainer.limit_val_batches", "2", run=False)
    cli.datamodule.tokenizer = cli.model.tokenizer
    cli.datamodule.setup("validate")
    first, second = list(cli.datamodule.val_dataloader())[:2]
    cli.model.ranker = TieFirstBatch(set(first.prompts))
    keys: list[set[str]] = []
    log = cli.model.log

    def spy(name, value, *args, **kwargs):
        keys[-1].add(name)
        return log(name, value, *args, **kwargs)

    class Batches(L.Callback):
        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
            keys.append(set())

    cli.model.log = spy
    cli.trainer.callbacks.append(Batches())
    metrics = cli.trainer.validate(cli.model, cli.datamodule)[0]
    assert len(keys) == 2 and keys[0] == keys[1] and "val/rewards/accuracies" in keys[0]
    pairs, _ = cli.model._pairs(second, "val")
    assert int(pairs.kept.sum()) == len(second) == metrics["val/num_pairs"]
    _, mean_loss, _ = cli.model._pair_loss(pairs, "val")
    assert metrics["val/loss"] == pytest.approx(float(mean_loss), abs=1e-6)
    assert metrics["val/pairs"] == pytest.approx(0.5)


@pytest.mark.parametrize("offline", [False, True], ids=["online", "offline-first-iteration"])
def test_prompts_that_cannot_be_paired_are_named(offline):
    """A prompt without dataset responses when one candidate is generated, or without chosen and rejected in the
    offline first iteration: the error names the prompt's uid and index and how to fix it."""
    module = OnlineDPOModule(ModelSpec(name_or_path="builtin:tiny-game-base"), FixedRanks([1, 2]),
                             sampling=SamplingConfig(max_new_tokens=4, do_sample=False), max_length=128,
                             max_prompt_length=64, offline_first_iteration=offline)
    module.configure_model()
    dm = PromptDataModule(train=DataSource(path="builtin:preferences", limit=4), val_fraction=0.0, format="prompt",
                          template="Human: {prompt}\nAI:", chat_template=False, shuffle=False, batch_size=4)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch.responses[2] = []
    match = (r"model.offline_first_iteration .* prompt '.+' \(index 2\) of data.train has 0" if offline else
             r"prompt '.+' \(index 2\) has 1 candidate .* set model.num_candidates: 2")
    with pytest.raises(DataError, match=match):
        module._pairs(batch, "train")


def _any_rank_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import os

    from conftest import gloo_group

    with gloo_group(rank, world, init):
        module, batch = _module_and_batch([1, 2, 3])
        forwards = []
        module.reference.copy.register_forward_hook(lambda *args: forwards.append(1))
        half = [batch.input_ids[:2], batch.attention_mask[:2], batch.index[:2]], [batch.input_ids[2:],
                                                                                  batch.attention_mask[2:], batch.index[2:]]
        from lit_align.data.prompts import PromptBatch

        a = PromptBatch(*half[0][:2], batch.prompts[:2], half[0][2], batch.uids[:2], batch.responses[:2])
        b = PromptBatch(*half[1][:2], batch.prompts[2:], half[1][2], batch.uids[2:], batch.responses[2:])
        first, _ = module._generate(a, module.sampling, 1, "online_dpo/candidates")  # both ranks miss
        before = len(forwards)
        # rank 0: all cached; rank 1: new prompts. Under FSDP2 rank 1's forwards are collectives: rank 0 must run too
        again, generated = module._generate(a if rank == 0 else b, module.sampling, 1, "online_dpo/candidates")
        out = {"forwards": len(forwards) - before, "generated": generated, "same": again == first if rank == 0 else None}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two spawned processes
def test_a_rank_with_every_prompt_cached_still_runs_the_sampler_when_another_rank_misses(tmp_path):
    """Rank 0's prompts are all cached while rank 1 generates: rank 0 runs the sampler too (the same forwards a
    sharded model needs from every rank), discards the output and keeps its cached generations."""
    import torch.multiprocessing as mp

    mp.start_processes(_any_rank_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert one["generated"] == 2 and one["forwards"] > 0
    assert zero["generated"] == 0 and zero["forwards"] > 0 and zero["same"] is True


def test_resume_at_an_iteration_boundary_then_again_mid_iteration_is_exact(tmp_path):
    """Stopped at iteration 0's last step (a checkpoint before the epoch-end hooks), resumed and stopped again
    mid iteration 1, resumed once more: 6 steps and the straight run's weights. Lightning alone counted the resumed
    iteration 1 as never started, so the second checkpoint read as written after its end: iteration 1 ran twice."""
    ckpt_args = ["--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
                 "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]
    straight = _cli(tmp_path / "a")
    _cli(tmp_path / "b", *ckpt_args, "--trainer.max_steps", "2")
    _cli(tmp_path / "c", *ckpt_args, "--trainer.max_steps", "3",
         "--ckpt_path", str(next((tmp_path / "b").rglob("*step=2.ckpt"))))
    resumed = _cli(tmp_path / "d", "--ckpt_path", str(next((tmp_path / "c").rglob("*step=3.ckpt"))))
    assert resumed.trainer.global_step == 6
    a, d = straight.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in a:
        torch.testing.assert_close(d[name], a[name], rtol=0, atol=0, msg=name)
