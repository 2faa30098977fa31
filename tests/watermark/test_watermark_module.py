"""WatermarkModule on CPU: detector-only control, co-training, the KL coefficient's direction, resume.

The "human" continuations are samples of the frozen starting LLM (``human_from_reference``), so
the two classes start indistinguishable: any AUROC above chance must come from the LLM's update.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import REPO

from lit_align.cli import cli_main
from lit_align.errors import ConfigError
from lit_align.losses import detector_loss
from lit_align.watermark.text import as_batch

CONFIG = str(REPO / "configs/watermark/tiny.yaml")


def _fit(tmp_path, *extra: str):
    """Fit the tiny config; return the CLI, the final val/auroc, the last train/kl and the mean
    val/auroc over the run's validations (every 10 epochs: the area under its AUROC curve)."""
    cli = cli_main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", *extra])
    metrics = cli.trainer.callback_metrics
    rows = [r for f in tmp_path.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    aurocs = [float(r["val/auroc"]) for r in rows if r.get("val/auroc")]
    kl = float(metrics["train/kl"]) if "train/kl" in metrics else 0.0
    return cli, float(metrics["val/auroc"]), kl, sum(aurocs) / max(len(aurocs), 1)


def test_detector_loss_is_log_two_at_equal_scores():
    s = torch.tensor([0.0, 1.5, -2.0])
    loss, m = detector_loss(s, s.clone(), reg=0.0)
    assert float(loss) == pytest.approx(math.log(2))
    loss, _ = detector_loss(s, s.clone(), reg=1e-4)
    assert float(loss) == pytest.approx(math.log(2) + 1e-4 * float((2 * s**2).mean()))
    assert float(m["accuracy"]) == 0.0


def test_detector_alone_cannot_separate_the_original_llm_from_itself(tmp_path):
    """Control (the paper's "lr 0" ablation): the actor does not move, so the detector has nothing to find."""
    _, auroc, _, _ = _fit(tmp_path, "--model.init_args.optimization.actor.optimizer={class_path: torch.optim.SGD, init_args: {lr: 0.0}}")
    assert 0.4 <= auroc <= 0.6


@pytest.mark.integration
def test_co_training_watermarks_and_a_larger_kl_coefficient_slows_it(tmp_path):
    cli, auroc, kl, gain = _fit(tmp_path / "a")
    assert auroc > 0.9
    assert kl > 1.0  # the watermark is a real change of the distribution
    _, _, kl_strong, gain_strong = _fit(tmp_path / "b", "--model.init_args.rewards.kl_coef=1.0")
    assert kl_strong < kl and gain_strong < gain  # a larger KL coefficient: closer to the reference, slower
    module = cli.model
    prompt = "The harbour town"
    text = module.generate([prompt], chat_template=False)[0]
    assert isinstance(module.detect(prompt, text), float)
    out = module.save_detector(tmp_path / "detector")
    assert (out / "head.safetensors").is_file() and (out / "config.json").is_file()


def test_resume_restores_every_player_and_the_stage(tmp_path):
    """4 batches straight == 2 batches, checkpoint, resume, 2 more: actor, critic, detector, their
    three optimisers and the stage counter (detector pretraining for the first 3 batches) come back."""
    common = ["fit", "--config", CONFIG, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
              "--model.init_args.detector_training.pretrain_steps=3", "--trainer.callbacks=[]"]
    straight = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'a'}", "--trainer.max_epochs=2"])
    first = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.max_epochs=1"])
    ckpt = tmp_path / "one.ckpt"
    first.trainer.save_checkpoint(ckpt)
    resumed = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'c'}", "--trainer.max_epochs=2",
                        "--ckpt_path", str(ckpt)])
    assert resumed.model.step_count == straight.model.step_count == 4
    for name in ("policy", "critic", "detector"):
        a, c = getattr(straight.model, name).state_dict(), getattr(resumed.model, name).state_dict()
        for key in a:
            torch.testing.assert_close(c[key], a[key], rtol=0, atol=0, msg=f"{name}.{key}")


def test_alignment_reward_is_mixed_with_the_detector_score(tmp_path):
    """Watermarking during alignment: R = lambda * detector + (1 - lambda) * alignment RM (lambda 0.5)."""
    rm = "{model: {tiny: {family: llama, hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1, intermediate_size: 64}, seed: 7}, head_init_std: 0.5}"
    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]", f"--model.init_args.alignment={{reward: {rm}}}",
                    "--model.init_args.detector.head_init_std=0.5"], run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rollout = module._generate(batch)
    mixed = module._scores(rollout)
    with torch.no_grad():
        detector = module._detector_scores(as_batch(rollout))  # the re-encoded text, as in training
        aligned = module.alignment.score(rollout.sequences, rollout.attention_mask)
    assert not torch.allclose(detector, aligned)
    torch.testing.assert_close(mixed, 0.5 * detector + 0.5 * aligned)
    assert not any(p.requires_grad for p in module.alignment.parameters())


def test_robustness_terms_and_other_llm_negatives_train(tmp_path):
    """Paraphrase (a word-shuffling stub), random substitution and another LLM's text as negatives."""
    other = "{tiny: {family: llama, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, intermediate_size: 128}, seed: 3}"
    cli = cli_main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
                    "--model.init_args.detector_training.paraphraser=lit_align.metrics.ShuffleWordsParaphraser",
                    "--model.init_args.detector_training.substitution_ratio=0.2", f"--model.init_args.other_llm={{model: {other}}}"])
    module = cli.model
    assert module.other_llm is not None and not any(p.requires_grad for p in module.other_llm.parameters())
    assert module.step_count == 2 and math.isfinite(float(cli.trainer.callback_metrics["train/detector/loss"]))
    # the exported detector loads back as a detector checkpoint (and as the critic's start)
    export = tmp_path / "detector_export"
    assert (export / "head.safetensors").is_file() and not (export / "head.pt").exists()
    again = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'again'}", "--trainer.logger=false",
                      "--trainer.callbacks=[]", f"--model.init_args.detector_checkpoint={export}"], run=False).model
    again.configure_model()
    for key, value in module.detector.state_dict().items():
        torch.testing.assert_close(again.detector.state_dict()[key], value, msg=key)


def test_detector_with_another_tokenizer_is_refused(tmp_path):
    from lit_align.models import TINY_TOKENIZER, build_tokenizer
    from lit_align.models.spec import ModelSpec

    tok = build_tokenizer(ModelSpec(name_or_path=TINY_TOKENIZER))
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(tmp_path / "tok")
    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]", f"--model.init_args.detector.model.tokenizer={tmp_path / 'tok'}"], run=False)
    with pytest.raises(ConfigError, match="model.detector.model.tokenizer: the detector must be a causal LM sharing"):
        cli.model.configure_model()


def test_a_missing_or_bad_block_is_refused_naming_its_key(tmp_path, capsys):
    """One optimisation block per player (actor, critic, detector), and every block validated on construction;
    the message names the key (jsonargparse reports it as a parse error or wraps it in a ValueError)."""
    base = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            "--trainer.callbacks=[]"]
    for override, match in (
        ("--model.init_args.optimization={actor: {lr: 1.0e-3}}",
         "model.optimization: no block for model.optimization.critic, model.optimization.detector"),
        ("--model.init_args.detector_training.substitution_ratio=1.5",
         "model.detector_training.substitution_ratio must be in [0, 1)"),
        ("--model.init_args.rewards.lam=2", "model.rewards.lam must be in [0, 1]"),
        ("--model.init_args.other_llm={model: {tiny: {}}, weight: -1}", "model.other_llm.weight must be >= 0"),
        ("--model.init_args.sampling.do_sample=false", "model.sampling.do_sample must be true"),
    ):
        with pytest.raises((ValueError, SystemExit)) as raised:
            cli_main([*base, override], run=False)
        assert match in str(raised.value) + capsys.readouterr().err, override


def test_fsdp1_is_refused_at_setup(tmp_path):
    """FSDPStrategy (FSDP1, callbacks/fsdp.yaml) cannot hold three players with their own optimisers and
    backwards: setup refuses it with the presets that work (FSDP2, DDP)."""
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    module = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                       "--trainer.callbacks=[]"], run=False).model
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    module.trainer = trainer
    module.setup("fit")  # DDP, FSDP2 or one device: accepted
    trainer._accelerator_connector.strategy = FSDPStrategy()  # FSDPStrategy cannot be built on a CPU-only machine
    with pytest.raises(ConfigError, match=r"trainer.strategy: WatermarkModule does not run under FSDPStrategy.*fsdp2_cpu"):
        module.setup("fit")


def test_unequal_continuation_caps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="must be equal"):
        _fit(tmp_path, "--model.init_args.detector_training.human_from_reference=false", "--model.init_args.sampling.max_new_tokens=12")


def test_detector_reads_llm_and_human_text_re_encoded_alike(tmp_path):
    """Sampled ids go through text and back like human text, so non-canonical token sequences cannot
    separate the classes; with retokenize_text: false the ids are read as sampled. The final EOS is
    dropped (the reference reads the score before the first EOS), or kept with eos_action."""
    from lit_align.data.batches import SequenceBatch
    from lit_align.data.completion import retokenize

    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]"], run=False)
    module = cli.model
    module.configure_model()
    tok = module.tokenizer
    prompt = tok("The harbour town of")["input_ids"]
    odd = [tok.convert_tokens_to_ids(c) for c in ("h", "a", "r")]  # "har" spelled letter by letter
    rows = torch.tensor([prompt + odd + [tok.eos_token_id]])
    loss = torch.tensor([[0] * len(prompt) + [1] * (len(odd) + 1)])
    batch = SequenceBatch(rows, torch.ones_like(rows), loss, torch.tensor([0]))
    expected = prompt + retokenize(["har"], tok)[0]
    assert module._detector_view(batch).input_ids[0].tolist() == expected and expected != rows[0].tolist()[:-1]
    module.eos_action = True
    assert module._detector_view(batch).input_ids[0].tolist() == expected + [tok.eos_token_id]
    module.detector_training.retokenize_text = False
    assert module._detector_view(batch).input_ids.equal(rows)
    module.eos_action = False
    assert module._detector_view(batch).input_ids.equal(rows[:, :-1])


def test_actor_and_critic_schedules_step_once_per_co_training_step(tmp_path):
    sched = "{class_path: lit_align.schedulers.WarmupCosineLR, init_args: {total_steps: 4, warmup_steps: 1}}"
    cli = cli_main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
                    "--model.init_args.detector_training.pretrain_steps=1",
                    f"--model.init_args.optimization.actor.scheduler={sched}", f"--model.init_args.optimization.critic.scheduler={sched}"])
    actor_opt, critic_opt, detector_opt = cli.model.optimizers()
    # 2 co-training steps after 1 pretraining step: the schedules are at step 2 of 4 (warm-up 1, cosine: 0.75)
    assert actor_opt.param_groups[0]["lr"] == pytest.approx(0.75 * 3e-3)
    assert critic_opt.param_groups[0]["lr"] == pytest.approx(0.75 * 1e-3)
    assert detector_opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_human_text_gets_an_eos_where_the_llm_ended_with_one(tmp_path):
    """With eos_action (lit_align's earlier rule) the detector reads EOS, so a human continuation gets
    one where the LLM's ended with one; by default (the reference) no text it reads has an EOS."""
    from lit_align.data.batches import SequenceBatch

    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]"], run=False)
    module = cli.model
    module.configure_model()
    tok = module.tokenizer
    prompt, answer = tok("The harbour town of")["input_ids"], tok(" Nettleby is old")["input_ids"]
    rows = torch.tensor([prompt + answer, prompt + answer])
    loss = torch.tensor([[0] * len(prompt) + [1] * len(answer)] * 2)
    human = SequenceBatch(rows, torch.ones_like(rows), loss, torch.tensor([0, 1]))
    view = module._detector_view(human, add_eos=torch.tensor([True, False]))
    assert view.input_ids.equal(rows) and view.attention_mask.all()  # the reference: no EOS added
    module.eos_action = True
    view = module._detector_view(human, add_eos=torch.tensor([True, False]))
    assert view.input_ids[0, view.attention_mask[0].sum() - 1] == tok.eos_token_id
    assert view.input_ids[1, view.attention_mask[1].sum() - 1] != tok.eos_token_id


def test_every_player_can_carry_lora_adapters(tmp_path):
    """LoRA on the actor (the reference is then the actor with adapters off: no copy) and on the detector
    (the critic copies it, adapters included); only adapters train."""
    lora = "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"
    cli = cli_main(["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
                    "--trainer.check_val_every_n_epoch=1", "--model.init_args.export_detector=false",
                    f"--model.init_args.model.lora={lora}", f"--model.init_args.detector.model.lora={lora}"])
    module = cli.model
    assert module.reference.mode == "adapter" and module.reference.copy is None
    for player in (module.policy, module.detector.backbone, module.critic.backbone):
        trainable = [n for n, p in player.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
    assert module.step_count == 2 and "val/auroc" in cli.trainer.callback_metrics


def _configured(tmp_path, *extra: str):
    """The tiny config's module and data, built (no fit), and one training batch."""
    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]", *extra], run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.tokenizer = module.tokenizer
    data.setup("fit")
    return module, next(iter(data.train_dataloader()))


def test_other_llm_adds_a_pair_by_default_and_replaces_the_human_text_on_request(tmp_path):
    """other_llm_mode add (the reference code): human pair + 1.0 x (LLM text vs the other LLM's text);
    replace (lit_align's earlier rule): the other LLM's text is the main pair's negative, no extra pair."""
    other_spec = ("{tiny: {family: llama, hidden_size: 64, num_layers: 2, num_heads: 4, num_kv_heads: 2, "
                  "intermediate_size: 128}, seed: 3}")
    module, batch = _configured(tmp_path, f"--model.init_args.other_llm={{model: {other_spec}}}",
                                "--model.init_args.detector_training.human_from_reference=false", "--model.init_args.detector.head_init_std=0.5")
    assert module.other_llm_config.mode == "add" and module.other_llm_config.weight == 1.0
    rollout = module._generate(batch)
    keep = module._keep(rollout)
    human, other = module._human(batch), module._other_llm_text(batch)
    assert human is batch.human
    with torch.no_grad():
        s_w = module._detector_scores(as_batch(rollout).select(keep))
        s_h = module._detector_scores(batch.human.select(keep))
        s_o = module._detector_scores(other.select(keep))
        _, loss, metrics = module._detector_objective(rollout, human, other, keep)
        assert not torch.allclose(s_h, s_o)
        main, _ = detector_loss(s_w, s_h, reg=1e-4)
        pair = -torch.nn.functional.logsigmoid(s_w - s_o).mean()
        torch.testing.assert_close(loss, main + pair)
        torch.testing.assert_close(metrics["other_llm/loss"], pair)
        module.other_llm_config.mode = "replace"
        replaced = module._human(batch)
        assert replaced.input_ids.equal(other.input_ids)
        _, loss, metrics = module._detector_objective(rollout, replaced, None, keep)
        torch.testing.assert_close(loss, detector_loss(s_w, s_o, reg=1e-4)[0])
        assert "other_llm/loss" not in metrics


def test_the_critic_starts_stage_two_as_a_copy_of_the_pretrained_detector(tmp_path):
    """One run with 2 detector-pretraining steps: when step 3 (co-training) starts, the critic is set to
    the detector as stage 1 left it (the reference starts its value net from the pretrained detector),
    not to the untrained detector it was copied from at build time. critic_lr 0 keeps it there."""
    from lightning.pytorch import Callback

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.step_count == 2:
                self.detector = {k: v.clone() for k, v in module.detector.state_dict().items()}

    cli = cli_main(["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--trainer.max_epochs=1",
                    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=0",
                    "--trainer.enable_progress_bar=false", "--model.init_args.export_detector=false",
                    "--model.init_args.detector_training.pretrain_steps=2", "--model.init_args.optimization.critic.optimizer={class_path: torch.optim.SGD, init_args: {lr: 0.0}}"], run=False)
    snapshot = Snapshot()
    cli.trainer.callbacks.append(snapshot)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    assert module.step_count == 3 and snapshot.detector["head.weight"].abs().sum() > 0  # stage 1 trained it
    critic = module.critic.state_dict()
    assert set(critic) == set(snapshot.detector)
    for key, value in snapshot.detector.items():
        assert torch.equal(critic[key], value), key
    assert not torch.equal(module.detector.head.weight, critic["head.weight"])  # separate parameters


def test_detector_checkpoints_load_without_unpickling_code(tmp_path):
    """detector_checkpoint reads safetensors or torch.load(weights_only=True): a file whose pickle would run
    code is refused (the code does not run); a .safetensors state dict and an older export with head.pt load."""
    import os

    from safetensors.torch import save_file

    from lit_align.checkpoint import CheckpointReadError
    from lit_align.watermark.players import detector_state as _detector_state

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(tmp_path / "ran"),)

    module, _ = _configured(tmp_path / "m", "--model.init_args.detector.head_init_std=0.5")
    assert module.detector.head.bias is None and module.critic.head.bias is None  # the reference's v_head
    state = {f"detector.{k}": v.clone() for k, v in module.detector.state_dict().items()}
    torch.save({"state_dict": state, "extra": Payload()}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointReadError, match="weights_only=True"):
        _detector_state(str(tmp_path / "bad.ckpt"))
    assert not (tmp_path / "ran").exists()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "detector.safetensors"))
    loaded = _detector_state(str(tmp_path / "detector.safetensors"))
    assert set(loaded) == set(module.detector.state_dict())
    assert torch.equal(loaded["head.weight"], module.detector.head.weight)
    export = module.save_detector(tmp_path / "export")  # an older export: head.pt instead of head.safetensors
    torch.save(module.detector.head.state_dict(), export / "head.pt")
    (export / "head.safetensors").unlink()
    assert torch.equal(_detector_state(str(export))["head.weight"], module.detector.head.weight)
    (export / "head.pt").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        _detector_state(str(export))


def test_score_penalty_sits_on_the_main_pair_only_unless_detector_reg_extra(tmp_path):
    """The reference adds 1e-4 (s_w^2 + s_h^2) to the main pair's loss only; its substitution term is the
    bare pairwise loss. detector_reg_extra puts the penalty on that term too (reg 0.5 to make it visible)."""
    module, batch = _configured(tmp_path, "--model.init_args.detector_training.substitution_ratio=0.5",
                                "--model.init_args.detector_training.reg=0.5", "--model.init_args.detector.head_init_std=0.5")
    rollout = module._generate(batch)
    keep, human = module._keep(rollout), module._human(batch)
    with torch.no_grad():
        llm = module._detector_view(as_batch(rollout, batch.index).select(keep))
        s_w = module.detector.score(llm.input_ids, llm.attention_mask)
        s_h = module._detector_scores(human.select(keep))
        attacked = module._substituted(llm)  # each row from its own generator (the example's global index)
        assert (attacked != llm.input_ids).any() and attacked[~llm.loss_mask.bool()].equal(llm.input_ids[~llm.loss_mask.bool()])
        s_sub = module.detector.score(attacked, llm.attention_mask)
        main, _ = detector_loss(s_w, s_h, reg=0.5)
        bare = -torch.nn.functional.logsigmoid(s_sub - s_h).mean()
        _, loss, _ = module._detector_objective(rollout, human, None, keep, batch.index)
        torch.testing.assert_close(loss, main + bare)
        module.detector_training.reg_extra = True
        _, loss, _ = module._detector_objective(rollout, human, None, keep, batch.index)
        torch.testing.assert_close(loss, main + bare + 0.5 * (s_sub**2 + s_h**2).mean())


def test_a_final_eos_is_not_an_action_unless_eos_action(tmp_path):
    """Rows [a, b, EOS], [a, EOS] and [a, b]: by default (the reference) the EOS is no action, so [a, EOS]
    has one token and is dropped; with eos_action it counts and the row is kept."""
    from lit_align.rollout.sampler import Rollout

    module, _ = _configured(tmp_path)
    eos, pad = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id
    a, b = module.tokenizer(" the harbour")["input_ids"][:2]
    rollout = Rollout(torch.tensor([[a], [a], [a]]), torch.ones(3, 1, dtype=torch.long),
                      torch.tensor([[a, b, eos], [a, eos, pad], [a, b, pad]]),
                      torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0]]), torch.zeros(3, 3))
    assert module._keep(rollout).tolist() == [True, False, True]
    module.eos_action = True
    assert module._keep(rollout).tolist() == [True, True, True]
