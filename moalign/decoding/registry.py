"""The decoding-method registry.

A method is one module: an args dataclass (its own settings; every field becomes a ``moalign generate``
flag and a field of :class:`~moalign.config.GenerateConfig`), a ``build(ctx, args)`` that returns a
:class:`Decoder`, and one registration line::

    register_method(MethodSpec("my-method", "one line of help", MyArgs, build_my_method))

Built-in methods live in the modules of ``BUILTIN_MODULES``; ``--method`` choices, ``compare``'s method
list and the README's method table (``moalign methods``) all come from here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from moalign.errors import MoalignError
from moalign.registry import Registry

if TYPE_CHECKING:
    from moalign.decoding.backend import Backend, DecodeResult
    from moalign.decoding.values import ObjectiveScorer
    from moalign.policies import Policy

BUILTIN_MODULES = (
    "moalign.decoding.sample",
    "moalign.decoding.best_of_n",
    "moalign.decoding.cd",
    "moalign.decoding.rmod",
    "moalign.decoding.darwin",
)


class Decoder(Protocol):
    """A built method: decodes a batch of prompts into ``n_outputs`` results per prompt."""

    n_outputs: int

    def __call__(
        self, prompts: Sequence, *, seed: int, prompt_indices: Sequence[int]
    ) -> list[list[DecodeResult]]: ...


@dataclass
class MethodContext:
    """What a method is built from: the run's config, the policy and its backend (``engine``), the
    (normalised) scorer."""

    cfg: Any  # GenerateConfig
    policy: Policy
    engine: Backend
    scorer: ObjectiveScorer
    _value_fn: Any = None

    def value_fn(self):
        """The run's value function (``--values``): the objectives on the partial text, or value heads on
        the policy's hidden states (:attr:`hidden` then says the decode must return them)."""
        if self._value_fn is None:
            from moalign.decoding.values import RewardOnPrefix

            if self.cfg.values == "reward":
                self._value_fn = RewardOnPrefix(self.scorer)
            else:
                if not self.engine.capabilities.hidden_states:  # e.g. a completions server: say so
                    raise MoalignError(
                        "value heads (--values PATH) need the policy's hidden states, which this backend "
                        f"({type(self.engine).__name__}) does not return: use --values reward, or --backend local"
                    )
                from moalign.decoding.value_heads import load_value_function

                self._value_fn = load_value_function(
                    self.cfg.values, self.policy, self.scorer, system_prompt=self.cfg.system_prompt
                )
                device = getattr(self.cfg, "objective_device", None)
                if device:  # --objective-device: the heads on their own device (default: the policy's)
                    from moalign.objectives.base import objective_device

                    self._value_fn.heads.to(objective_device(device, self.policy.device))
        return self._value_fn

    @property
    def hidden(self) -> bool:
        """Whether the run's value function reads the policy's hidden states (the decode must return them)."""
        return bool(getattr(self._value_fn, "needs_hidden_states", False))

    def engine_with(self, sampling, system_prompt: str | None = None):
        """Another backend on the run's policy (in process or on the server) with its own sampling, e.g.
        Darwin's mutator."""
        return self.engine.with_sampling(sampling, system_prompt)

    def reward_fn(self):
        """The objectives on the text (normalised), whatever ``--values`` says: for complete responses."""
        from moalign.decoding.values import RewardOnPrefix

        return RewardOnPrefix(self.scorer)

    def scalarization(self):
        from moalign.decoding.scalarize import parse_scalarization

        return parse_scalarization(self.cfg.scalarization, self.scorer.names)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    args: type | None  # a dataclass of the method's own settings, or None
    build: Callable[[MethodContext, Any], Decoder]

    def make_args(self, values: dict):
        """The method's args from a mapping holding (at least) its fields; validated if it can."""
        if self.args is None:
            return None
        names = {f.name for f in dataclasses.fields(self.args)}
        args = self.args(**{k: v for k, v in values.items() if k in names})
        if hasattr(args, "validate"):
            args.validate()
        return args


#: the decoding methods (:class:`MethodSpec` by name); built-ins load on the first lookup
METHODS: Registry[MethodSpec] = Registry("method", builtins=BUILTIN_MODULES)


def register_method(spec: MethodSpec) -> MethodSpec:
    if not spec.name or spec.name != spec.name.strip():
        raise MoalignError(f"bad method name {spec.name!r}")
    if spec.args is not None and not dataclasses.is_dataclass(spec.args):
        raise MoalignError(f"method {spec.name!r}: args must be a dataclass")
    return METHODS.register(spec.name, spec)


def available_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)


def method_arg_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """Every registered method's settings as ``(name, type, field)`` for ``make_dataclass``; a setting
    shared by several methods (same name) appears once and must have the same default."""
    out: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    for _, spec in METHODS.items():
        if spec.args is None:
            continue
        hints = typing.get_type_hints(spec.args)
        for f in dataclasses.fields(spec.args):
            if f.default_factory is dataclasses.MISSING:
                new = dataclasses.field(default=f.default, metadata=f.metadata)
            else:
                new = dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
            if f.name in out:
                if out[f.name][2].default != new.default:
                    raise MoalignError(f"method setting {f.name!r} is declared twice with different defaults")
                continue
            out[f.name] = (f.name, hints[f.name], new)
    return list(out.values())


def foreign_settings(method: str) -> dict[str, list[str]]:
    """The settings other registered methods own and ``method`` does not have: setting -> its owners."""
    own = {f.name for f in dataclasses.fields(get_method(method).args)} if get_method(method).args else set()
    out: dict[str, list[str]] = {}
    for name, spec in METHODS.items():
        if name == method or spec.args is None:
            continue
        for f in dataclasses.fields(spec.args):
            if f.name not in own:
                out.setdefault(f.name, []).append(name)
    return out


def methods_table() -> str:
    """A markdown table of the registered methods and their own settings (the README's method table)."""
    rows = ["| method | what it does | its own settings |", "|---|---|---|"]
    for _, spec in METHODS.items():
        flags = (
            ", ".join(f"`--{f.name.replace('_', '-')}`" for f in dataclasses.fields(spec.args))
            if spec.args is not None
            else "—"
        )
        rows.append(f"| `{spec.name}` | {spec.help} | {flags} |")
    return "\n".join(rows)
