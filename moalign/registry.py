"""One registry type for everything that is looked up by name: decoding methods, objectives, gradient
combiners and IAMA's operators and aggregators.

A :class:`Registry` maps names to entries (whatever the kind needs: a spec, a factory, a class). It offers

- **lazy built-ins**: modules imported on the first lookup (``import moalign`` loads none of them), whose
  import registers their entries; a user's own registration made earlier under the same name wins;
- **aliases**: other spellings of a name (``uniform`` for ``linear``); names are normalised by the registry's
  ``normalize`` function (e.g. lower case, ``_`` as ``-``);
- **prefix families**: a prefix such as ``rm:`` whose entry resolves the rest of the name
  (``rm:PATH@INDEX``), for open-ended names no list can hold;
- **one-line errors** that name the registry's kind and what it knows.

Registering is one line in the module that defines the entry::

    METHODS.register("my-method", MethodSpec(...))
    COMBINERS.register("mine", MyCombiner, aliases=("my-combiner",))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from moalign.errors import MoalignError

T = TypeVar("T")


def _strip(name: str) -> str:
    return name.strip()


def dashed_lower(name: str) -> str:
    """``" MGDA_Decoupled "`` -> ``"mgda-decoupled"``: a normalisation for case-insensitive names."""
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    """Named entries of one kind; see the module docstring."""

    def __init__(
        self,
        kind: str,
        *,
        builtins: Iterable[str] = (),
        normalize: Callable[[str], str] = _strip,
        hint: str = "",
    ):
        self.kind = kind
        self.normalize = normalize
        self.hint = hint  # added to the unknown-name error, e.g. "(or rm:PATH for a reward model)"
        self._builtins = list(builtins)
        self._loaded = False
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._prefixes: dict[str, Callable[[str], T]] = {}

    # ------------------------------------------------------------------------------------------ register
    def register(self, name: str, entry: T | None = None, *, aliases: Iterable[str] = (), default: bool = False):
        """Register ``entry`` under ``name`` (and ``aliases``); usable as a decorator when ``entry`` is omitted.

        ``default=True`` (what built-in modules use): keep an entry a user registered earlier under that name.
        """
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise MoalignError(f"{self.kind} name must be a non-empty string without ':', got {name!r}")

        def add(e: T) -> T:
            key = self.normalize(name)
            if not (default and key in self._entries):
                self._entries[key] = e
            for a in aliases:
                self._aliases[self.normalize(a)] = key
            return e

        return add(entry) if entry is not None else add

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (e.g. a plugin's entry at the end of a test)."""
        key = self.normalize(name)
        self._entries.pop(key, None)
        for a in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[a]

    def register_prefix(self, prefix: str, resolve: Callable[[str], T]) -> None:
        """Names ``PREFIX REST`` resolve to ``resolve(REST)`` (e.g. ``rm:`` -> a reward model from a path)."""
        if not prefix or not prefix.endswith(":"):
            raise MoalignError(f"a {self.kind} prefix must end with ':', got {prefix!r}")
        self._prefixes[prefix] = resolve

    def add_builtins(self, *modules: str) -> None:
        """Modules whose import registers built-in entries (imported on the first lookup)."""
        self._builtins.extend(modules)
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._builtins:
                importlib.import_module(mod)

    # -------------------------------------------------------------------------------------------- look up
    def prefix_of(self, name: str) -> str | None:
        """The registered prefix ``name`` starts with, if any."""
        return next((p for p in self._prefixes if name.strip().startswith(p)), None)

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (aliases resolved), or a one-line error."""
        if not isinstance(name, str) or not name.strip():
            raise MoalignError(f"{self.kind} must be given by a non-empty name, got {name!r}")
        self._load()
        key = self.normalize(name)
        key = self._aliases.get(key, key)
        if key not in self._entries:
            known = ", ".join(self.names())
            raise MoalignError(f"unknown {self.kind} {name!r}; choose from {known}{self.hint}")
        return key

    def get(self, name: str) -> T:
        """The entry of ``name``: a registered name or alias, or ``PREFIX REST`` of a prefix family."""
        prefix = self.prefix_of(name) if isinstance(name, str) else None
        if prefix is not None:
            return self._prefixes[prefix](name.strip()[len(prefix) :])
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names in registration order (built-ins loaded)."""
        self._load()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if self.prefix_of(name) is not None:
            return True
        self._load()
        key = self.normalize(name)
        return self._aliases.get(key, key) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names() if self._loaded else '<not loaded>'})"


class Choices:
    """argparse ``choices`` read from a registry each time they are used (a name registered later is a choice;
    aliases are accepted too)."""

    def __init__(self, registry: Registry[Any]):
        self.registry = registry

    def __contains__(self, value: object) -> bool:
        return value in self.registry

    def __iter__(self):
        return iter(self.registry.names())

    def __len__(self) -> int:
        return len(self.registry.names())

    def __repr__(self) -> str:
        return repr(self.registry.names())
