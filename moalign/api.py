"""The Python API: :func:`decode` prompts with a method object, get one :class:`Decoded` per prompt.

::

    import moalign

    out = moalign.decode(["Name a colour."], moalign.RMOD(k=2, block_size=8),
                         policy="smollm2-135m-instruct", objectives="helpful,harmless", max_new_tokens=16)
    out[0].response, out[0].scores, out[0].flops

The method is a settings object of exactly its own settings (``moalign.RMOD``, ``moalign.CD``, ...; a name
takes its defaults); everything every method shares is a keyword here. ``moalign generate`` is the same
decode as a resumable JSONL job; ``out=PATH`` writes (and resumes) that file from Python, and
:func:`load_results` reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moalign.errors import MoalignError


@dataclass(frozen=True)
class Server:
    """The policy on an OpenAI-compatible completions server (vLLM, llama.cpp's ``llama-server``, ...).

    ``tokenizer``: the policy's tokenizer, loaded locally for the chat template and token ids (a bundled
    name, a local path or a hub id); ``capabilities``: ``auto`` (probe), ``none``, or ``token_ids,n``."""

    base_url: str
    tokenizer: str
    model: str | None = None
    api_key_env: str | None = None
    capabilities: str = "auto"
    max_concurrency: int = 8
    request_timeout: float = 120.0
    retries: int = 3

    def settings(self) -> dict:
        return {"backend": "server", "base_url": self.base_url, "tokenizer": self.tokenizer, "model": self.model,
                "api_key_env": self.api_key_env, "server_capabilities": self.capabilities,
                "max_concurrency": self.max_concurrency, "request_timeout": self.request_timeout,
                "retries": self.retries, "policy": self.tokenizer}  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    """One decoded response: the text, its score by each objective (raw), the method's trace and the
    compute spent on it (policy and scorers; FLOPs = 2 x non-embedding parameters x tokens read). ``samples``:
    every output of its prompt when the method returns several (``Sample(n=4)``), this one first."""

    prompt: str
    response: str
    scores: dict[str, float]
    trace: list
    n_tokens: int
    finished: bool
    policy_tokens: int
    scorer_tokens: int
    policy_flops: float | None
    scorer_flops: float
    record: dict = field(repr=False)  # the record as ``moalign generate`` writes it
    samples: tuple[Decoded, ...] = field(default=(), repr=False)

    @property
    def flops(self) -> float | None:
        """The policy's and the scorers' FLOPs together (None for a served policy, whose size is unknown)."""
        return None if self.policy_flops is None else self.policy_flops + self.scorer_flops

    @property
    def worst_case(self) -> float:
        return min(self.scores.values())

    @classmethod
    def from_record(cls, rec: dict, samples: tuple[Decoded, ...] = ()) -> Decoded:
        return cls(
            prompt=rec["prompt"], response=rec["response"], scores=dict(rec["scores"]), trace=rec.get("trace") or [],
            n_tokens=int(rec.get("n_tokens", 0)), finished=bool(rec.get("finished", True)),
            policy_tokens=int(rec.get("policy_tokens", rec.get("forward_tokens", 0))),
            scorer_tokens=int(rec.get("scorer_tokens", 0)), policy_flops=rec.get("policy_flops"),
            scorer_flops=float(rec.get("scorer_flops") or 0.0), record=rec, samples=samples,
        )  # fmt: skip


def group_results(records: list[dict]) -> list[Decoded]:
    """Records (in their order) -> one :class:`Decoded` per prompt, its outputs in ``samples``."""
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(str(r.get("prompt_id")), []).append(r)
    out = []
    for recs in by_prompt.values():
        recs = sorted(recs, key=lambda r: int(r.get("sample_index", 0)))
        samples = tuple(Decoded.from_record(r) for r in recs) if len(recs) > 1 else ()
        out.append(Decoded.from_record(recs[0], samples))
    return out


def load_results(path: str) -> list[Decoded]:
    """The results of a ``moalign generate`` run (or of ``decode(..., out=PATH)``), one per prompt."""
    from moalign.records import read_records

    return group_results(read_records(path))


def method_settings(method) -> tuple[str, Any]:
    """``method`` (a settings object such as ``RMOD(k=8)``, or a registered name) -> (name, settings)."""
    from moalign.decoding.registry import get_method, spec_of

    if isinstance(method, str):
        spec = get_method(method)
        return spec.name, (spec.args() if spec.args is not None else None)
    spec = spec_of(method)
    if hasattr(method, "validate"):
        method.validate()  # a field changed after construction is checked again
    return spec.name, method


def load_method(config: str | Mapping):
    """The method settings object of a run: its ``meta.json`` (or a config file's path), or its config dict."""
    from moalign.config import load_config_file
    from moalign.decoding.registry import method_from_config

    values = load_config_file(config) if isinstance(config, str) else dict(config.get("config", config))
    return method_from_config(values)


def _prompts(prompts) -> list:
    from moalign.data.prompts import to_prompt

    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise MoalignError("prompts must be a non-empty list of strings, message lists or Prompt objects")
    if all(isinstance(m, Mapping) and "role" in m for m in prompts):  # one conversation
        prompts = [prompts]
    return [to_prompt(p) for p in prompts]


def _objectives(objectives) -> list:
    from moalign.objectives.base import CallableObjective, resolve_objectives

    if isinstance(objectives, Mapping):  # {name: fn(prompts, responses)}
        objectives = [CallableObjective(name, fn) if callable(fn) and not hasattr(fn, "score") else fn
                      for name, fn in objectives.items()]  # fmt: skip
    return resolve_objectives(objectives)


def decode(
    prompts: str | Sequence,
    method: Any = "sample",
    *,
    policy: Any = None,
    objectives: str | Sequence | Mapping[str, Callable] = "helpful,harmless",
    max_new_tokens: int = 64,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 4,
    normalize: str = "auto",
    system_prompt: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    objective_device: str | None = None,
    out: str | None = None,
    progress: bool = False,
) -> list[Decoded]:
    """Decode ``prompts`` with ``method`` and score every response by ``objectives``; one :class:`Decoded`
    per prompt, in order.

    - ``prompts``: a string, or a list of strings, chat message lists or :class:`~moalign.data.prompts.Prompt`.
    - ``method``: a method's settings (``moalign.RMOD(k=8, lam=0.5)``, ``moalign.CD(...)``, a registered
      third-party method's) or its name (its defaults).
    - ``policy``: a loaded :class:`~moalign.policies.Policy` (``moalign.load_policy``), a bundled name, a
      local path (folder or ``.gguf``) or a hub id, or a :class:`Server`; default: the bundled SmolLM2.
    - ``objectives``: names (``"helpful,harmless"``, ``rm:PATH``), :class:`~moalign.objectives.base.Objective`
      objects, callables ``fn(prompts, responses) -> scores``, or a mapping of names to callables.
    - ``normalize``: ``auto`` | ``none`` | a stats JSON (as ``moalign generate --normalize``).
    - ``out``: also write the records to this JSONL file (an existing one is resumed).
    """
    from moalign.config import GenerateConfig
    from moalign.generate import generate
    from moalign.policies import DEFAULT_POLICY, Policy

    name, settings = method_settings(method)
    values: dict = {"method": name, **(dataclasses.asdict(settings) if settings is not None else {})}
    loaded = None
    if policy is None:
        values["policy"] = DEFAULT_POLICY
    elif isinstance(policy, Policy):
        loaded, values["policy"] = policy, policy.name
    elif isinstance(policy, Server):
        values.update(policy.settings())
    elif isinstance(policy, str):
        values["policy"] = policy
    else:
        raise MoalignError(f"policy must be a Policy, a name or path, or a Server, got {type(policy).__name__}")
    values.update(max_new_tokens=max_new_tokens, seed=seed, temperature=temperature, top_p=top_p, top_k=top_k,
                  batch_size=batch_size, normalize=normalize, system_prompt=system_prompt, device=device,
                  dtype=dtype, objective_device=objective_device, out=out or "")  # fmt: skip
    objs = _objectives(objectives)
    values["objectives"] = ",".join(o.name for o in objs)
    cfg = GenerateConfig(**values)
    plist = _prompts(prompts)
    records = generate(cfg, policy=loaded, objectives=objs, prompts=plist, progress=progress)
    if out:  # a resumed file: the records of every prompt, the earlier ones included
        from moalign.records import read_records

        records = read_records(out)
    return group_results(records)
