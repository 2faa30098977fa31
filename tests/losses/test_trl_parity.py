"""``dpo_loss`` on ``sequence_logps`` reproduces TRL's ``DPOTrainer`` sigmoid loss on the same model and batch.

TRL tokenizes prompt / chosen / rejected (adding EOS to the completions), right-pads
``[prompt; chosen]`` and ``[prompt; rejected]`` into one batch and scores the completion tokens with
its fused LM head. We take the exact token ids TRL produced, re-pad them **on the left** with our own
masks (so padding handling is exercised too), score them with ``sequence_logps`` and feed
``dpo_loss``. Loss, gradients and the logged metrics must agree.
"""

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_lm
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from lit_align.losses import dpo_loss
from lit_align.rollout.logps import sequence_logps

BETA = 0.1
METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]
WORDS = "the a cat dog sat ran on mat log is red blue what color sky grass green yes no".split()
PAIRS = [
    {"prompt": "what color is the sky", "chosen": " blue", "rejected": " green"},
    {"prompt": "the cat sat on the", "chosen": " mat", "rejected": " dog ran"},
    {"prompt": "is grass green", "chosen": " yes", "rejected": " no the sky is red"},
    {"prompt": "what sat on the log", "chosen": " a red dog", "rejected": " the cat"},
]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _models(vocab_size: int):
    ref = tiny_lm("qwen2", vocab_size=vocab_size, hidden_size=32, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                  tie_word_embeddings=False)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # a few noise steps so that policy != reference and the loss is not log 2
        for _ in range(3):
            for p in policy.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return policy.eval(), ref


def _left_padded(rows: list[dict], completion: str, pad_id: int):
    """(B, T) input_ids / attention_mask / loss_mask of ``prompt_ids + {completion}_ids``, left-padded."""
    seqs = [r["prompt_ids"] + r[f"{completion}_ids"] for r in rows]
    T = max(map(len, seqs))
    ids = torch.full((len(rows), T), pad_id)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (r, s) in enumerate(zip(rows, seqs)):
        ids[b, T - len(s) :] = torch.tensor(s)
        attn[b, T - len(s) :] = 1
        loss_mask[b, T - len(r[f"{completion}_ids"]) :] = 1
    return ids, attn, loss_mask


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL sets transformers' deprecated `gradient_checkpointing`
def test_dpo_loss_matches_trl_dpo_trainer(tmp_path):
    tokenizer = _tokenizer()
    policy, ref = _models(len(tokenizer))
    dataset = Dataset.from_list(PAIRS)
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        beta=BETA,
        loss_type="sigmoid",
        max_length=128,  # far above the longest sequence (9 tokens): nothing is truncated
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        per_device_eval_batch_size=len(PAIRS),
        disable_tqdm=True,
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            eval_dataset=dataset,
            processing_class=tokenizer,
        )

    # TRL's collated batch, in dataset order (the eval loader is sequential): [chosen rows; rejected rows]
    batch = next(iter(trainer.get_eval_dataloader()))
    rows = [trainer.eval_dataset[i] for i in range(len(PAIRS))]
    n = len(rows)
    eos = tokenizer.eos_token_id
    assert all(r["chosen_ids"][-1] == eos and r["rejected_ids"][-1] == eos for r in rows)  # not truncated
    for b, r in enumerate(rows):  # the ids we re-pad are exactly those TRL scored
        for half, completion in ((0, "chosen"), (1, "rejected")):
            seq = r["prompt_ids"] + r[f"{completion}_ids"]
            trl_row = batch["input_ids"][half * n + b]
            assert trl_row[: len(seq)].tolist() == seq
            assert batch["completion_mask"][half * n + b].sum().item() == len(r[f"{completion}_ids"])

    # TRL: loss (with gradient) through the public compute_loss, metrics from its log buffer
    trainer._metrics["eval"].clear()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    policy.zero_grad(set_to_none=True)

    # lit_align: same ids, left-padded, sequence_logps + dpo_loss
    chosen = _left_padded(rows, "chosen", tokenizer.pad_token_id)
    rejected = _left_padded(rows, "rejected", tokenizer.pad_token_id)
    pc, pr = sequence_logps(policy, *chosen), sequence_logps(policy, *rejected)
    with torch.no_grad():
        rc, rr = sequence_logps(ref, *chosen), sequence_logps(ref, *rejected)
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=BETA)
    loss.backward()

    assert abs(loss.item() - math.log(2)) > 1e-2, "perturbation too small: the test would be trivial"
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    for key in METRICS:
        assert metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-5), key

    # and the same number through TRL's evaluation loop
    policy.zero_grad(set_to_none=True)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(loss.item(), abs=1e-5)
