"""The two reference models of classifier unlearning: the original (trained on all of D_tr) and Retrain (D_r only).

Unlearning starts from the **original** model, trained on the whole training set ``D_tr = D_f + D_r``; the
**Retrain** model, trained from scratch on the retain set ``D_r`` alone, is the gold standard it is judged against
(Di et al., arXiv 2406.07698: the goal is closeness to Retrain). Each is either

* **loaded** from a file given in the config: a ``.safetensors`` state dict, or a ``.ckpt`` / ``.pt`` file read with
  ``torch.load(weights_only=True)`` holding a state dict or a Lightning checkpoint of a classifier method (its
  ``state_dict`` with the ``net.`` prefix of :class:`~lit_align.methods.ClassifierBase`); or
* **trained** here with the same backbone by :func:`train_reference`, a plain documented loop (below), seeded, and
  **cached** on disk under a fingerprint of (backbone, data source and split, subset rows, training settings), so
  repeated runs and benchmarks train each reference once. Retrain's training time is stored with it
  (``seconds``), the run time unlearning is compared with.

The training loop (:func:`train_reference`): the network is built by ``backbone.build`` under
``torch.manual_seed(seed)``; ``epochs`` passes over the subset in the DataModule's seeded shuffled order
(``loader(subset, shuffle=True, seed_offset=REFERENCE_SEED_OFFSET)``, one process); mini-batch cross-entropy;
SGD with momentum and weight decay (or Adam) at a constant ``lr``, cosine-annealed to 0 over the epochs when
``cosine`` is set. Dropout and batch norm in training mode. The recipe is ours: the UGradSL paper does not give how
its original and Retrain models were trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from lit_align.checkpoint import atomic_write, atomic_write_text
from lit_align.engine.seeds import seeded_rng
from lit_align.errors import ConfigError, MissingPathError, check_int
from lit_align.paths import cache_root

__all__ = ["REFERENCE_SEED_OFFSET", "Reference", "ReferenceTraining", "cache_file", "content_hash", "fingerprint",
           "load_weights", "obtain_reference", "train_reference"]

#: ``seed_offset`` of the reference-training loaders (apart from the unlearning run's own streams).
REFERENCE_SEED_OFFSET = 7919
#: Which subset each reference is trained on.
SUBSETS = {"original": "train", "retrain": "retain"}


@dataclass
class ReferenceTraining:
    """How the original and Retrain references are trained when no file is given (our recipe; not in the paper)."""

    epochs: int = 20
    """Passes over the subset."""
    lr: float = 0.05
    """Learning rate (constant, or the cosine schedule's start)."""
    optimizer: Literal["sgd", "adam"] = "sgd"
    """``sgd`` (with ``momentum``, ``weight_decay``) or ``adam`` (with ``weight_decay``)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    cosine: bool = False
    """Anneal the learning rate to 0 over the epochs (cosine)."""
    batch_size: int | None = None
    """Rows per step; default the DataModule's ``batch_size``."""
    seed: int | None = None
    """Seed of the weights and of the loader's shuffling; default the module's ``seed``."""
    cache_dir: str | None = None
    """Where trained references are kept; default ``$LIT_ALIGN_CACHE/classifier_references`` (or
    ``~/.cache/lit_align/classifier_references``)."""

    def __post_init__(self) -> None:
        key = "model.init_args.reference_training"
        check_int(f"{key}.epochs", self.epochs)
        check_int(f"{key}.batch_size", self.batch_size, optional=True)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{key}.lr must be a number > 0, got {self.lr!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"{key}.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass
class Reference:
    """One reference model and where it came from."""

    net: nn.Module
    """The network (eval mode, no gradients)."""
    source: Literal["file", "trained", "cache"]
    """Loaded from the configured file, trained now, or read from the cache."""
    seconds: float | None
    """Wall seconds its training took (``None`` for a file): Retrain's run time."""
    path: str
    """The file the weights came from (the cache entry when trained)."""


def _digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()


#: DataModule settings that do not change what a reference learns (left out of the fingerprint)
_RUNTIME_SETTINGS = ("batch_size", "eval_batch_size", "num_workers")


def _datamodule_identity(dm: Any) -> dict[str, Any]:
    """The DataModule's class and init arguments (``hparams``: source, path, columns, split ...; not the loader
    settings), for the fingerprint. Attributes set later (e.g. the attached trainer) are not part of it."""
    hparams = {k: repr(v) for k, v in sorted(dict(getattr(dm, "hparams", {})).items()) if k not in _RUNTIME_SETTINGS}
    return {"class": f"{type(dm).__module__}.{type(dm).__qualname__}", "hparams": hparams,
            "input_shape": list(dm.input_shape), "num_classes": dm.num_classes}


def _update(digest: Any, value: Any) -> None:
    """Feed a features value (a tensor, or a dict of tensors for text) into ``digest``."""
    if isinstance(value, dict):
        for k in sorted(value):
            digest.update(k.encode())
            _update(digest, value[k])
    else:
        tensor = torch.as_tensor(value).detach().cpu().contiguous()
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def content_hash(dm: Any, rows: np.ndarray, chunk: int = 1024) -> str:
    """SHA-256 of the features (``dm.features``, in chunks of ``chunk`` rows) and labels of ``rows``: a changed
    data file, hub revision or preprocessing changes it even when the DataModule's settings do not."""
    digest = hashlib.sha256()
    for start in range(0, len(rows), chunk):
        _update(digest, dm.features(rows[start:start + chunk]))
    digest.update(dm.labels(rows).numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def fingerprint(backbone: Any, dm: Any, subset: str, training: ReferenceTraining, seed: int) -> str:
    """A hex key for a trained reference: SHA-256 over the backbone (``repr``), the DataModule's class, init
    arguments and shapes, the subset's row indices, the content of those rows (features and labels,
    :func:`content_hash`), the training settings and the seed. Change any and the reference is trained again."""
    rows = np.asarray(dm.indices(subset), dtype=np.int64)
    return _digest({"backbone": repr(backbone), "data": _datamodule_identity(dm), "subset": subset,
                    "rows": hashlib.sha256(rows.tobytes()).hexdigest(), "content": content_hash(dm, rows),
                    "training": {k: v for k, v in asdict(training).items() if k != "cache_dir"}, "seed": seed,
                    "format": 2})


def train_reference(backbone: Any, dm: Any, subset: str, training: ReferenceTraining, seed: int,
                    device: torch.device | str = "cpu") -> tuple[nn.Module, float]:
    """Train a fresh ``backbone`` network on ``subset`` of the set-up DataModule ``dm`` (see the module docstring
    for the loop). Returns ``(net in eval mode, wall seconds)``."""
    start = time.perf_counter()
    with seeded_rng(seed, device):
        net = backbone.build(tuple(dm.input_shape), dm.num_classes).to(device)
        loader = dm.loader(subset, shuffle=True, batch_size=training.batch_size,
                           seed_offset=REFERENCE_SEED_OFFSET + seed, num_replicas=1, rank=0)
        if training.optimizer == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=training.lr, momentum=training.momentum,
                                  weight_decay=training.weight_decay)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=training.lr, weight_decay=training.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, training.epochs) if training.cosine else None
        net.train()
        for epoch in range(training.epochs):
            loader.sampler.set_epoch(epoch)
            total, count = 0.0, 0
            for batch in loader:
                batch = move_data_to_device(batch, device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(batch["x"]), batch["y"])
                loss.backward()
                opt.step()
                total, count = total + float(loss.detach()) * len(batch["y"]), count + len(batch["y"])
            if sched is not None:
                sched.step()
            rank_zero_info(f"reference on {subset!r}: epoch {epoch + 1}/{training.epochs}, mean loss "
                           f"{total / max(count, 1):.4f}, {time.perf_counter() - start:.0f} s")
    net.eval().requires_grad_(False)
    return net, time.perf_counter() - start


def load_weights(net: nn.Module, path: str | Path, key: str) -> None:
    """Load ``path`` into ``net`` (strict): ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (a state dict, or a Lightning checkpoint whose ``state_dict`` keys carry the
    ``net.`` prefix). ``key`` is the config key named in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingPathError(f"{key}: weights file {path} does not exist; give a .safetensors or .ckpt file of "
                               "this backbone, or leave it null to train the reference")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConfigError(f"{key}: {path} cannot be read with torch.load(weights_only=True): it holds objects that "
                              f"are not allowed ({str(err).splitlines()[0]}); save the network's state dict as "
                              f".safetensors (safetensors.torch.save_file(net.state_dict(), ...)) and give that file"
                              ) from err
        state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"{key}: {path} holds no state dict")
        if any(k.startswith("net.") for k in state):
            state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    missing, unexpected = set(net.state_dict()) - set(state), set(state) - set(net.state_dict())
    if missing or unexpected:
        raise ConfigError(f"{key}: {path} does not fit the configured backbone (missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}); was it trained with another backbone or data?")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{key}: {path} does not fit the configured backbone: {err}") from err


def _save(net: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    data = save(state)
    atomic_write(path, lambda f: f.write(data))
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True))


def cache_file(kind: Literal["original", "retrain"], backbone: Any, dm: Any, training: ReferenceTraining,
               seed: int) -> Path:
    """Where the trained ``kind`` reference is cached (its ``.json`` sidecar beside it); ``seed`` is the one used
    (``training.seed`` when set)."""
    folder = Path(training.cache_dir).expanduser() if training.cache_dir else cache_root() / "classifier_references"
    return folder / f"{kind}-{fingerprint(backbone, dm, SUBSETS[kind], training, seed)[:32]}.safetensors"


def obtain_reference(kind: Literal["original", "retrain"], path: str | None, backbone: Any, dm: Any,
                     training: ReferenceTraining, seed: int, device: torch.device | str = "cpu",
                     key: str | None = None) -> Reference:
    """The ``kind`` reference (``original``: trained on the ``train`` subset; ``retrain``: on ``retain``): loaded
    from ``path`` when given, else from the cache, else trained (:func:`train_reference`) and cached. ``seed`` is
    used when ``training.seed`` is ``None``."""
    key = key or f"model.init_args.{kind}"
    seed = training.seed if training.seed is not None else seed
    if path is not None:
        with seeded_rng(seed):
            net = backbone.build(tuple(dm.input_shape), dm.num_classes)
        load_weights(net, path, key)
        return Reference(net.to(device).eval().requires_grad_(False), "file", None, str(path))
    subset = SUBSETS[kind]
    file = cache_file(kind, backbone, dm, training, seed)
    if file.is_file() and file.with_suffix(".json").is_file():
        with seeded_rng(seed):
            net = backbone.build(tuple(dm.input_shape), dm.num_classes)
        load_weights(net, file, f"{key} (cache entry)")
        meta = json.loads(file.with_suffix(".json").read_text())
        return Reference(net.to(device).eval().requires_grad_(False), "cache", meta.get("seconds"), str(file))
    net, seconds = train_reference(backbone, dm, subset, training, seed, device)
    _save(net, file, {"kind": kind, "subset": subset, "rows": len(dm.indices(subset)), "seconds": seconds,
                      "backbone": repr(backbone), "training": asdict(training), "seed": seed})
    return Reference(net, "trained", seconds, str(file))
