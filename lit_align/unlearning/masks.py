"""Binary weight masks: which weights an unlearning run may update (1) and which stay put (0).

:meth:`ParameterMask.select_top` keeps the ``int(N * ratio)`` highest-scoring weights, ranked
**globally** over every parameter (embeddings, attention, MLP, norms, LM head), never per layer.

The selection is exact and memory-lean, and works on sharded scores without gathering them:

1. the k-th largest score ``t``: in one process (up to 2**28 weights) one ``kthvalue`` over a
   concatenated copy; otherwise, and always for sharded scores, by bisection: scores are
   non-negative float32, whose IEEE bit patterns (read as integers) sort like the values, so
   ``t`` is found over those 2**31 patterns, each probe counting ``scores >= probe`` over all
   parameters (one ``all_reduce`` of a single count per probe under FSDP2, so at most 32 passes
   and 32 tiny messages);
2. every score ``> t`` is selected, and of the scores ``== t`` exactly as many as are still
   needed, first in a fixed global order: parameter order, then flat index (under FSDP2's
   ``Shard(0)`` a rank's shard is a contiguous run of the flat index, so the order is parameter,
   then rank, then local index; ranks exchange one tie count per parameter).

No sort, and beyond the ``kthvalue`` bound no concatenation of all scores: besides the scores
the bisection allocates the masks (one byte per weight) and one temporary comparison per parameter.

Masks are saved bit-packed (one bit per weight, with names, shapes, ratio, method and the model's
architecture signature) and reloaded against a model: a mask made for another model is refused,
naming the file and the first parameter that does not match.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_align.checkpoint import atomic_save

__all__ = ["FORMAT", "ParameterMask", "model_signature"]

#: Tag of the saved file format.
FORMAT = "lit_align.ParameterMask/1"
#: Elements per chunk when breaking ties within one parameter (bounds the temporary cumsum).
_TIE_CHUNK = 1 << 24
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


#: Up to this many weights, one process finds the k-th largest score with one ``kthvalue`` over a
#: concatenated copy (4 bytes per weight, 1 GiB at this bound); beyond it, or when the scores are
#: sharded, by bisection on the float32 bit pattern (at most 32 counting passes, nothing gathered).
_KTHVALUE_MAX_NUMEL = 1 << 28

def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard); used by the attribution, the masks and ``WeightMask``."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (the tensor itself when it is not a DTensor)."""
    return t.to_local() if is_dtensor(t) else t


def model_signature(model: nn.Module) -> dict:
    """What a mask must agree with: the architecture (config and model class) and every trainable
    parameter's name and (global) shape, in order."""
    config = getattr(model, "config", None)
    return {
        "architecture": f"{type(config).__name__ if config is not None else '-'}/{type(model).__name__}",
        "shapes": {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }


def _pack(mask: Tensor) -> Tensor:
    """(n,) bool -> (ceil(n/8),) uint8, most significant bit first (numpy.packbits order)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    n = math.prod(shape)
    bits = (packed.view(-1, 1) & _BIT_WEIGHTS).ne(0).view(-1)
    return bits[:n].view(shape).clone()


def _sharding(scores: dict[str, Tensor]):
    """``(mesh, group, rank, world)`` of DTensor scores (one 1-D mesh, ``Shard(0)``), or ``None`` for plain ones."""
    kinds = {is_dtensor(s) for s in scores.values()}
    if kinds == {False} or not kinds:
        return None
    if kinds != {True}:
        raise ValueError("scores mix DTensor shards and plain tensors; shard all of them like the model or none")
    from torch.distributed.tensor import Shard

    meshes = {id(s.device_mesh): s.device_mesh for s in scores.values()}
    if len(meshes) != 1:
        raise ValueError("sharded scores live on more than one device mesh")
    mesh = next(iter(meshes.values()))
    for name, s in scores.items():
        if mesh.ndim != 1 or tuple(s.placements) != (Shard(0),):
            raise ValueError(f"scores of {name!r} are placed {s.placements} on a {mesh.ndim}-D mesh; only FSDP2's "
                             "Shard(0) over one data-parallel dimension is supported")
    group = mesh.get_group()
    return mesh, group, dist.get_rank(group), dist.get_world_size(group)


class ParameterMask:
    """Per-parameter boolean masks keyed by parameter name (True = the weight may be updated).

    Each mask is a bool tensor shaped like its parameter, or, for a ``DTensor`` parameter (FSDP2),
    a bool ``DTensor`` sharded like it (see :meth:`shard_like`).

    Attributes:
        masks: ``{name: mask}`` in the model's parameter order.
        ratio: the fraction of weights selected, as asked for (``None`` if unknown).
        method: the attribution method that scored the weights (``None`` if unknown).
        signature: :func:`model_signature` of the model the mask was made for (``None`` if unknown).
    """

    def __init__(self, masks: dict[str, Tensor], *, ratio: float | None = None, method: str | None = None,
                 signature: dict | None = None) -> None:
        for name, m in masks.items():
            if m.dtype != torch.bool:
                raise TypeError(f"mask of {name!r} has dtype {m.dtype}; masks are bool")
        self.masks = dict(masks)
        self.ratio, self.method, self.signature = ratio, method, signature

    # -- container ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        return self.masks[name]

    def __contains__(self, name: str) -> bool:
        return name in self.masks

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def items(self):
        return self.masks.items()

    @property
    def numel(self) -> int:
        """Weights covered (global, also when sharded)."""
        return sum(m.numel() for m in self.masks.values())

    def num_selected(self) -> int:
        """Weights selected (global; a collective call when the masks are sharded)."""
        total = torch.zeros((), dtype=torch.int64)
        group = None
        for m in self.masks.values():
            local = local_tensor(m)
            total = total.to(local.device) + local.sum()
            if is_dtensor(m):
                group = m.device_mesh.get_group()
        if group is not None:
            dist.all_reduce(total, group=group)
        return int(total)

    def density(self) -> float:
        """Fraction of weights selected (a collective call when sharded)."""
        return self.num_selected() / max(self.numel, 1)

    def __repr__(self) -> str:
        return (f"ParameterMask({len(self.masks)} parameters, {self.numel:,} weights, ratio={self.ratio}, "
                f"method={self.method!r})")

    # -- selection ---------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def select_top(cls, scores: dict[str, Tensor], ratio: float, *, method: str | None = None,
                   signature: dict | None = None) -> ParameterMask:
        """Select exactly ``int(N * ratio)`` weights with the largest scores, globally (see module docstring).

        Args:
            scores: ``{name: non-negative scores}`` (any float dtype; compared as float32), plain
                tensors or FSDP2 ``DTensor`` shards (then every rank calls this with its shards).
            ratio: fraction of weights selected, in [0, 1].
            method, signature: recorded in the mask (see the attributes).
        """
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1] (the fraction of weights updated), got {ratio}")
        if not scores:
            raise ValueError("no scores to select from")
        sharding = _sharding(scores)
        group = sharding[1] if sharding else None
        names = list(scores)
        local = []
        for name in names:
            s = local_tensor(scores[name]).detach()
            s = s.float() if s.dtype != torch.float32 else s
            if bool(torch.isnan(s).any()) or bool((s < 0).any()):
                raise ValueError(f"scores of {name!r} contain NaN or negative values; scores must be >= 0")
            local.append(s)
        device = local[0].device
        total = sum(scores[n].numel() for n in names)
        k = int(total * ratio)

        def reduce(t: Tensor) -> Tensor:
            if group is not None:
                dist.all_reduce(t, group=group)
            return t

        def count_ge(bits: int) -> int:
            probe = torch.tensor([bits], dtype=torch.int32).view(torch.float32).to(device)[0]
            c = torch.zeros((), dtype=torch.int64, device=device)
            for s in local:
                c += (s >= probe).sum()
            return int(reduce(c))

        if k == 0:
            threshold_bits = 0x7F800001  # above +inf: nothing qualifies
        elif group is None and total <= _KTHVALUE_MAX_NUMEL:  # one process: the k-th largest in one pass
            kth = torch.cat([s.reshape(-1) for s in local]).kthvalue(total - k + 1).values
            threshold_bits = int(kth.reshape(1).cpu().view(torch.int32)[0])
        else:  # largest t with count(>= t) >= k; invariant count(>= lo) >= k > count(>= hi)
            lo, hi = 0, 0x7F800001
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if count_ge(mid) >= k:
                    lo = mid
                else:
                    hi = mid
            threshold_bits = lo
        t = torch.tensor([min(threshold_bits, 0x7F800000)], dtype=torch.int32).view(torch.float32).to(device)[0]
        over_top = threshold_bits > 0x7F800000

        masks, ties = [], torch.zeros(len(local), dtype=torch.int64, device=device)
        for j, s in enumerate(local):
            if over_top:
                masks.append(torch.zeros_like(s, dtype=torch.bool))
                continue
            masks.append(s > t)
            ties[j] = (s == t).sum()
        selected = torch.zeros((), dtype=torch.int64, device=device)
        for m in masks:
            selected += m.sum()
        need = k - int(reduce(selected))
        if need > 0:
            if group is not None:  # ties of every (rank, parameter): (W, P)
                world, rank = sharding[3], sharding[2]
                gathered = [torch.zeros_like(ties) for _ in range(world)]
                dist.all_gather(gathered, ties, group=group)
                all_ties = torch.stack(gathered)
            else:
                rank, all_ties = 0, ties[None]
            # global order: parameter, then rank; ties before (rank, j) = earlier params of all ranks + earlier ranks of j
            before_param = torch.cumsum(all_ties.sum(0), 0) - all_ties.sum(0)  # (P,)
            before_rank = torch.cumsum(all_ties, 0) - all_ties  # (W, P)
            start = (before_param + before_rank[rank]).tolist()
            for j, s in enumerate(local):
                take = min(max(need - start[j], 0), int(ties[j]))
                if take:
                    _take_first_ties(masks[j], s, t, take)
        out = {}
        for name, m in zip(names, masks):
            sc = scores[name]
            if is_dtensor(sc):
                from torch.distributed.tensor import DTensor

                m = DTensor.from_local(m, sc.device_mesh, sc.placements, shape=sc.shape, stride=sc.stride())
            out[name] = m
        return cls(out, ratio=ratio, method=method, signature=signature)

    # -- sharding ----------------------------------------------------------------------------
    @staticmethod
    def shard_like(mask: Tensor, param: Tensor) -> Tensor:
        """The mask of ``param`` placed like it: a bool ``DTensor`` shard for a ``DTensor`` parameter
        (split locally, no communication: every rank holds the full mask), else the mask on its device."""
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match parameter shape {tuple(param.shape)}")
        if is_dtensor(mask):
            return mask
        if is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(mask.to(param.to_local().device), param.device_mesh, param.placements,
                                     src_data_rank=None)
        return mask.to(param.device)

    # -- saving ------------------------------------------------------------------------------
    def to_payload(self) -> dict:
        """The bit-packed form (what :meth:`save` writes); collective when the masks are sharded."""
        names, shapes, packed = [], [], []
        for name, m in self.masks.items():
            if is_dtensor(m):
                from torch.distributed.tensor import DTensor

                m = DTensor.from_local(m.to_local().to(torch.uint8), m.device_mesh, m.placements, shape=m.shape,
                                       stride=m.stride()).full_tensor().bool()  # gloo has no bool collectives
            names.append(name)
            shapes.append(tuple(m.shape))
            packed.append(_pack(m))
        return {"format": FORMAT, "names": names, "shapes": shapes, "numel": [math.prod(s) for s in shapes],
                "packed": packed, "ratio": self.ratio, "method": self.method, "signature": self.signature}

    def save(self, path: str | Path) -> None:
        """Write the mask bit-packed, atomically. Collective when sharded (every rank calls; rank 0 writes)."""
        payload = self.to_payload()
        rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if rank0:
            atomic_save(payload, path)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    @classmethod
    def from_payload(cls, payload: dict, model: nn.Module, *, source: str = "<payload>") -> ParameterMask:
        """Unpack ``payload`` for ``model`` (checked against it), sharded like its parameters."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{source} is not a lit_align weight mask (expected format {FORMAT!r})")
        expected = model_signature(model)
        saved_arch = (payload.get("signature") or {}).get("architecture")
        mask_shapes = dict(zip(payload["names"], (tuple(s) for s in payload["shapes"])))
        for name, shape in expected["shapes"].items():
            if name not in mask_shapes:
                raise ValueError(f"weight mask {source} belongs to another model ({saved_arch}, this one is "
                                 f"{expected['architecture']}): it has no entry for parameter {name!r}")
            if mask_shapes[name] != shape:
                raise ValueError(f"weight mask {source} belongs to another model ({saved_arch}, this one is "
                                 f"{expected['architecture']}): parameter {name!r} has shape {mask_shapes[name]} in "
                                 f"the mask but {shape} in the model")
        extra = [n for n in mask_shapes if n not in expected["shapes"]]
        if extra:
            raise ValueError(f"weight mask {source} belongs to another model ({saved_arch}, this one is "
                             f"{expected['architecture']}): the model has no parameter {extra[0]!r}")
        params = dict(model.named_parameters())
        packed = dict(zip(payload["names"], payload["packed"]))
        masks = {n: cls.shard_like(_unpack(packed[n], mask_shapes[n]), params[n]) for n in expected["shapes"]}
        return cls(masks, ratio=payload.get("ratio"), method=payload.get("method"), signature=payload.get("signature"))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module) -> ParameterMask:
        """Read a mask saved by :meth:`save` for ``model``; it is checked against the model's parameter
        names and shapes and sharded like its parameters (each rank keeps only its shard)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"weight mask file {path} does not exist")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_payload(payload, model, source=str(path))

    # -- use ---------------------------------------------------------------------------------
    @torch.no_grad()
    def mask_gradients_(self, model: nn.Module) -> None:
        """``grad *= mask`` for every masked parameter that has a gradient (in place, shard by shard)."""
        for name, p in model.named_parameters():
            m = self.masks.get(name)
            if m is not None and p.grad is not None:
                local_tensor(p.grad).mul_(local_tensor(m))


def _take_first_ties(mask: Tensor, scores: Tensor, t: Tensor, take: int) -> None:
    """Set the first ``take`` positions (flat order) where ``scores == t`` in ``mask``, chunk by chunk."""
    flat_mask, flat = mask.view(-1), scores.reshape(-1)
    for begin in range(0, flat.numel(), _TIE_CHUNK):
        tie = flat[begin:begin + _TIE_CHUNK] == t
        n = int(tie.sum())
        if n == 0:
            continue
        if n <= take:
            flat_mask[begin:begin + _TIE_CHUNK] |= tie
            take -= n
        else:
            tie &= torch.cumsum(tie, 0, dtype=torch.int64) <= take
            flat_mask[begin:begin + _TIE_CHUNK] |= tie
            take = 0
        if take == 0:
            return
