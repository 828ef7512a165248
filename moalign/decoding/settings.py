"""What every method's settings dataclass is built from: the base class whose checks raise one-line errors
naming the method and the parameter (:class:`~moalign.errors.SettingError`), and the settings several methods
share by name (each method declares the ones it uses; the help says which methods have it)."""

from __future__ import annotations

import dataclasses

from moalign.configbase import config_field
from moalign.errors import ForeignSettingError, SettingError


def unknown_setting(cls, key: str, names: list[str]) -> SettingError:
    """The error for ``key`` given to the settings class ``cls``: another method's setting names its owners."""
    from moalign.decoding.registry import METHODS

    owners = [m for m, spec in METHODS.items() if spec.args is not None and spec.args is not cls
              and key in {f.name for f in dataclasses.fields(spec.args)}]  # fmt: skip
    if owners:
        return ForeignSettingError(cls.__name__, key, owners)
    return SettingError(cls.__name__, key, f"is not one of its settings ({', '.join(names)})")


class MethodSettings:
    """Base of a decoding method's settings (a dataclass): checks run in ``__post_init__`` (``check``); a
    setting the method does not have (``CD(lam=0.1)``: RMOD's) is a one-line error naming its owners."""

    def __new__(cls, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        for key in kwargs:
            if names and key not in names:
                raise unknown_setting(cls, key, names)
        return super().__new__(cls)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:  # a method's own checks
        pass

    def validate(self) -> None:  # the older name
        self.check()

    def fail(self, name: str, problem: str):
        raise SettingError(type(self).__name__, name, problem)

    def at_least(self, minimum: int, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                self.fail(name, f"must be an integer, got {value!r}")
            if value < minimum:
                self.fail(name, f"must be >= {minimum}, got {value!r}")

    def one_of(self, name: str, choices) -> None:
        if getattr(self, name) not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


def n_field(help: str = "responses per prompt"):
    return config_field(4, help)


def k_field():
    return config_field(4, "candidate blocks per step (K)")


def block_size_field():
    return config_field(16, "tokens per block (B)")


def scalarization_field():
    return config_field(
        "uniform",
        "how the objectives combine into one number: uniform | worst-case | NAME (one objective) | "
        "NAME=W,NAME=W (fixed weights)",
    )


def values_field():
    return config_field(
        "reward", "value function of partial responses: 'reward' (the objectives on the partial text) or PATH "
        "to value heads (moalign train values)",
    )  # fmt: skip


def check_values(settings: MethodSettings) -> None:
    if not isinstance(settings.values, str) or not settings.values.strip():
        settings.fail("values", f"must be 'reward' or a path to value heads, got {settings.values!r}")


def check_scalarization(settings: MethodSettings) -> None:
    """The form of ``scalarization`` (its names are checked against the objectives when the method is built)."""
    spec = settings.scalarization
    if not isinstance(spec, str) or not spec.strip():
        settings.fail("scalarization", f"must be uniform, worst-case, an objective's name or NAME=W,..., got {spec!r}")
    if "=" not in spec:
        return
    total = 0.0
    for part in spec.split(","):
        name, _, val = part.partition("=")
        try:
            w = float(val)
        except ValueError:
            settings.fail("scalarization", f"weight for {name.strip()!r} is not a number: {val!r}")
        if w < 0:
            settings.fail("scalarization", f"weight for {name.strip()!r} must be >= 0, got {w}")
        total += w
    if total <= 0:
        settings.fail("scalarization", f"weights must not all be zero, got {spec!r}")
