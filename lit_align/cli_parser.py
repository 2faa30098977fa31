"""The ``lit-align`` argument parser: short errors that suggest the key meant, and model specs that
switch from ``tiny`` to a real model on the command line.

* A parse error prints its message without the usage dump; an unknown key (a typo, in a config file or
  on the command line) names the class that rejects it and the closest accepted key (``difflib``).
* ``--<spec>.name_or_path ./my_model`` on a config whose spec has ``tiny`` replaces the ``tiny``
  (a spec takes exactly one of the two), and ``--<spec>.tiny null`` parses: both are rewritten to the
  dict form ``--<spec>={"name_or_path": ..., "tiny": null}`` that jsonargparse merges into the spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

try:  # jsonargparse's own switch for full tracebacks (JSONARGPARSE_DEBUG); private, so guarded
    from jsonargparse._common import debug_mode_active
except ImportError:  # another jsonargparse layout: read the documented environment variable instead
    import os

    def debug_mode_active() -> bool:
        return bool(os.environ.get("JSONARGPARSE_DEBUG"))

__all__ = ["LitAlignArgumentParser", "closest_key", "import_class_path", "model_override_args", "unknown_key_message"]

_UNKNOWN = [re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
            re.compile(r"does not accept option '(?P<key>[^']+)'"),
            re.compile(r"unrecognized arguments: --(?P<key>[^=\s]+)"),
            re.compile(r"Key \"(?P<key>[^\"]+)\" is not expected")]
_CLASS_PATH = re.compile(r"class_path '(?P<path>[^']+)'")


# --------------------------------------------------------------------------- tiny -> real model


def _option(token: str) -> tuple[str, str | None] | None:
    """``--a.b=v`` -> (``a.b``, ``v``); ``--a.b`` -> (``a.b``, None); anything else -> None."""
    if not token.startswith("--") or len(token) == 2:
        return None
    key, eq, value = token[2:].partition("=")
    return key, (value if eq else None)


def _as_dict_arg(key: str, leaf: dict) -> str:
    """``--root[.init_args].first={"second": {...: leaf}}`` for a spec at ``key``: the dict is given to the first
    field under the class's ``init_args``, the level at which jsonargparse merges a dict into the config."""
    parts = key.split(".")
    head = parts[:2] if len(parts) > 1 and parts[1] != "init_args" else parts[:3]
    value: dict = leaf
    for part in reversed(parts[len(head):]):
        value = {part: value}
    return f"--{'.'.join(head)}={json.dumps(value)}"


def model_override_args(args: Sequence[str]) -> list[str]:
    """Rewrite the command line so that a spec's ``name_or_path`` replaces its ``tiny`` and ``tiny null`` parses.

    ``--P.name_or_path V`` (with no ``--P.tiny...`` beside it) sets ``{"name_or_path": V, "tiny": null}`` at ``P``
    and ``--P.tiny null`` sets ``{"tiny": null}``, both in the dict form jsonargparse merges into the config (its
    dotted form cannot set a dataclass field to null). Other arguments are kept as they are.
    """
    args = list(args)
    keys = [opt[0] for opt in map(_option, args) if opt is not None]
    out: list[str] = []
    i = 0
    while i < len(args):
        opt = _option(args[i])
        if opt is not None:
            key, value = opt
            inline = value is not None
            if value is None and i + 1 < len(args):
                value = args[i + 1]
            prefix, _, field = key.rpartition(".")
            leaf = None
            if prefix.count(".") >= 1 and value is not None and field == "name_or_path" \
                    and value not in ("null", "None") and not any(k.startswith(f"{prefix}.tiny") for k in keys):
                leaf = {"name_or_path": value, "tiny": None}
            elif prefix.count(".") >= 1 and field == "tiny" and value in ("null", "None"):
                leaf = {"tiny": None}
            if leaf is not None:
                out.append(_as_dict_arg(prefix, leaf))
                i += 1 if inline else 2
                continue
        out.append(args[i])
        i += 1
    return out


# --------------------------------------------------------------------------- unknown keys


def _unwrap(hint: Any) -> Any:
    """The class inside ``X | None`` / ``Optional[X]`` (or the hint itself)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return hint


def _accepted(cls: Any) -> dict[str, Any]:
    """Accepted key -> type hint of a class (its constructor's parameters, or a dataclass's fields)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return {}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: names are enough
        hints = {}
    return {name: hints.get(name) for name, p in signature.parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def import_class_path(path: str) -> Any:
    """The object a config's ``class_path`` names (``package.module.Name``), or ``None`` if it does not import."""
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def closest_key(key: str, accepted: Sequence[str]) -> str | None:
    """The accepted key closest to ``key`` (``difflib``), or ``None`` when none is close."""
    found = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
    return found[0] if found else None


def _nested_accepted(cls: Any, key: str) -> tuple[str, str, list[str]] | None:
    """For a dotted ``key`` under ``cls``: (owner name, unknown part, the owner's accepted keys)."""
    parts = key.split(".")
    owner = cls
    for i, part in enumerate(parts):
        fields = _accepted(owner)
        if part not in fields or i == len(parts) - 1:
            return f"{owner.__module__}.{owner.__qualname__}", part, sorted(fields)
        owner = _unwrap(fields[part])
        if not isinstance(owner, type):
            return None
    return None


def unknown_key_message(message: str, parser_keys: Sequence[str]) -> str | None:
    """A short message for a jsonargparse error about an unknown key, with the closest accepted key;
    ``None`` when the error is about something else."""
    match = next((m for m in (p.search(message) for p in _UNKNOWN) if m), None)
    if match is None:
        return None
    key = match.group("key")
    paths = _CLASS_PATH.findall(message[: match.start()])
    owner_cls = import_class_path(paths[-1]) if paths else None
    found = _nested_accepted(owner_cls, key) if owner_cls is not None else None
    if found is not None:
        owner, unknown, accepted = found
        where = f"{owner} has no option {unknown!r}"
    else:
        unknown, accepted = key, [k for k in parser_keys if k]
        where = f"unknown option {key!r}"
    suggestion = closest_key(unknown, accepted)
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    listing = "" if len(accepted) > 40 else f"\n  accepted: {', '.join(accepted)}"
    return f"{where}{hint}{listing}"


def _subcommand_parser(parser: LightningArgumentParser, message: str) -> LightningArgumentParser | None:
    """The parser of the subcommand a root-level error is about: the one its message names (``Subcommand 'fit'
    does not accept ...``), else the one on the command line."""
    action = getattr(parser, "_subcommands_action", None)
    if action is None:
        return None
    match = re.search(r"Subcommand '(?P<name>[^']+)'", message)
    names = [match.group("name")] if match else [a for a in getattr(parser, "args", None) or [] if isinstance(a, str)]
    return next((action._name_parser_map[n] for n in names if n in action._name_parser_map), None)


class LitAlignArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are a few lines: the message (with the closest accepted key for
    an unknown one) and where to find the options, instead of a usage dump of every trainer flag."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or debug_mode_active() or callable(getattr(self, "_error_handler", None)):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or _subcommand_parser(self, message) or self
        keys = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
        short = unknown_key_message(message, keys)
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {short or message}\n"
                         f"tip: `{prog} --help` lists the options; `--model.help CLASS` / `--data.help CLASS` "
                         "those of one class\n")
        self.exit(2)
