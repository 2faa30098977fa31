"""The engine over two gloo ranks equals one process on the global batch: global whitening, the PPO update
with globally normalised token means and a shared early-stop decision, gradient averaging with missing
gradients, and keep_shape experience; plus the per-player optimisation blocks."""

from __future__ import annotations

import copy
import functools

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import gloo_group, tiny_actor_critic
from torch import Tensor, nn

from lit_align.engine import (
    Optimization,
    Player,
    PPOConfig,
    configure_players,
    overlapped_steps,
    ppo_update,
    resolve_optimization,
)
from lit_align.engine.distributed import (
    all_gather_objects,
    any_rank,
    average_gradients,
    check_divides,
    global_share,
    means_over_ranks,
    rank_and_world,
    sums_over_ranks,
)
from lit_align.errors import ConfigError
from lit_align.losses.ppo import whiten
from lit_align.rollout.experience import make_experience
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

VOCAB, PAD = 128, 0
STOPS = list(range(1, VOCAB, 4))  # a quarter of the vocabulary ends a response: lengths vary, some rows are short
PROMPTS = [[5, 17, 31, 44], [88, 23, 7], [40, 19], [3, 15, 99, 25]]
SCORES = torch.tensor([1.0, -0.5, 0.3, 2.0])


def _rollout(actor, rows):
    """Rows ``rows`` of the global batch; each row's sample comes from its own generator, so the same on
    any rank."""
    ids, mask = left_pad([PROMPTS[i] for i in rows], PAD)
    return sample(actor, ids, mask, SamplingConfig(max_new_tokens=6, do_sample=True), eos_token_id=STOPS,
                  pad_token_id=PAD, generator=[torch.Generator().manual_seed(100 + i) for i in rows])


def _update(rows, config, keep_shape):
    """Experience over ``rows`` and one PPO update with SGD; the trained weights (as a flat vector)."""
    torch.manual_seed(0)
    actor, critic = tiny_actor_critic(VOCAB)
    rollout = _rollout(actor, rows)
    exp = make_experience(actor, copy.deepcopy(actor), critic, rollout, SCORES[rows], kl_coef=0.05,
                          whiten_advantages=True, keep_shape=keep_shape,
                          min_response_tokens=3,  # drops the short rows
                          reduce=_sum if dist.is_initialized() else None)
    policy, value = actor.train(), critic
    opts = {"policy": torch.optim.SGD(policy.parameters(), lr=0.5), "value": torch.optim.SGD(value.parameters(), lr=0.5)}

    def step(name, loss):
        opt = opts[name]
        opt.zero_grad()
        loss.backward()
        average_gradients(p for g in opt.param_groups for p in g["params"])
        opt.step()

    metrics = ppo_update(policy, value, exp, config, step_policy=lambda loss: step("policy", loss),
                         step_critic=lambda loss: step("value", loss))
    flat = torch.cat([p.detach().reshape(-1) for p in [*policy.parameters(), *value.parameters()]])
    return flat, metrics, exp


def _sum(t):
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def _worker(rank: int, world: int, init: str, out: str) -> None:
    with gloo_group(rank, world, init):
        results = {}
        # whitening with global moments equals whitening the concatenated batch
        x = torch.arange(12.0).reshape(4, 3) * (rank + 1)
        m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]) if rank == 0 else torch.ones(4, 3)
        results["whiten"] = whiten(x, m, reduce=_sum)
        results["x"], results["m"] = x, m
        # gradient averaging: a parameter with no gradient on one rank counts as zeros there
        p = nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), 2.0) if rank == 0 else None
        average_gradients([p])
        results["avg"] = p.grad.clone()
        results["share"] = global_share(torch.tensor(3.0 if rank == 0 else 1.0))
        results["any"] = any_rank(rank == 1)
        # several tensors in one collective: counts, a float32 vector, means; a share from a reduced total
        calls, all_reduce = [], dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), all_reduce(*a, **k))[1]
        try:
            count, vector = sums_over_ranks(torch.tensor(rank + 2), torch.tensor([0.25, 1.0 + rank]))
            means = means_over_ranks({"a": (torch.tensor([1.0, 3.0]) * (rank + 1), torch.tensor([1.0, float(rank)])),
                                      "none": (torch.ones(2), torch.zeros(2))})
            share = global_share(torch.tensor(3.0 if rank == 0 else 1.0), total=torch.tensor(4.0))
        finally:
            dist.all_reduce = all_reduce
        results["sums"] = {"count": count, "vector": vector, "means": means, "share": share, "calls": len(calls)}
        results["gather"] = all_gather_objects({"rank": rank})
        try:
            check_divides(3, "data.batch_size")
        except ConfigError as err:
            results["divides"] = str(err)
        rows = [0, 2] if rank == 0 else [1, 3]  # the sharded sampler's rank-interleaved shards
        config = PPOConfig(epochs=2, clip=0.2, value_clip=0.2, target_kl=0.05)
        results["ppo"] = _update(rows, config, keep_shape=True)[:2]
        try:  # experience of unequal lengths (2 rows and 1): every rank raises in the first share's collective
            _update(rows if rank == 0 else rows[:1], PPOConfig(), keep_shape=True)
        except RuntimeError as err:
            results["rows"] = str(err)
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, f"file://{out}/init", str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_global_whitening_equals_whitening_the_concatenated_batch(two_ranks):
    x = torch.cat([r["x"] for r in two_ranks])
    m = torch.cat([r["m"] for r in two_ranks])
    expected = whiten(x, m)
    torch.testing.assert_close(torch.cat([r["whiten"] for r in two_ranks]), expected)
    assert not torch.allclose(two_ranks[0]["whiten"], whiten(two_ranks[0]["x"], two_ranks[0]["m"]))  # not local


def test_collectives_average_share_and_agree(two_ranks):
    for r in two_ranks:
        torch.testing.assert_close(r["avg"], torch.ones(3))  # (2 + 0) / 2: the missing gradient counted as zeros
        assert r["any"] is True and r["gather"] == [{"rank": 0}, {"rank": 1}]
        assert "data.batch_size=3 is not divisible by the world size 2" in r["divides"]
    # shares of 3 and 1 tokens: 2 * 3/4 and 2 * 1/4, summing to the world size
    torch.testing.assert_close([r["share"].item() for r in two_ranks], [1.5, 0.5])
    assert rank_and_world() == (0, 1) and global_share(torch.tensor(5.0)).item() == 1.0


def test_several_sums_and_means_go_in_one_collective(two_ranks):
    """Counts 2 + 3 = 5 (int64 kept); vectors [0.25, 1] + [0.25, 2]; mean "a": rank 0 has 1 x weight 1 (and 3 x
    weight 0), rank 1 has 2 x 1 and 6 x 1, so (1 + 2 + 6) / 3 = 3; "none" has no weight: 0. The share of 3 of
    the 4 items: 2 * 3/4. Two all-reduces in all (the sums, then the means), none for the share."""
    for rank, r in enumerate(two_ranks):
        sums = r["sums"]
        assert sums["count"].dtype == torch.int64 and sums["count"].item() == 5
        assert sums["vector"].dtype == torch.float32 and sums["vector"].tolist() == [0.5, 3.0]
        assert sums["means"]["a"].item() == pytest.approx(3.0) and sums["means"]["none"].item() == 0.0
        assert sums["share"].item() == pytest.approx(1.5 if rank == 0 else 0.5)
        assert sums["calls"] == 2


def test_ppo_on_two_ranks_equals_one_process_on_the_global_batch(two_ranks):
    """Uneven action tokens and dropped rows between the ranks, whitening, two epochs and a KL early stop:
    the same weights and epochs."""
    one, metrics, exp = _update([0, 2, 1, 3], PPOConfig(epochs=2, clip=0.2, value_clip=0.2, target_kl=0.05),
                                keep_shape=False)
    (w0, m0), (w1, m1) = (r["ppo"] for r in two_ranks)
    assert exp.num_dropped >= 1, "no row was dropped: the test would not exercise keep_shape"
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)  # every rank took the same steps
    torch.testing.assert_close(w0, one, rtol=1e-5, atol=1e-6)
    assert m0["epochs"].item() == m1["epochs"].item() == metrics["epochs"].item()


def test_unequal_experience_rows_raise_on_every_rank(two_ranks):
    for r in two_ranks:
        assert "the ranks hold [2, 1] experience rows" in r["rows"] and "keep_shape=True" in r["rows"]


def test_keep_shape_keeps_rows_without_changing_the_update():
    kept_rows, _, kept = _update([0, 1, 2, 3], PPOConfig(), keep_shape=True)
    removed_rows, _, removed = _update([0, 1, 2, 3], PPOConfig(), keep_shape=False)
    assert len(kept) == 4 and len(removed) == 4 - removed.num_dropped < 4
    assert kept.num_dropped == removed.num_dropped
    torch.testing.assert_close(kept_rows, removed_rows, rtol=1e-5, atol=1e-6)
    for key in ("kl", "score", "reward", "response_length"):
        torch.testing.assert_close(kept.metrics[key], removed.metrics[key])


# -- per-player optimisation ----------------------------------------------------------------------
def test_missing_or_unknown_player_blocks_name_the_key():
    defaults = {"defender": Optimization(lr=1e-5), "attacker": Optimization(lr=3e-6)}
    with pytest.raises(ConfigError, match=r"model.optimization: no block for model.optimization.attacker"):
        resolve_optimization({"defender": Optimization()}, defaults)
    with pytest.raises(ConfigError, match="unknown player.*critic"):
        resolve_optimization({"defender": {}, "attacker": {}, "critic": {}}, defaults)
    resolved = resolve_optimization({"defender": {"lr": 2e-5}, "attacker": Optimization(gradient_clip=None)}, defaults)
    assert resolved["defender"].lr == 2e-5 and resolved["attacker"].lr == 3e-6
    assert resolved["attacker"].gradient_clip is None
    with pytest.raises(ConfigError, match="gradient_clip must be positive"):
        Optimization(gradient_clip=0.0)


def test_configure_players_builds_each_optimiser_and_scheduler_in_order():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # noqa: E731
    players = [Player("a", Optimization(lr=0.1), lambda lr: lambda ps: torch.optim.SGD(ps, lr=lr)),
               Player("b", Optimization(optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01), scheduler=sched))]
    optimizers, schedulers = configure_players(players, {"a": list(a.parameters()), "b": list(b.parameters())})
    assert [type(o).__name__ for o in optimizers] == ["SGD", "Adam"] and len(schedulers) == 1
    assert (players[0].optimizer_index, players[0].scheduler_index) == (0, None)
    assert (players[1].optimizer_index, players[1].scheduler_index) == (1, 0)
    assert optimizers[0].param_groups[0]["lr"] == 0.1
    with pytest.raises(ConfigError, match="the c has no trainable parameters"):
        configure_players([Player("c", Optimization(lr=0.1), lambda lr: None)], {"c": []})


def test_fsdp1_is_refused_with_the_presets_to_use():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lit_align.engine.distributed import refuse_fsdp1

    with pytest.raises(ConfigError, match=r"trainer.strategy: GameModule does not run under FSDPStrategy.*fsdp2_cpu"):
        refuse_fsdp1(FSDPStrategy(), "GameModule")
    refuse_fsdp1(DDPStrategy(), "GameModule")


# -- players under Lightning's DDP ------------------------------------------------------------------
DATA = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))


class _Alternating(L.LightningModule):
    """Two players on disjoint layers; only one updates per batch (even batches ``a``, odd ``b``), each
    with its own rate, clip and scheduler. Batches are example indices; the rows each rank saw are saved.
    ``together``: both update every batch, ``a`` then ``b``, in an ``overlapped_steps`` block; whether ``a``'s
    weights were still unchanged after its step call (its collective in flight) is recorded."""

    def __init__(self, out: str, together: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.out, self.seen, self.together, self.in_flight = out, [], together, []
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 1), nn.Linear(4, 1)
        self.players = [Player("a", Optimization(lr=0.1, scheduler=_halving, gradient_clip=0.5), _sgd),
                        Player("b", Optimization(lr=0.05, gradient_clip=None), _sgd)]

    def configure_optimizers(self):
        return configure_players(self.players, {"a": list(self.a.parameters()), "b": list(self.b.parameters())})

    def training_step(self, batch, batch_idx):
        (index,) = batch
        self.seen.append(index.clone())
        if self.together:
            with overlapped_steps():
                before = self.a.weight.detach().clone()
                self.players[0].step(self, self.a(DATA[index]).pow(2).mean())
                self.in_flight.append(torch.equal(self.a.weight, before))
                self.players[1].step(self, self.b(DATA[index]).pow(2).mean())  # a's step ends after this backward
            return
        player = self.players[batch_idx % 2]
        layer = self.a if player.name == "a" else self.b
        player.step(self, layer(DATA[index]).pow(2).mean())

    def on_train_end(self) -> None:
        lrs = [g["lr"] for opt in self.optimizers() for g in opt.param_groups]
        torch.save({"state": {k: v.clone() for k, v in self.state_dict().items()}, "lrs": lrs, "seen": self.seen,
                    "in_flight": self.in_flight},
                   f"{self.out}/rank{self.global_rank}_of{self.trainer.world_size}.pt")


def _sgd(lr):
    return functools.partial(torch.optim.SGD, lr=lr)


def _half(n: int) -> float:
    return 0.5**n


def _halving(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, _half)


def _fit(world: int, out, batch: int, together: bool = False) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(32)), batch_size=batch)
    strategy = L.pytorch.strategies.DDPStrategy(start_method="spawn") if world > 1 else "auto"
    L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=out).fit(_Alternating(str(out), together), loader)


def _by_hand(steps: list[Tensor], together: bool = False) -> dict[str, Tensor]:
    """The same training in a plain loop, each step on the union of the rows all ranks saw."""
    torch.manual_seed(0)
    layers = {"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)}
    lr_a = 0.1
    for i, rows in enumerate(steps):
        for name in "ab" if together else "ab"[i % 2]:
            layer = layers[name]
            layer.zero_grad()
            layer(DATA[rows]).pow(2).mean().backward()
            if name == "a":
                torch.nn.utils.clip_grad_norm_(layer.parameters(), 0.5)
            with torch.no_grad():
                for p in layer.parameters():
                    p -= (lr_a if name == "a" else 0.05) * p.grad
            lr_a *= 0.5 if name == "a" else 1.0
    return {f"{n}.{k}": v for n, layer in layers.items() for k, v in layer.state_dict().items()}


@pytest.mark.slow
def test_players_under_ddp_match_one_process(tmp_path):
    """One player updates per step (the other's parameters are unused: no hang, no unused-parameter error);
    two DDP ranks end equal to each other and to a plain loop over the global batch of each step."""
    _fit(1, tmp_path, 8)
    _fit(2, tmp_path, 4)
    one = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    two = [torch.load(tmp_path / f"rank{r}_of2.pt", weights_only=True) for r in range(2)]
    steps_two = [torch.cat(rows) for rows in zip(two[0]["seen"], two[1]["seen"], strict=True)]
    for run, steps in ((one, one["seen"]), (two[0], steps_two)):
        assert len(steps) == 4 and all(len(rows) == 8 for rows in steps)
        expected = _by_hand(steps)
        for key, value in expected.items():
            torch.testing.assert_close(run["state"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in two[0]["state"].items():
        torch.testing.assert_close(two[1]["state"][key], value, rtol=0, atol=0)
    assert one["lrs"] == two[0]["lrs"] == [pytest.approx(0.1 * 0.5**2), 0.05]  # a stepped twice of 4 batches


@pytest.mark.slow
def test_overlapped_steps_under_ddp_change_when_not_what(tmp_path):
    """Both players step every batch in an ``overlapped_steps`` block: under DDP the first player's step is still
    in flight after its call (its collective runs during the second player's backward), and the run ends equal,
    bit for bit, on both ranks, and to a plain loop over the global batch; in one process the block changes
    nothing (each step ends at once)."""
    _fit(1, tmp_path, 8, together=True)
    _fit(2, tmp_path, 4, together=True)
    one = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    two = [torch.load(tmp_path / f"rank{r}_of2.pt", weights_only=True) for r in range(2)]
    assert one["in_flight"] == [False] * 4 and two[0]["in_flight"] == two[1]["in_flight"] == [True] * 4
    steps_two = [torch.cat(rows) for rows in zip(two[0]["seen"], two[1]["seen"], strict=True)]
    for run, steps in ((one, one["seen"]), (two[0], steps_two)):
        for key, value in _by_hand(steps, together=True).items():
            torch.testing.assert_close(run["state"][key], value, rtol=1e-5, atol=1e-6)
    for key, value in two[0]["state"].items():
        torch.testing.assert_close(two[1]["state"][key], value, rtol=0, atol=0)
    assert one["lrs"] == two[0]["lrs"] == [pytest.approx(0.1 * 0.5**4), 0.05]
