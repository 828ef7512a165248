"""What every typed config uses: a dataclass field that carries its CLI help, and the versions record."""

from __future__ import annotations

import platform
from dataclasses import field


def config_field(default, help: str, **kw):
    """A config field with its CLI help; a callable default (e.g. ``list``) becomes a default factory.

    ``choices`` may be a sequence or a zero-argument callable returning one (read when the CLI is built,
    e.g. a registry's names).
    """
    if callable(default) and not isinstance(default, type | bool) or default is list:
        return field(default_factory=default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def versions() -> dict:
    """Versions of everything that shapes a result."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("moalign", "torch", "transformers", "datasets", "accelerate", "trl", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def json_default(o):
    """``json.dumps(default=...)`` for what configs and logs hold: tensors as lists, enums as their value,
    anything else as its string."""
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays and scalars
        return o.tolist()
    if hasattr(o, "value"):  # enums (e.g. transformers' IntervalStrategy)
        return o.value
    return str(o)
