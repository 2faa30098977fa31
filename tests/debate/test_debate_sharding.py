"""How the debate splits lists of questions and pairs between ranks (``lit_align.debate.sharding``): every rank
gets the same number of rows (padding rows repeat position 0), and the gathered results come back in position
order on every rank; minibatch means are the global ones."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_group

from lit_align.debate.sharding import assign_full, full_tensor, gather_share, global_means, rank_share


def _worker(rank: int, world: int, init: str, out: str) -> None:
    with gloo_group(rank, world, init):
        positions, real = rank_share(5)
        gathered = gather_share(torch.tensor(positions, dtype=torch.float32) * 10, 5)
        # rank 0 holds rows 0, 2, 4 (mean loss 2.0), rank 1 rows 1, 3 (mean 4.0): the minibatch mean is 2.8
        means = global_means({"loss": torch.tensor([2.0, 4.0][rank])}, real, 5, "cpu")
        torch.save({"positions": positions, "real": real, "gathered": gathered, "means": means}, f"{out}/rank{rank}.pt")


@pytest.mark.slow  # two spawned processes
def test_shares_are_padded_to_one_size_and_gather_in_position_order(tmp_path):
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [(r["positions"], r["real"]) for r in ranks] == [([0, 2, 4], 3), ([1, 3, 0], 2)]
    for r in ranks:
        torch.testing.assert_close(r["gathered"], torch.arange(5, dtype=torch.float32) * 10)
        assert abs(float(r["means"]["loss"]) - 2.8) < 1e-6


def test_one_process_takes_everything_and_full_weights_round_trip():
    assert rank_share(3) == ([0, 1, 2], 3) and rank_share(0) == ([], 0)
    torch.testing.assert_close(gather_share(torch.ones(3, 2), 3), torch.ones(3, 2))
    param = torch.nn.Parameter(torch.zeros(2, 2))
    full = full_tensor(torch.nn.Parameter(torch.ones(2, 2)))
    assign_full(param, full)
    assert torch.equal(param.detach(), torch.ones(2, 2)) and not full.requires_grad
