"""Greedy Coordinate Gradient (GCG): the discrete adversarial-suffix attack of Zou et al. 2023.

Paper: Zou, Wang, Carlini, Nasr, Kolter, Fredrikson, "Universal and Transferable Adversarial Attacks on
Aligned Language Models", arXiv:2307.15043, Algorithm 1 (one prompt, one model). The attacked sequence is

    before_ids + suffix (L tokens) + after_ids + target_ids

e.g. ``"<|user|>\\n{behaviour}" + suffix + "<|end|>\\n<|assistant|>\\n" + "Sure, here is"``
(:func:`split_template` makes ``before_ids``/``after_ids``). The attack minimises the target's mean
cross-entropy ``A(suffix)`` over the L suffix tokens. Each step:

1. **Token gradient.** The suffix as a one-hot matrix X (L, V) with ``requires_grad``; its embeddings
   ``X @ E`` replace the suffix's in one forward of the whole sequence, E (V, H) being what the model's
   input-embedding module gives each token id (its weight; times Gemma-3's embedding scale; with a LoRA
   adapter on the embedding), made once per attack; ``torch.autograd.grad(A, X)`` gives (L, V). The
   model's parameters are never written and their ``.grad`` stays as it was. A warning is given if this
   path's loss disagrees with the model's own forward on the same tokens.
2. **Top-k.** Per suffix position, the ``topk`` allowed tokens with the largest ``-grad`` (the linearised
   loss decrease of swapping that token in).
3. **Candidates.** ``search_width`` copies of the suffix, each with ONE uniformly drawn position set to a
   uniformly drawn token of that position's top-k (a seeded :class:`torch.Generator`). Unless
   ``allow_special``, candidates whose decoded text does not re-tokenise to the same ids are dropped (the
   standard GCG filter; it drops nothing when the tokenizer's round trip is exact).
4. **Score and keep.** Every remaining candidate's loss, in batched forwards without gradient; the
   candidate with the lowest loss becomes the suffix, **even when it is worse than the current one** (the
   paper's Algorithm 1 keeps the step's best candidate; it never compares it with the current suffix).

The best suffix over all steps is returned: the lowest-loss suffix among those that make the target the
model's greedy continuation, else the lowest-loss suffix overall (every scored candidate counts, not only
the kept ones). With ``early_stop`` the attack stops once the best suffix makes the target greedy.

Cost accounting (:class:`GCGResult`): one forward for the initial suffix, then per step one forward and
one backward for the token gradient and one forward per scored candidate, so with nothing filtered
``forward_passes == 1 + steps * (1 + search_width)`` and ``backward_passes == steps``.

The model is put in eval mode (no dropout) for the attack and every module's mode is restored after.
Not a copy of ``nanogcg`` (whose 0.3.0 pins ``transformers<=4.47.1``): the buffer of several best
suffixes, probe sampling and multi-token swaps of that package are not here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_align.errors import ConfigError, DataError, check_int, require
from lit_align.modes import eval_mode
from lit_align.rollout.logit_transforms import logit_transform
from lit_align.rollout.logps import (
    causal_lm_parts,
    position_ids_from_mask,
    run_gathered,
    token_stats,
    unwrap_causal_lm,
)

__all__ = ["GCG", "GCGResult", "SUFFIX_PLACEHOLDER", "allowed_tokens", "split_template"]

#: Marks the suffix slot while a chat template is rendered; :func:`split_template` splits the text there.
SUFFIX_PLACEHOLDER = "\u2063GCG_SUFFIX_SLOT\u2063"


@dataclass
class GCGResult:
    """What one GCG run found and what it cost."""

    suffix_ids: list[int]
    """The best suffix (see the module docstring for "best"), ``suffix_length`` token ids."""
    loss: float
    """Mean target cross-entropy (nats per target token) with :attr:`suffix_ids`."""
    losses: list[float]
    """Per step, the loss of the suffix kept at that step (``len(losses) == steps``)."""
    steps: int
    """Optimisation steps run (fewer than ``num_steps`` after an early stop)."""
    forward_passes: int
    """Sequence forwards: the initial suffix, one per step for the gradient, one per scored candidate."""
    backward_passes: int
    """Backward passes: one per step (the token gradient)."""
    success: bool
    """Whether the target is the model's greedy continuation after ``before + suffix_ids + after``."""


@dataclass
class GCG:
    """Greedy Coordinate Gradient suffix attack (arXiv:2307.15043, Algorithm 1); see the module docstring.

    Example::

        before, after = split_template(tokenizer, "Tell me how to pick a lock", chat_template=True)
        target = tokenizer("Sure, here is how", add_special_tokens=False)["input_ids"]
        result = GCG(num_steps=100, search_width=256)(model, tokenizer, before, after, target)
    """

    num_steps: int = 250
    """Optimisation steps at most (HarmBench / nanogcg-like defaults; tiny configs use far fewer)."""
    suffix_length: int = 20
    """Tokens of the adversarial suffix."""
    search_width: int = 512
    """Candidates per step, each the current suffix with ONE token swapped."""
    topk: int = 256
    """Per suffix position, the number of tokens with the largest negative one-hot gradient that candidates
    draw from; at most the number of allowed tokens (checked when the attack runs)."""
    init_token: str = " !"
    """The suffix starts as the first token id of this text, repeated ``suffix_length`` times."""
    early_stop: bool = True
    """Stop once the best suffix makes the target the model's greedy continuation."""
    allow_special: bool = False
    """Propose any token of the tokenizer. False: never special tokens, tokens whose text is not printable
    ASCII, or candidates whose decoded text does not re-tokenise to the same ids."""
    candidate_batch: int | None = None
    """Candidates scored per forward (memory only, never values); None: all of a step's at once."""
    seed: int = 0
    """Seed of the candidate draws: the same seed, model and inputs give the same suffix."""
    key: str = field(default="gcg", repr=False)
    """The config key this attack is set under, named in its errors (e.g. ``callbacks.0.init_args.gcg``)."""
    _allowed: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_steps", "suffix_length", "search_width", "topk"):
            check_int(f"{self.key}.{name}", getattr(self, name))
        check_int(f"{self.key}.candidate_batch", self.candidate_batch, optional=True)
        check_int(f"{self.key}.seed", self.seed, low=0)
        require(isinstance(self.init_token, str) and self.init_token != "", f"{self.key}.init_token",
                "a non-empty string", self.init_token)
        for name in ("early_stop", "allow_special"):
            require(isinstance(getattr(self, name), bool), f"{self.key}.{name}", "true or false", getattr(self, name))

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, before_ids: Sequence[int],
                 after_ids: Sequence[int], target_ids: Sequence[int]) -> GCGResult:
        """Attack ``model`` so that ``target_ids`` follows ``before_ids + suffix + after_ids``.

        Args:
            model: HF causal LM, optionally PEFT-wrapped; its parameters are only read.
            tokenizer: the model's tokenizer (allowed tokens, the initial suffix, the re-tokenisation filter).
            before_ids: prompt tokens before the suffix slot (BOS, template, behaviour).
            after_ids: tokens between the suffix and the target (end of turn, assistant header); may be empty.
            target_ids: the continuation to elicit (e.g. "Sure, here is ..."); non-empty.
        """
        weight = unwrap_causal_lm(model).get_input_embeddings().weight  # (V, H)
        vocab = weight.shape[0]
        _check_ids(self.key, vocab, before_ids=before_ids, after_ids=after_ids, target_ids=target_ids)
        allowed = self._allowed_tokens(tokenizer, vocab)  # (V,) bool
        require(self.topk <= int(allowed.sum()), f"{self.key}.topk",
                f"at most the {int(allowed.sum())} tokens a candidate may use (vocabulary {vocab}"
                f"{'' if self.allow_special else ', without special, non-ASCII and unprintable tokens'})", self.topk)
        device = weight.device
        parts = [torch.tensor(list(ids), dtype=torch.long, device=device) for ids in (before_ids, after_ids, target_ids)]
        suffix = torch.full((self.suffix_length,), _first_token(tokenizer, self.init_token, f"{self.key}.init_token"),
                            dtype=torch.long, device=device)
        generator = torch.Generator().manual_seed(self.seed)
        with eval_mode(model):
            return self._optimise(model, tokenizer, suffix, *parts, allowed.to(device), generator)

    def _allowed_tokens(self, tokenizer: PreTrainedTokenizerBase, vocab: int) -> Tensor:
        """:func:`allowed_tokens`, kept for the next call with the same tokenizer (decoding a large vocabulary
        token by token takes a while, and an evaluation attacks many behaviours)."""
        cached = self._allowed
        if cached is None or cached[0] is not tokenizer or cached[1:3] != (vocab, self.allow_special):
            cached = (tokenizer, vocab, self.allow_special, allowed_tokens(tokenizer, vocab,
                                                                          allow_special=self.allow_special))
            self._allowed = cached
        return cached[3]

    def _optimise(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, suffix: Tensor,
                  before: Tensor, after: Tensor, target: Tensor, allowed: Tensor, generator: torch.Generator
                  ) -> GCGResult:
        """Algorithm 1's loop from ``suffix`` (L,); the inputs checked and on the model's device."""
        init_loss, init_greedy = _candidate_losses(model, before, suffix[None], after, target, self.candidate_batch)
        current = float(init_loss[0])
        table = None  # (V, H) made at the first step: an attack stopped at its initial suffix needs none
        best = _Best(suffix, current, bool(init_greedy[0]))
        forwards, losses = 1, []
        for _ in range(self.num_steps):
            if self.early_stop and best.greedy:
                break
            table = _embedding_table(model) if table is None else table
            grad, loss = _token_gradient(model, table, before, suffix, after, target)  # (L, V)
            _check_same_loss(model, loss, current)
            candidates = _sample_candidates(suffix, grad, allowed, self.topk, self.search_width, generator)  # (B, L)
            if not self.allow_special:
                candidates = candidates[_retokenises(tokenizer, candidates)]
            if candidates.shape[0] == 0:
                raise ConfigError(
                    f"{self.key}: every candidate of step {len(losses) + 1} was dropped because its text does not "
                    f"re-tokenise to the same ids; choose another {self.key}.init_token (one whose repeats stay "
                    f"separate tokens), raise {self.key}.search_width, or set {self.key}.allow_special to true")
            cand_loss, cand_greedy = _candidate_losses(model, before, candidates, after, target, self.candidate_batch)
            forwards += 1 + candidates.shape[0]
            kept = int(cand_loss.argmin())
            suffix = candidates[kept]  # the step's best candidate, even if worse than the current suffix
            current = float(cand_loss[kept])
            losses.append(current)
            best.update(candidates, cand_loss, cand_greedy)
        return GCGResult(suffix_ids=best.suffix.tolist(), loss=best.loss, losses=losses, steps=len(losses),
                         forward_passes=forwards, backward_passes=len(losses), success=best.greedy)


@dataclass
class _Best:
    """The best suffix seen: greedy-successful ones beat the others, then the lower loss wins."""

    suffix: Tensor
    loss: float
    greedy: bool

    def update(self, candidates: Tensor, loss: Tensor, greedy: Tensor) -> None:
        """Consider every scored candidate: (B, L) ids, (B,) losses, (B,) greedy flags."""
        pool = greedy if bool(greedy.any()) else torch.ones_like(greedy)
        i = int(torch.where(pool, loss, torch.inf).argmin())
        if (bool(greedy[i]), -float(loss[i])) > (self.greedy, -self.loss):
            self.suffix, self.loss, self.greedy = candidates[i].clone(), float(loss[i]), bool(greedy[i])


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int, *, allow_special: bool = False) -> Tensor:
    """(V,) bool: the token ids a GCG candidate may use.

    Never ids beyond the tokenizer (padding rows of a larger embedding). Unless ``allow_special``, also
    never special tokens (BOS, EOS, pad, chat markers) nor tokens whose decoded text is empty, not ASCII or
    not printable (byte fragments of multi-byte characters, control characters).
    """
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    known = min(vocab_size, len(tokenizer))
    allowed[:known] = True
    if allow_special:
        return allowed
    allowed[[i for i in tokenizer.all_special_ids if i < vocab_size]] = False
    texts = tokenizer.batch_decode([[i] for i in range(known)])
    printable = torch.tensor([t != "" and t.isascii() and t.isprintable() for t in texts], dtype=torch.bool)
    allowed[:known] &= printable
    return allowed


def split_template(tokenizer: PreTrainedTokenizerBase, behaviour: str, *, chat_template: bool,
                   template: str | None = None) -> tuple[list[int], list[int]]:
    """``(before_ids, after_ids)`` around the suffix slot at the end of the user message.

    With ``chat_template`` the tokenizer's chat template renders one user turn ``behaviour + slot`` and the
    generation prompt, tokenised without adding special tokens (as :func:`lit_align.data.tokenize.encode_prompt`
    does: the template writes its own BOS). Otherwise ``template`` is a ``str.format`` template with
    ``{prompt}`` (e.g. ``"Human: {prompt}\\nAI:"``; ``None`` is ``"{prompt}"``) and ``before_ids`` starts with the
    tokenizer's BOS when it adds one to plain text. The two sides are tokenised separately, as GCG always does:
    a merge across the slot's borders is not reproduced.
    """
    slotted = behaviour + SUFFIX_PLACEHOLDER
    if chat_template:
        if template is not None:
            raise ConfigError("split_template: give either chat_template=True or a str.format template, not both")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"split_template: the tokenizer {tokenizer.name_or_path!r} has no chat template; pass "
                              "chat_template=False and a str.format template with {prompt}")
        text = tokenizer.apply_chat_template([{"role": "user", "content": slotted}], add_generation_prompt=True,
                                             tokenize=False)
        where, bos = f"the chat template of {tokenizer.name_or_path!r}", []
    else:
        template = "{prompt}" if template is None else template
        text = _format(template, slotted)
        where, bos = f"the template {template!r}", _bos_prefix(tokenizer)
    if text.count(SUFFIX_PLACEHOLDER) != 1:
        raise ConfigError(f"split_template: {where} does not keep the user message whole (the suffix slot appears "
                          f"{text.count(SUFFIX_PLACEHOLDER)} times, not once); use a template that writes the "
                          "message unchanged, e.g. '{prompt}' in a str.format template")
    before, after = text.split(SUFFIX_PLACEHOLDER)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return bos + encode(before), encode(after)


def _format(template: str, prompt: str) -> str:
    """``template.format(prompt=prompt)``, or a ConfigError naming the template."""
    if "{prompt}" not in template:
        raise ConfigError(f"split_template: the template {template!r} has no {{prompt}} placeholder for the "
                          "behaviour and the suffix; write one, e.g. 'Human: {prompt}\\nAI:'")
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"split_template: the template {template!r} is not a str.format template with only "
                          f"{{prompt}} ({err!r}); double literal braces as '{{{{' and '}}}}'") from err


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` when the tokenizer puts a BOS before plain text, else ``[]``."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids and ids[0] == bos else []


def _first_token(tokenizer: PreTrainedTokenizerBase, text: str, key: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    require(bool(ids), key, "a text the tokenizer turns into at least one token", text)
    return ids[0]


def _check_ids(key: str, vocab: int, **named: Sequence[int]) -> None:
    """Token-id lists in range; the target non-empty."""
    if not named["target_ids"]:
        raise DataError(f"{key}: target_ids is empty; give the token ids of the target to elicit, e.g. "
                        "tokenizer('Sure, here is', add_special_tokens=False)['input_ids']")
    for name, ids in named.items():
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < vocab)]
        if bad:
            raise DataError(f"{key}: {name} holds {bad[:5]}, not token ids of the model's vocabulary of {vocab}")


def _embedding_table(model: nn.Module) -> Tensor:
    """(V, H) what the model's input-embedding module gives each token id: its weight, times Gemma-3's scale,
    plus a LoRA adapter on the embedding, ... Made outside ``inference_mode`` so autograd may use it; under FSDP2
    with the root's weights gathered (:func:`~lit_align.rollout.logps.run_gathered`)."""
    return run_gathered(unwrap_causal_lm(model), _table)


def _table(base: nn.Module) -> Tensor:
    embed = base.get_input_embeddings()
    vocab = embed.num_embeddings if hasattr(embed, "num_embeddings") else embed.weight.shape[0]
    with torch.inference_mode(False), torch.no_grad():
        return embed(torch.arange(vocab, device=next(base.parameters()).device)).detach()


def _token_gradient(model: nn.Module, table: Tensor, before: Tensor, suffix: Tensor, after: Tensor, target: Tensor
                    ) -> tuple[Tensor, float]:
    """(L, V) gradient of the target's mean cross-entropy w.r.t. the suffix's one-hot matrix, and that loss.

    Tokens are embedded as rows of ``table`` (:func:`_embedding_table`), the suffix as ``one_hot @ table``.
    Only the one-hot gets a gradient (``torch.autograd.grad``): the parameters' ``.grad`` is not touched.
    Runs with autograd on even inside ``torch.no_grad`` or ``torch.inference_mode`` (Lightning's validation
    and test loops).
    """
    return run_gathered(unwrap_causal_lm(model), _gradient, table, before, suffix, after, target)


def _gradient(base: nn.Module, table: Tensor, before: Tensor, suffix: Tensor, after: Tensor, target: Tensor
              ) -> tuple[Tensor, float]:
    """:func:`_token_gradient` on an unwrapped causal LM (its root weights gathered under FSDP2)."""
    decoder, head = causal_lm_parts(base)
    with torch.inference_mode(False), torch.enable_grad():
        one_hot = F.one_hot(suffix.clone(), table.shape[0]).to(table.dtype).requires_grad_()  # (L, V)
        fixed = table[torch.cat([before, after, target]).clone()]  # (P + A + T, H)
        n_before = before.shape[0]
        embeds = torch.cat([fixed[:n_before], one_hot @ table, fixed[n_before:]])[None]  # (1, S, H)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # (1, S)
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         use_cache=False).last_hidden_state  # (1, S, H)
        n_target = target.shape[0]
        logits = head(hidden[0, -n_target - 1 : -1]).float()  # (T, V): position t predicts token t + 1
        transform = logit_transform(base)
        if transform is not None:
            logits = transform(logits)
        loss = F.cross_entropy(logits, target.clone())
        (grad,) = torch.autograd.grad(loss, one_hot)
    return grad, float(loss.detach())


def _check_same_loss(model: nn.Module, gradient_loss: float, scored_loss: float) -> None:
    """Warn when the one-hot embedding path and the token-id path disagree on the current suffix's loss: the
    model's input embedding is more than a per-token lookup, and the gradient is off."""
    if abs(gradient_loss - scored_loss) > 0.05 * max(1.0, abs(scored_loss)):
        warnings.warn(f"GCG: the one-hot embedding path gives the target loss {gradient_loss:.4f} where the model's "
                      f"own forward gives {scored_loss:.4f} ({type(unwrap_causal_lm(model)).__name__}); its input "
                      "embedding is more than a lookup, so the token gradient may point the wrong way", stacklevel=3)


def _sample_candidates(suffix: Tensor, grad: Tensor, allowed: Tensor, topk: int, width: int,
                       generator: torch.Generator) -> Tensor:
    """(B, L) candidates: B = ``width`` copies of ``suffix`` (L,), each with one uniformly drawn position set
    to a uniformly drawn token among that position's ``topk`` allowed tokens of largest ``-grad`` (L, V)."""
    scores = (-grad).masked_fill(~allowed, -torch.inf)  # (L, V)
    top = scores.topk(topk, dim=-1).indices.cpu()  # (L, k)
    length = suffix.shape[0]
    position = torch.randint(length, (width,), generator=generator)  # (B,)
    choice = torch.randint(topk, (width,), generator=generator)  # (B,)
    candidates = suffix.cpu().repeat(width, 1)  # (B, L)
    candidates[torch.arange(width), position] = top[position, choice]
    return candidates.to(suffix.device)


def _retokenises(tokenizer: PreTrainedTokenizerBase, candidates: Tensor) -> Tensor:
    """(B,) bool: the candidate's decoded text tokenises back to the same ids."""
    texts = tokenizer.batch_decode(candidates.tolist())
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = candidates.tolist()
    return torch.tensor([ids == row for ids, row in zip(again, rows, strict=True)], dtype=torch.bool,
                        device=candidates.device)


def _candidate_losses(model: nn.Module, before: Tensor, candidates: Tensor, after: Tensor, target: Tensor,
                      batch: int | None) -> tuple[Tensor, Tensor]:
    """Mean target cross-entropy (B,) and whether the target is the greedy continuation (B,) bool, for each
    candidate suffix of (B, L), in forwards of at most ``batch`` candidates, without gradient."""
    n = candidates.shape[0]
    step = batch or n
    losses, greedy = [], []
    with torch.no_grad():
        for start in range(0, n, step):
            chunk = candidates[start : start + step]  # (b, L)
            b = chunk.shape[0]
            ids = torch.cat([before.expand(b, -1), chunk, after.expand(b, -1), target.expand(b, -1)], dim=1)  # (b, S)
            mask = torch.ones_like(ids)
            loss_mask = torch.zeros_like(ids)
            loss_mask[:, -target.shape[0] :] = 1
            stats = token_stats(model, ids, mask, loss_mask, correct=True)
            scored = stats.mask.bool()  # (b, S)
            losses.append(-(stats.logps * stats.mask).sum(-1) / stats.mask.sum(-1))  # (b,)
            greedy.append((stats.correct | ~scored).all(-1))  # (b,)
    return torch.cat(losses), torch.cat(greedy)
