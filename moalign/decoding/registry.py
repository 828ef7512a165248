"""The decoding-method registry.

A method is one module: a settings dataclass (exactly its own settings, checked when it is made: the object a
user passes to :func:`moalign.decode`, e.g. ``RMOD(k=8, lam=0.5)``; every field is also a ``moalign generate
--method NAME`` flag and a field of :class:`~moalign.config.GenerateConfig`), a ``build(ctx, settings)`` that
returns a :class:`Decoder`, and one registration line::

    register_method(MethodSpec("my-method", "one line of help", MyMethod, build_my_method))

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
    """What a method is built from: the run's config (the settings every method shares: ``max_new_tokens``,
    ``system_prompt``, devices), the policy and its backend, the (normalised) scorer, and the method's own
    settings (``args``; their ``values`` and ``scalarization`` when it has them)."""

    cfg: Any  # a GenerateConfig
    policy: Policy
    backend: Backend
    scorer: ObjectiveScorer
    args: Any = None  # the method's settings object (defaults to cfg.method_args())
    _value_fn: Any = None

    def __post_init__(self) -> None:
        if self.args is None and hasattr(self.cfg, "method_args"):
            self.args = self.cfg.method_args()

    @property
    def engine(self) -> Backend:  # the older name of ``backend``
        return self.backend

    def setting(self, name: str, default):
        """The method's own setting ``name`` (``values``, ``scalarization``), or ``default`` if it has none."""
        return getattr(self.args, name, default)

    def value_fn(self):
        """The run's value function (``--values``): the objectives on the partial text, or value heads on
        the policy's hidden states (:attr:`hidden` then says the decode must return them)."""
        if self._value_fn is None:
            from moalign.decoding.values import RewardOnPrefix

            values = self.setting("values", "reward")
            if values == "reward":
                self._value_fn = RewardOnPrefix(self.scorer)
            else:
                if not self.backend.capabilities.hidden_states:  # e.g. a completions server: say so
                    raise MoalignError(
                        "value heads (values=PATH) need the policy's hidden states, which this backend "
                        f"({type(self.backend).__name__}) does not return: use values='reward', or the local backend"
                    )
                from moalign.decoding.value_heads import load_value_function

                self._value_fn = load_value_function(
                    values, self.policy, self.scorer, system_prompt=self.cfg.system_prompt
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

    def backend_with(self, sampling, system_prompt: str | None = None):
        """Another backend on the run's policy (in process or on the server) with its own sampling, e.g.
        Darwin's mutator."""
        return self.backend.with_sampling(sampling, system_prompt)

    def reward_fn(self):
        """The objectives on the text (normalised), whatever ``--values`` says: for complete responses."""
        from moalign.decoding.values import RewardOnPrefix

        return RewardOnPrefix(self.scorer)

    def scalarization(self):
        from moalign.decoding.scalarize import parse_scalarization

        return parse_scalarization(self.setting("scalarization", "uniform"), self.scorer.names)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str
    args: type | None  # a dataclass of the method's own settings, or None
    build: Callable[[MethodContext, Any], Decoder]

    def make_args(self, values: dict):
        """The method's settings from a mapping holding (at least) its fields (a run's config); checked."""
        if self.args is None:
            return None
        names = {f.name for f in dataclasses.fields(self.args)}
        args = self.args(**{k: v for k, v in values.items() if k in names})
        if hasattr(args, "validate"):
            args.validate()
        return args


#: where the policy runs (``--backend``): name -> (module, opener, in process?, help). An opener is
#: ``open(cfg, sampling, policy=None) -> (policy, Backend)``; ``local`` uses a passed policy, ``server`` ignores it
BACKENDS: dict[str, tuple[str, str, bool, str]] = {
    "local": ("moalign.decoding.in_process", "open_local", True, "the in-process transformers engine"),
    "server": ("moalign.decoding.completions", "connect", False, "an OpenAI-compatible completions server"),
}


def open_backend(cfg, sampling, policy=None):
    """The run's policy and its :class:`~moalign.decoding.backend.Backend` (``cfg.backend``)."""
    import importlib

    if cfg.backend not in BACKENDS:
        raise MoalignError(f"backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    module, opener, _, _ = BACKENDS[cfg.backend]
    return getattr(importlib.import_module(module), opener)(cfg, sampling, policy)


def loads_policy(backend: str) -> bool:
    """Whether ``backend`` runs the policy in this process (so a comparison loads it once for every run)."""
    return BACKENDS[backend][2] if backend in BACKENDS else True


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


def spec_of(method) -> MethodSpec:
    """The registered method of a settings object (``RMOD(...)``), or of a name."""
    if isinstance(method, str):
        return get_method(method)
    for _, spec in METHODS.items():
        if spec.args is not None and type(method) is spec.args:
            return spec
    raise MoalignError(
        f"{type(method).__name__} is not a registered method's settings (registered: {', '.join(available_methods())})"
    )


def method_from_config(values: dict):
    """The settings object of the method a run's config names (``config`` of its ``meta.json``)."""
    spec = get_method(values.get("method", "sample"))
    return spec.make_args(values) if spec.args is not None else None


def method_arg_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """Every registered method's settings as ``(name, type, field)`` for ``make_dataclass``; a setting
    shared by several methods (same name) appears once, must have the same default, and its help names the
    methods that have it."""
    out: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    owners: dict[str, list[str]] = {}
    for method, spec in METHODS.items():
        if spec.args is None:
            continue
        hints = typing.get_type_hints(spec.args)
        for f in dataclasses.fields(spec.args):
            owners.setdefault(f.name, []).append(method)
            if f.name in out:
                if out[f.name][2].default != f.default:
                    raise MoalignError(f"method setting {f.name!r} is declared twice with different defaults")
                continue
            out[f.name] = (f.name, hints[f.name], f)
    fields = []
    for name, tp, f in out.values():
        meta = {**f.metadata, "help": f"{', '.join(owners[name])}: {f.metadata.get('help', '')}", "methods": owners[name]}
        if f.default_factory is dataclasses.MISSING:
            new = dataclasses.field(default=f.default, metadata=meta)
        else:
            new = dataclasses.field(default_factory=f.default_factory, metadata=meta)
        fields.append((name, tp, new))
    return fields


def own_settings(method: str) -> list[str]:
    """The names of ``method``'s own settings."""
    args = get_method(method).args
    return [f.name for f in dataclasses.fields(args)] if args is not None else []


def foreign_settings(method: str) -> dict[str, list[str]]:
    """The settings other registered methods own and ``method`` does not have: setting -> its owners."""
    own = set(own_settings(method))
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
    rows = ["| method | Python | what it does | its own settings |", "|---|---|---|---|"]
    for _, spec in METHODS.items():
        flags = (
            ", ".join(f"`--{f.name.replace('_', '-')}`" for f in dataclasses.fields(spec.args))
            if spec.args is not None
            else "—"
        )
        cls = f"`{spec.args.__name__}`" if spec.args is not None else "—"
        rows.append(f"| `{spec.name}` | {cls} | {spec.help} | {flags} |")
    return "\n".join(rows)
