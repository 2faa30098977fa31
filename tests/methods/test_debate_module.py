"""DebateModule mechanics on tiny random models: the phase pipeline (generate -> pairs -> DPO) for both
players, alternation (spec §1.13 item 5: the other player's weights do not move), DPO starting at log 2,
natural DPO prompts, accuracy by round, exact resume mid-phase, and bad configuration."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import StopAfter

from lit_align.callbacks import BatchCheckpoint
from lit_align.data.qa import QADataModule
from lit_align.data.records import DataSource
from lit_align.debate.protocol import HINT_PREFIX
from lit_align.debate.rules import CodeRule, CorrectnessQuality, PaperRule
from lit_align.engine import Optimization
from lit_align.errors import ConfigError
from lit_align.methods import DebateModule
from lit_align.models import LoRASpec, ModelSpec, TinyArch

TINY = TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def _module(debate=(), generate=(), dpo=(), lr: float = 1e-2, **kwargs) -> DebateModule:
    """A tiny team: 2 rounds, 1 trial, K = 2, 4 questions a phase, 1 DPO epoch of 2-pair steps, every pair kept."""
    args = dict(actor=ModelSpec(tiny=TINY, lora=LoRASpec(r=4, alpha=8)),
                debate={"rounds": 2, "max_new_tokens": 6, "chat_template": False, **dict(debate)},
                generate={"trials": 1, "k": 2, "questions_per_phase": 4, **dict(generate)},
                dpo={"epochs": 1, "batch_size": 2, **dict(dpo)}, pair_rule=PaperRule(epsilon=0.0),
                optimization={p: Optimization(lr=lr) for p in ("actor", "critic")})
    args.update(kwargs)
    return DebateModule(**args)


def _data() -> QADataModule:
    return QADataModule(train=DataSource(path="builtin:tiny_qa"), val=DataSource(path="builtin:tiny_qa/val", limit=4),
                        batch_size=4)


def _trainer(root, callbacks=(), **kwargs) -> L.Trainer:
    args = dict(max_epochs=-1, max_steps=-1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                callbacks=list(callbacks), num_sanity_val_steps=0)
    args.update(kwargs)
    return L.Trainer(**args)


class _Record(L.Callback):
    """Per step: the phase's player, its stage, and which players' trainable weights changed."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, set[str]]] = []

    @staticmethod
    def _weights(module: DebateModule) -> dict[str, dict[str, torch.Tensor]]:
        return {p: {n: t.detach().clone() for n, t in module.players.trainable(p).items()} for p in ("actor", "critic")}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._before = self._weights(module)
        self._where = (module.current[1] if module.current else "done", module.phase_state.stage)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        after = self._weights(module)
        changed = {p for p in after if any(not torch.equal(t, self._before[p][n]) for n, t in after[p].items())}
        self.steps.append((*self._where, changed))


def test_phases_build_pairs_and_train_only_their_player(tmp_path):
    L.seed_everything(0)
    record = _Record()
    module = _module()
    trainer = _trainer(tmp_path, [record])
    trainer.fit(module, _data())
    assert module.phase_state.stage == "done" and trainer.should_stop
    assert len(module.pair_counts) == 2 and all(n > 0 for n in module.pair_counts)  # both players got pairs
    generate = [s for s in record.steps if s[1] == "generate"]
    train = [s for s in record.steps if s[1] == "train"]
    assert all(changed == set() for *_, changed in generate)  # generating never moves weights
    assert train and all(changed == {player} for player, _, changed in train)  # alternation (§1.13 item 5)
    assert {player for player, *_ in train} == {"actor", "critic"}
    assert [p for p, *_ in record.steps] == sorted([p for p, *_ in record.steps], key=("actor", "critic").index)


def test_dpo_starts_at_log_two_and_prompts_are_natural(tmp_path):
    """LoRA B starts at 0: the first DPO loss of a phase is log 2 (policy == reference); no stored DPO prompt
    carries the guided hint (spec §1.13 item 2)."""
    L.seed_everything(0)

    class FirstLoss(L.Callback):
        losses: list[float] = []
        prompts: list[str] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if "train/actor/loss" in trainer.callback_metrics and not self.losses:
                self.losses.append(float(trainer.callback_metrics["train/actor/loss"]))
            self.prompts += [p.prompt for p in module.phase_state.pairs]

    first = FirstLoss()
    module = _module(iterations=1, order=("actor", "critic"))
    _trainer(tmp_path, [first]).fit(module, _data())
    assert first.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert first.prompts and not any(HINT_PREFIX in p for p in first.prompts)


def test_every_phase_starts_at_log_two_and_the_code_rule_builds_guided_pairs(tmp_path):
    """Two iterations: each DPO run's reference is the player as the run starts (iteration 2: the trained
    player), so every phase's first loss is log 2. The code rule with correctness pairs guided-toward-y
    (chosen) against guided-toward-!y (rejected), never the natural response."""
    L.seed_everything(0)

    class PhaseStarts(L.Callback):
        def __init__(self) -> None:
            self.first: dict[int, float] = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            phase = int(module.last_step_metrics["phase"])
            for player in ("actor", "critic"):
                key = f"{player}/loss"
                if key in module.last_step_metrics and phase not in self.first:
                    self.first[phase] = module.last_step_metrics[key]

    starts = PhaseStarts()
    # trials 2: under the code rule the critic's trial 0 keeps its natural response (no pair), trial 1 is guided
    module = _module(iterations=2, generate={"trials": 2},
                     pair_rule=CodeRule(threshold=0.0, actor_quality=CorrectnessQuality()))
    _trainer(tmp_path, [starts]).fit(module, _data())
    assert sorted(starts.first) == [0, 1, 2, 3] and module.phase_state.stage == "done"
    assert len(module.pair_counts) == 4 and all(n > 0 for n in module.pair_counts)
    assert all(v == pytest.approx(math.log(2), abs=1e-4) for v in starts.first.values())


def test_validation_logs_accuracy_for_every_round(tmp_path):
    L.seed_everything(0)
    module = _module(debate={"rounds": 3})
    trainer = _trainer(tmp_path, limit_val_batches=1, num_sanity_val_steps=-1)
    trainer.validate(module, _data())
    metrics = trainer.callback_metrics
    for t in range(3):
        assert f"val/accuracy/round_{t}" in metrics
    for key in ("val/accuracy", "val/improvement", "val/gain", "val/right_to_wrong", "val/wrong_to_right"):
        assert key in metrics
    assert len(module.val_history) == 1 and len(module.val_transcripts) == 4
    assert set(module.val_transcripts[0]) >= {"question", "gold", "actor_0", "answer_2", "critic_1", "final_correct"}


def _fit(root, stop: int | None = None, ckpt_path=None) -> DebateModule:
    L.seed_everything(0)
    module = _module(dpo={"epochs": 2})
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=-1)]
    if stop is not None:
        callbacks.append(StopAfter(stop))
    _trainer(root, callbacks, enable_checkpointing=True).fit(module, _data(), ckpt_path=ckpt_path)
    return module


def test_resume_is_exact_in_the_middle_of_a_phase(tmp_path):
    """Stop inside the actor's DPO stage (pairs, reference log-probs and DPO order in the checkpoint),
    resume, and end where the uninterrupted run ends: weights, optimisers, pairs."""
    straight = _fit(tmp_path / "a")
    _fit(tmp_path / "b", stop=3)  # 1 generate step (4 questions), then 2 DPO steps of the actor
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and all("lora_" in k for k in saved)  # adapters only: the frozen base is rebuilt from the spec
    resumed = _fit(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.step_count == straight.step_count and resumed.pair_counts == straight.pair_counts
    full = [m.players.state_dict() for m in (straight, resumed)]  # the base included
    assert len(full[0]) > len(saved)
    for (name, a), (_, b) in zip(*(f.items() for f in full)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_generate_stages_are_checkpointed_and_resume_exactly(tmp_path):
    """BatchCheckpoint writes in generate stages (no optimiser step, so ModelCheckpoint would not): stop after
    the first of two generate batches, resume from its file, and end where the uninterrupted run ends."""
    def fit(root, stop=None, ckpt_path=None) -> DebateModule:
        L.seed_everything(0)
        module = _module(generate={"questions_per_phase": 8})
        callbacks = [BatchCheckpoint(dirpath=str(root))] + ([StopAfter(stop)] if stop else [])
        _trainer(root, callbacks).fit(module, _data(), ckpt_path=ckpt_path)
        return module

    straight = fit(tmp_path / "a")
    stopped = fit(tmp_path / "b", stop=1)
    assert stopped.phase_state.stage == "generate" and stopped.phase_state.questions_done == 4 and stopped.trainer.global_step == 0
    assert not list((tmp_path / "b").glob(".*.tmp"))  # written under a temporary name, then renamed
    resumed = fit(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last-batch.ckpt"))
    assert resumed.pair_counts == straight.pair_counts and resumed.step_count == straight.step_count
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_dpo_validation_stops_early_and_restores_the_best_weights(tmp_path):
    """With DPO validation pairs (questions after the training ones), each phase evaluates every step, stops
    after ``dpo_patience`` evaluations without a new best, and ends at the weights of its best evaluation."""
    L.seed_everything(0)

    class Track(L.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, list[tuple[float, dict[str, torch.Tensor]]]] = {"actor": [], "critic": []}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            for player in ("actor", "critic"):
                loss = module.last_step_metrics.get(f"{player}/val_loss")
                if loss is not None:
                    weights = {n: t.detach().clone() for n, t in module.players.trainable(player).items()}
                    self.runs[player].append((loss, weights))

    track = Track()
    module = _module(generate={"questions_per_phase": 4, "dpo_val_questions": 4},
                     dpo={"epochs": 8, "eval_every": 1, "patience": 2}, lr=5e-2)
    _trainer(tmp_path, [track]).fit(module, _data())
    assert module.phase_state.stage == "done"
    questions, _ = module._phase_questions()
    assert len(questions) == 8 and len({(q.question, q.options) for q in questions}) == 8  # disjoint splits
    for player, run in track.runs.items():
        losses = [loss for loss, _ in run]
        best = min(range(len(losses)), key=losses.__getitem__)
        steps = math.ceil(module.pair_counts[("actor", "critic").index(player)] / 2) * 8  # 8 epochs, 2 pairs a step
        assert len(run) == (best + 1 + 2 if best + 1 + 2 < steps else steps)  # stopped at patience, or the end
        for name, param in module.players.trainable(player).items():
            torch.testing.assert_close(param, run[best][1][name], rtol=0, atol=0)
    stopped = [len(run) < math.ceil(n / 2) * 8 for run, n in zip(track.runs.values(), module.pair_counts)]
    assert any(stopped)


def test_too_few_training_questions_name_both_keys(tmp_path):
    module = _module(generate={"questions_per_phase": 399, "dpo_val_questions": 2})  # builtin:tiny_qa has 400
    with pytest.raises(ValueError, match=r"model.generate.questions_per_phase \(399\) plus "
                                         r"model.generate.dpo_val_questions \(2\)"):
        _trainer(tmp_path).fit(module, _data())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"order": ("actor", "actor")}, "model.order"),
    ({"iterations": 0}, "model.iterations"),
    ({"pair_rule": "both"}, "model.pair_rule must be a PairRule"),
    ({"pair_rule": {"class_path": "lit_align.debate.rules.PaperRule", "init_args": {"epsilon": 1.5}}},
     "model.pair_rule.init_args.epsilon"),
    ({"debate": {"rounds": 0}}, "model.debate.rounds"),
    ({"debate": {"top_p": 0.0}}, "model.debate: .*top_p"),
    ({"generate": {"k": 0}}, "model.generate.k"),
    ({"generate": {"critic_rollout_actor": "best"}}, "model.generate.critic_rollout_actor"),
    ({"generate": {"tirals": 2}}, "model.generate: unknown key.*tirals"),
    ({"dpo": {"patience": 0}}, "model.dpo.patience"),
    ({"dpo": {"beta": 0.0}}, "model.dpo.beta"),
    ({"generate": {"dpo_val_questions": -1}}, "model.generate.dpo_val_questions"),
    ({"optimization": {"actor": Optimization(lr=1e-3)}}, "model.optimization: no block for model.optimization.critic"),
])
def test_bad_configuration_names_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _module(**kwargs)


def test_fsdp1_is_refused_naming_the_strategy_key(tmp_path):
    """Both players' adapters on one base with their own optimisers need FSDP2 (or DDP), not FSDP1."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = _trainer(tmp_path)
    trainer._accelerator_connector.strategy = FSDPStrategy()  # Lightning builds FSDP1 on GPUs only
    module = _module()
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"trainer.strategy: DebateModule does not run under FSDPStrategy.*fsdp2_cpu"):
        module.setup("fit")


def test_a_critic_with_another_tokenizer_is_refused_naming_its_key(tmp_path, tokenizer):
    """The players read each other's text as token ids of one tokenizer."""
    other = tmp_path / "other_tokenizer"
    tokenizer.save_pretrained(other)
    changed = type(tokenizer).from_pretrained(other)
    changed.add_tokens(["<an-extra-token>"])
    changed.save_pretrained(other)
    critic = ModelSpec(tiny=TINY, lora=LoRASpec(r=4, alpha=8), tokenizer=str(other))
    with pytest.raises(ValueError, match=r"model.critic's tokenizer .* differs from model.actor's"):
        _trainer(tmp_path).fit(_module(critic=critic), _data())
