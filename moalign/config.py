"""Typed run configurations. Every field is a CLI flag (``--field-name``); a run saves its config so that
``--config FILE`` reproduces it (flags given on the command line override the file)."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path

from moalign.errors import MoalignError

METHODS = ("sample", "best-of-n", "cd", "rmod")


def config_field(default, help: str, **kw):
    """A config field with its CLI help; a callable default (e.g. ``list``) becomes a default factory."""
    if callable(default) and not isinstance(default, type | bool) or default is list:
        return field(default_factory=default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_f = config_field


@dataclass
class GenerateConfig:
    """``moalign generate``: decode responses for prompts with one method."""

    method: str = _f("sample", "decoding method", choices=METHODS)
    policy: str = _f("smollm2-135m-instruct", "policy: bundled name, local path (folder or .gguf) or hub id")
    objectives: str = _f("helpful,harmless", "comma-separated objectives (names or rm:PATH[@INDEX])")
    prompts: str = _f("", "prompts: JSONL/JSON/CSV/TXT file (gzip too) or hub dataset id[:split]")
    prompt_column: str | None = _f(None, "column holding the prompt (default: first of prompt/messages/...)")
    out: str = _f("", "output JSONL file (records are appended as produced; an existing file is resumed)")
    n: int = _f(4, "sample: responses per prompt; best-of-n: N candidates")
    k: int = _f(4, "cd/rmod: candidate blocks per step (K)")
    block_size: int = _f(16, "cd/rmod: tokens per block (B)")
    max_new_tokens: int = _f(64, "maximum new tokens per response")
    temperature: float = _f(1.0, "sampling temperature (0 = greedy)")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    seed: int = _f(0, "random seed")
    limit: int | None = _f(None, "use only the first N prompts")
    batch_size: int = _f(4, "prompts decoded together (rows = batch_size x K)")
    scalarization: str = _f(
        "uniform",
        "how objectives combine for best-of-n and cd: uniform | worst-case | NAME (one objective) | "
        "NAME=W,NAME=W (fixed weights)",
    )
    normalize: str = _f(
        "auto",
        "objective scaling: auto (shipped z-score stats where known, else estimated from policy samples) | "
        "none (raw) | PATH to a stats JSON",
    )
    lam: float = _f(0.5, "rmod: lambda, the tilt strength of the worst-case game")
    rmod_select: str = _f(
        "argmax", "rmod: argmax of w*.v, or sample from softmax(lambda v.w*)", choices=("argmax", "sample")
    )
    solver: str = _f(
        "exact",
        "rmod: exact worst-case solver, or the paper code's fixed-step 'reference'",
        choices=("exact", "reference"),
    )
    values: str = _f(
        "reward", "cd/rmod value function: 'reward' (objectives on the partial text) or PATH to value heads"
    )
    system_prompt: str | None = _f(None, "system prompt added before every conversation")
    device: str | None = _f(None, "torch device (default: cuda if available, else cpu)")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise MoalignError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        for name in ("n", "k", "block_size", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise MoalignError(f"--{flag} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise MoalignError(f"--limit must be >= 1, got {self.limit}")
        if not self.lam > 0:
            raise MoalignError(f"--lam must be > 0, got {self.lam}")


@dataclass
class EvaluateConfig:
    """``moalign evaluate``: per-objective and worst-case metrics of one or more runs."""

    inputs: list[str] = _f(list, "JSONL files written by `moalign generate`", nargs="+")
    objectives: str | None = _f(None, "objectives to report (default: those scored in the inputs)")
    reference: str | None = _f(None, "the run (one of --inputs) that win rates are measured against")
    normalize: str = _f("auto", "auto (stats saved with the runs) | none | PATH to a stats JSON")
    rescore: bool = _f(False, "score the responses again instead of using the scores in the files")
    n_boot: int = _f(1000, "bootstrap resamples for confidence intervals")
    seed: int = _f(0, "bootstrap seed")
    json: bool = _f(False, "print the result as JSON instead of a table")
    plot: str | None = _f(None, "write a comparison plot (PNG) here")


@dataclass
class CompareConfig(GenerateConfig):
    """``moalign compare``: several methods on the same prompts, then evaluate and plot."""

    methods: str = _f(
        "sample,best-of-n,cd",
        "comma-separated methods; a method may repeat with its own settings, e.g. rmod:lam=0.1:k=8",
    )
    out_dir: str = _f("runs/compare", "folder for one JSONL per method, summary.json and comparison.png")
    n_boot: int = _f(1000, "bootstrap resamples for confidence intervals")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config_file(path: str) -> dict:
    """A JSON config (or the sidecar ``*.meta.json`` of a run, whose ``config`` key is used)."""
    p = Path(path)
    if not p.exists():
        raise MoalignError(f"config file not found: {path}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise MoalignError(f"config file {path} is not valid JSON: {e.msg}") from None
    if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    return data


def build_config(cls, values: dict):
    """Instantiate a config dataclass from a dict, naming unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MoalignError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**values)


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
