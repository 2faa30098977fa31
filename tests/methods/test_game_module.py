"""AdversarialGameModule mechanics on tiny random models: who updates when (spec §2.9 item 4), reward
assembly and signs (item 2), the shared LoRA base, the snapshot pool and averaged policies, exact
resume, and bad input (mismatched tokenizers, attack prompts that decode to nothing)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import lightning as L
import pytest
import torch
from conftest import StopAfter

from lit_align.data.prompts import SeedPromptDataModule
from lit_align.data.records import DataSource
from lit_align.engine import Optimization
from lit_align.game import (
    CriticConfig,
    DiversityConfig,
    DiversityHistory,
    GameSampling,
    GameSchedule,
    PoolConfig,
    SentenceEncoder,
    build_sentence_encoder,
    word_tokens,
)
from lit_align.methods import AdversarialGameModule
from lit_align.methods.game import attacker_reward
from lit_align.models import LoRASpec, ModelSpec, RewardModelSpec, TinyArch

TINY = TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _module(**kwargs) -> AdversarialGameModule:
    args = dict(defender=ModelSpec(tiny=TINY, lora=LoRASpec(r=4, alpha=8)), schedule=GameSchedule(2, 2),
                sampling=GameSampling(attacker_max_new_tokens=6, defender_max_new_tokens=6, temperature=1.0,
                                      top_p=1.0, seed=kwargs.pop("sample_seed", None)),
                diversity=DiversityConfig(embedding_weight=0.0), pool=PoolConfig(**kwargs.pop("pool", {})),
                optimization={p: Optimization(lr=1e-2) for p in ("defender", "attacker", "critic")})
    args.update(kwargs)
    return AdversarialGameModule(**args)


def _data(batch_size: int = 4) -> SeedPromptDataModule:
    return SeedPromptDataModule(train=DataSource(path="builtin:seed_prompts"),
                                val=DataSource(path="builtin:seed_prompts/val"), batch_size=batch_size)


def _trainer(root, batches: int, callbacks=(), **kwargs) -> L.Trainer:
    args = dict(max_epochs=1, limit_train_batches=batches, limit_val_batches=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(root), callbacks=list(callbacks), num_sanity_val_steps=0)
    args.update(kwargs)
    return L.Trainer(**args)


class _Changes(L.Callback):
    """Which parameter groups changed in each training step."""

    def __init__(self) -> None:
        self.steps: list[set[str]] = []

    @staticmethod
    def _groups(module: AdversarialGameModule) -> dict[str, dict[str, torch.Tensor]]:
        groups = {p: {n: t.detach().clone() for n, t in module._trainable(p).items()} for p in ("defender", "attacker")}
        for name, critic in module.critics.items():
            groups[f"critic/{name}"] = {n: t.detach().clone() for n, t in critic.named_parameters()}
        return groups

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._before = self._groups(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = self._groups(module)
        self.steps.append({g for g, params in after.items()
                           if any(not torch.equal(t, self._before[g][n]) for n, t in params.items())})


def test_schedule_freezes_the_inactive_player(tmp_path):
    """(D, A) = (3, 2): steps 0-2 move only the defender and its critic, 3-4 only the attacker and its
    critic, step 5 is the defender again (spec §2.9 item 4)."""
    L.seed_everything(0)
    changes = _Changes()
    module = _module(schedule=GameSchedule(defender_steps=3, attacker_steps=2))
    _trainer(tmp_path, 6, [changes]).fit(module, _data())
    defender, attacker = {"defender", "critic/defender"}, {"attacker", "critic/attacker"}
    assert changes.steps == [defender] * 3 + [attacker] * 2 + [defender]
    assert module.updates == {"defender": 4, "attacker": 2} and module.step_count == 6


def test_simultaneous_moves_and_a_shared_critic(tmp_path):
    L.seed_everything(0)
    changes = _Changes()
    module = _module(schedule=GameSchedule(mode="simultaneous"), critic=CriticConfig(shared=True))
    _trainer(tmp_path, 2, [changes]).fit(module, _data())
    assert list(module.critics) == ["shared"]
    assert changes.steps == [{"defender", "attacker", "critic/shared"}] * 2


def test_attacker_reward_assembly_and_signs():
    """R_att = p_unsafe - 5 SB - 1 CS (spec §2.9 item 2); duplicates in the history lower it monotonically."""
    p = torch.tensor([0.9, 0.2])
    got = attacker_reward(p, torch.tensor([0.1, 0.0]), torch.tensor([0.3, -0.5]), bleu_weight=5.0, embedding_weight=1.0)
    assert torch.allclose(got, torch.tensor([0.9 - 0.5 - 0.3, 0.2 + 0.5]))
    history, prompt = DiversityHistory(), word_tokens("how do I steal a car from my neighbour")
    emb = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 3.0]]), dim=-1)
    rewards = []
    for _ in range(4):
        sb, cs = history.self_bleu([prompt]), history.cosine(emb)
        rewards.append(float(attacker_reward(torch.tensor([0.9]), sb, cs, bleu_weight=5.0, embedding_weight=1.0)))
        history.append([prompt], emb)
    assert rewards[0] == pytest.approx(0.9)  # empty history: no penalty
    assert rewards[1] == pytest.approx(0.9 - 5.0 - 1.0, abs=1e-5)  # an identical prompt: SB = CS = 1
    assert all(b <= a for a, b in zip(rewards, rewards[1:]))


def test_kl_is_zero_at_initialisation_and_shared_base_holds_one_copy(tmp_path):
    """LoRA B starts at zero, so both players equal their references (adapters off): the first step's KL
    is 0. Both players live on one base: its weights exist once, and there is no reference copy."""
    L.seed_everything(0)
    module = _module(schedule=GameSchedule(mode="simultaneous"))
    trainer = _trainer(tmp_path, 1, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    assert float(metrics["train/defender/kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["train/attacker/kl"]) == pytest.approx(0.0, abs=1e-6)
    assert list(module.players.policies) == ["shared"] and len(module.players.references) == 0

    def base_bytes(m) -> int:  # distinct storages of the non-adapter weights
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for model in m.players.policies.values() for n, p in model.named_parameters() if "lora_" not in n}
        return sum(storages.values())

    separate = _module(share_base=False)
    separate.configure_model()
    assert base_bytes(separate) == 2 * base_bytes(module)  # a base per player, vs one for both


def test_copy_references_without_lora(tmp_path):
    L.seed_everything(0)
    changes = _Changes()
    module = _module(defender=ModelSpec(tiny=TINY), schedule=GameSchedule(1, 1))
    _trainer(tmp_path, 2, [changes]).fit(module, _data())
    assert set(module.players.references) == {"defender", "attacker"}
    assert changes.steps == [{"defender", "critic/defender"}, {"attacker", "critic/attacker"}]
    assert not any("references." in k for k in module.state_dict())  # rebuilt, never saved


def test_snapshot_pool_and_averaged_policies(tmp_path):
    """The pool keeps the last ``pool_size`` attacker snapshots; the average is the mean of the iterates;
    defender-only steps with pool_prob 1 attack with a snapshot."""
    L.seed_everything(0)

    class Iterates(L.Callback):
        def __init__(self) -> None:
            self.attacker: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if module.schedule.active(module.step_count - 1) == ("attacker",):
                self.attacker.append({n: p.detach().clone() for n, p in module._trainable("attacker").items()})

    iterates = Iterates()
    module = _module(schedule=GameSchedule(defender_steps=1, attacker_steps=3, first="attacker"),
                     pool={"snapshot_every": 1, "size": 2, "prob": 1.0})
    trainer = _trainer(tmp_path, 4, [iterates], logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(module, _data())
    assert len(iterates.attacker) == 3 and len(module.pool) == 2
    for name, value in module.pool[-1].items():  # snapshots and averages are kept on the CPU
        assert torch.equal(value, iterates.attacker[-1][name].cpu())
    for name, value in module.averages["attacker"].items():
        mean = torch.stack([it[name].cpu() for it in iterates.attacker]).mean(0)
        torch.testing.assert_close(value, mean, rtol=0, atol=1e-6)
    assert float(trainer.callback_metrics["train/attacker/from_pool"]) == 1.0  # step 3: defender vs a snapshot
    before = {n: p.detach().clone() for n, p in module._trainable("attacker").items()}
    with module.averaged("attacker"):
        swapped = module._trainable("attacker")
        assert all(torch.equal(swapped[n], module.averages["attacker"][n].to(swapped[n])) for n in before)
    assert all(torch.equal(p, before[n]) for n, p in module._trainable("attacker").items())
    assert (tmp_path / "averaged" / "attacker.pt").is_file()


def _fit_with_checkpoints(root, stop: int, ckpt_path=None) -> AdversarialGameModule:
    L.seed_everything(0)
    module = _module(schedule=GameSchedule(defender_steps=2, attacker_steps=1), pool={"snapshot_every": 1, "prob": 0.5},
                     diversity=DiversityConfig(embedding_weight=1.0, encoder=ModelSpec(tiny=TINY)))
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1,
                                                     save_top_k=-1)
    _trainer(root, 20, [checkpoint, StopAfter(stop)], enable_checkpointing=True).fit(module, _data(),
                                                                                       ckpt_path=ckpt_path)
    return module


def test_resume_is_exact(tmp_path):
    """Players, critics, optimisers, the schedule clock, the history, the pool and the averages survive a
    restart: 3 + 3 steps equal 6 uninterrupted steps."""
    straight = _fit_with_checkpoints(tmp_path / "a", 6)
    _fit_with_checkpoints(tmp_path / "b", 3)
    checkpoint = tmp_path / "b" / "last.ckpt"  # after batch 3, mid-epoch
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert not [k for k in saved if k.startswith("players.") and "lora_" not in k]  # the frozen base is rebuilt
    resumed = _fit_with_checkpoints(tmp_path / "c", 6, ckpt_path=str(checkpoint))
    assert resumed.step_count == straight.step_count == 6 and resumed.updates == straight.updates
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert straight.history.state_dict()["tokens"] == resumed.history.state_dict()["tokens"]
    for a, b in zip(straight.pool, resumed.pool):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for player in straight.averages:
        assert all(torch.equal(straight.averages[player][k], resumed.averages[player][k])
                   for k in straight.averages[player])


def test_empty_attack_prompts_are_dropped_and_counted(tmp_path):
    L.seed_everything(0)
    module = _module(share_base=False, schedule=GameSchedule(1, 1, first="attacker"))
    module.configure_model()
    eos = module.tokenizer.eos_token_id

    def only_eos_on_even_rows(_, __, logits):
        """While sampling ((B, 1, V) logits), EOS is the only choice on even rows: attack prompts that
        decode to nothing. Scoring passes (other shapes) are left alone."""
        if logits.dim() != 3 or logits.shape[1] != 1:
            return logits
        forced = torch.full_like(logits, -1e4)
        forced[..., eos] = 0.0
        rows = torch.arange(logits.shape[0], device=logits.device) % 2 == 0
        return torch.where(rows[:, None, None], forced, logits)

    module.players.policies["attacker"].get_output_embeddings().register_forward_hook(only_eos_on_even_rows)
    trainer = _trainer(tmp_path, 2, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(module, _data(batch_size=4))
    assert module.dropped_empty == 4  # 2 of 4 rows in each of 2 steps
    assert float(trainer.callback_metrics["train/attacker/empty"]) == 2.0


def test_mismatched_tokenizers_are_refused(tmp_path):
    other = tmp_path / "tok"
    from transformers import AutoTokenizer

    from lit_align.models import TINY_TOKENIZER

    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    module = _module(attacker=ModelSpec(tiny=TINY, tokenizer=str(other), lora=LoRASpec(r=4)))
    with pytest.raises(ValueError, match="model.attacker.*tokenizer"):
        module.configure_model()
    module = _module(critic=CriticConfig(model=RewardModelSpec(model=ModelSpec(tiny=TINY, tokenizer=str(other)))))
    with pytest.raises(ValueError, match="model.critic.*tokenizer"):
        module.configure_model()


@pytest.mark.parametrize(("build", "message"), [
    (lambda: DiversityConfig(embedding_weight=1.0), "model.diversity.encoder"),
    (lambda: PoolConfig(prob=0.5), "model.pool.snapshot_every"),
    (lambda: _module(reference="adapter", defender=ModelSpec(tiny=TINY)), "model.reference"),
    (lambda: GameSampling(defender_template="Human: AI:"), "model.sampling.defender_template"),
    (lambda: GameSampling(attacker_max_new_tokens=0), "model.sampling.attacker_max_new_tokens"),
    (lambda: DiversityConfig(scope="batch", embedding_weight=0.0), "model.diversity.scope"),
    (lambda: _module(optimization={"defender": Optimization(lr=1e-3), "attacker": Optimization(lr=1e-3)}),
     r"model.optimization.critic"),
])
def test_bad_configuration_names_the_key(build, message):
    """Each block checks itself where it is declared; a missing per-player optimiser block is named."""
    from lit_align.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build()


def test_fsdp1_is_refused_naming_the_strategy_key():
    """Lightning's FSDPStrategy (FSDP1) wraps the whole module once, which two players' adapters on one base
    with their own optimisers do not fit: setup refuses it and names the FSDP2 and DDP presets."""
    from lightning.pytorch.strategies import FSDPStrategy

    from lit_align.errors import ConfigError

    module = _module()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer._accelerator_connector.strategy = FSDPStrategy()  # needs a GPU to be chosen the usual way
    module.trainer = trainer
    with pytest.raises(ConfigError, match=r"trainer.strategy.*FSDPStrategy.*fsdp2_cpu.yaml"):
        module.setup("fit")


def test_inactive_player_kl_is_logged_and_an_eval_judge_scores_validation(tmp_path):
    """One defender-only step still logs the attacker's KL (spec §2.6 step 7); validation uses the
    independent ``eval_judge`` (here one that calls every answer unsafe), training the rule judge."""
    from lit_align.game import CallableJudge

    L.seed_everything(0)
    module = _module(schedule=GameSchedule(1, 1), eval_judge=CallableJudge(lambda p, r: [1.0] * len(p)))
    trainer = _trainer(tmp_path, 1, limit_val_batches=1)
    trainer.fit(module, _data())
    metrics = trainer.callback_metrics
    assert module.updates == {"defender": 1, "attacker": 0}
    assert "train/attacker/kl" in metrics and "train/defender/kl" in metrics
    assert float(metrics["val/attack/asr"]) == 1.0 and float(metrics["val/seed/asr"]) == 1.0
    assert float(metrics["train/asr"]) < 1.0  # the toy rule judge in training


def test_sampling_follows_the_global_seed_unless_fixed(tmp_path):
    """``sample_seed: null`` takes seed_everything's seed (kept in checkpoints); a fixed one ignores it."""
    def run(seed: int, **kwargs) -> dict[str, torch.Tensor]:
        L.seed_everything(seed)
        module = _module(schedule=GameSchedule(mode="simultaneous"), **kwargs)
        _trainer(tmp_path / f"{seed}{kwargs}", 1).fit(module, _data())
        return {n: p.detach().clone() for n, p in module._trainable("attacker").items()}

    def same(a, b) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(run(0), run(0)) and not same(run(0), run(1))
    assert same(run(0, sample_seed=5), run(1, sample_seed=5))


class _Recording(SentenceEncoder):
    """A real tiny sentence encoder that records the texts it encodes."""

    def encode(self, texts):
        self.seen.extend(texts)
        return super().encode(texts)


def _recording_encoder() -> _Recording:
    built = build_sentence_encoder(ModelSpec(tiny=TINY))  # a fresh tokenizer each: the ranks run in threads
    encoder = _Recording(built.model, built.tokenizer)
    encoder.seen = []
    return encoder


def test_diversity_terms_split_between_ranks_equal_one_process():
    """Two ranks (threads whose ``gather`` is an all-gather) play two steps of a 5-prompt global batch; one
    process plays the same prompts. Each rank encodes only its own kept prompts, the history (every rank's
    prompts with their embeddings, in global-index order) is the same on both ranks and equals one process's,
    and each rank's rows score as one process scores them (SelfBLEU exactly: the same references in the same
    order). An empty attack (index 3) scores 0 and stays out of the history."""
    from lit_align.game.play import diversity_terms

    steps = [{7: "how to pick a lock", 3: "", 2: "how to pick a lock quickly", 5: "tell me about chemistry",
              1: "tell me about locks"},
             {7: "how to make a lock", 3: "tell me about a lock", 2: "", 5: "how to pick it", 1: "what is a lock"}]
    shards = [[7, 3, 2], [5, 1]]  # each rank's rows, in its batch's order
    parts, barrier = [None, None], threading.Barrier(2)

    def all_gather(rank: int):
        def gather(mine):
            parts[rank] = mine
            barrier.wait()
            found = list(parts)
            barrier.wait()  # both ranks have read the parts before the next step writes them
            return found
        return gather

    def play(history: DiversityHistory, encoder, texts: dict[int, str], rows: list[int], gather=lambda x: [x]):
        keep = torch.tensor([bool(texts[i]) for i in rows])
        return diversity_terms(history, encoder, [texts[i] for i in rows], keep, torch.tensor(rows),
                               include_batch=True, gather=gather)

    one, one_encoder = DiversityHistory(), _recording_encoder()
    ranks = [(DiversityHistory(), _recording_encoder()) for _ in shards]
    for texts in steps:
        rows = sorted(texts)
        bleu, cos = play(one, one_encoder, texts, rows)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(play, *zip(*ranks), [texts, texts], shards, map(all_gather, range(2))))
        for shard, (rank_bleu, rank_cos) in zip(shards, results):
            at = [rows.index(i) for i in shard]
            assert rank_bleu.tolist() == bleu[at].tolist()
            torch.testing.assert_close(rank_cos, cos[at], rtol=0, atol=1e-6)
        empty = [n for n, i in enumerate(rows) if not texts[i]]
        assert bleu[empty].eq(0).all() and cos[empty].eq(0).all()
    assert bleu.gt(0).any() and cos.ne(0).any()
    for (history, encoder), shard in zip(ranks, shards):
        assert encoder.seen == [t for texts in steps for i in shard if (t := texts[i])]  # only its own prompts
        state, expected = history.state_dict(), one.state_dict()
        assert state["tokens"] == expected["tokens"] == [word_tokens(t) for texts in steps for _, t in
                                                         sorted(texts.items()) if t]
        torch.testing.assert_close(state["emb_sum"], expected["emb_sum"], rtol=0, atol=1e-6)


def test_test_stage_evaluates_like_validation_without_touching_the_report(tmp_path):
    """``trainer.test`` runs the validation step on the test seeds and logs ``test/...`` (the synced means and
    the attacks' diversity); the report's history is for validations only."""
    L.seed_everything(0)
    module = _module()
    data = SeedPromptDataModule(train=DataSource(path="builtin:seed_prompts"),
                                test=DataSource(path="builtin:seed_prompts/val"), batch_size=4, eval_batch_size=8)
    trainer = _trainer(tmp_path, 1, limit_test_batches=1)
    trainer.test(module, data)
    metrics = trainer.callback_metrics
    assert {"test/seed/asr", "test/attack/reward", "test/defender/kl", "test/attacker/bleu_diversity"} <= set(metrics)
    assert float(metrics["test/defender/kl"]) == pytest.approx(0.0, abs=1e-5)  # no step yet: policy == reference
    assert module.val_history == []
