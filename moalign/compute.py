"""What the models of a run actually read, and what it cost in FLOPs.

Compute is counted per model as ``2 x non-embedding parameters x tokens read`` (the forward-pass estimate of
Kaplan et al., 2020): parameters are counted from the loaded module (every parameter once, less those of its
embedding tables), tokens are the ones the model actually read. A cache hit reads nothing; two objectives that
read one model's outputs make it read once.

How scorers report. Code that runs a model calls :func:`record_read` with the tokens each item made the model
read; a caller that wants the count opens :func:`count_reads` over ``n`` items (pairs) and gets a
:class:`Reads`. :meth:`moalign.objectives.base.Objective.score` sets the offset of each of its batches, so a
model reports per pair of the batch it was given. Outside :func:`count_reads` nothing is recorded.

Caches. A scorer's caches (the MiniLM embeddings of a prompt) live in a :func:`scoring_scope`: one per search
(a ``generate`` batch, a Darwin call), so that what a method is charged does not depend on what ran before it
in the same process.
"""

from __future__ import annotations

import contextvars
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

FORMULA = "2 x non-embedding parameters x tokens read, per model (cache hits read nothing)"


@dataclass(frozen=True)
class ModelCost:
    """A model as compute is counted: its name (how records and the meta list it), its non-embedding
    parameter count and an identity (one model shared by several objectives is one identity)."""

    name: str
    params: int
    key: Hashable = None

    @property
    def identity(self) -> Hashable:
        return self.key if self.key is not None else self.name

    def flops(self, tokens: float) -> float:
        return 2.0 * self.params * float(tokens)


def non_embedding_parameters(module) -> int:
    """Parameters of a torch module, each counted once (tied weights once), less those of its embedding
    tables (``torch.nn.Embedding`` modules: token, position and token-type embeddings)."""
    from torch import nn

    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb: set[int] = set()
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            for p in m.parameters(recurse=False):
                if id(p) not in emb:
                    emb.add(id(p))
                    total -= p.numel()
    return int(total)


_COSTS: dict[int, ModelCost] = {}
#: every model counted in this process: name -> non-embedding parameters (what a run's meta lists)
KNOWN: dict[str, int] = {}


def model_cost(module, name: str) -> ModelCost:
    """The :class:`ModelCost` of a loaded module (parameters counted once per module object)."""
    key = id(module)
    c = _COSTS.get(key)
    if c is None or c.name != name:
        c = ModelCost(name=name, params=non_embedding_parameters(module), key=("module", key))
        _COSTS[key] = c
    KNOWN[c.name] = c.params
    return c


class Reads:
    """Tokens each model read, per item: ``by_model[identity] = (ModelCost, [tokens of item 0, ...])``."""

    def __init__(self, n: int):
        self.n = int(n)
        self.by_model: dict[Hashable, tuple[ModelCost, list[int]]] = {}

    def add(self, model: ModelCost, tokens: Sequence[int], offset: int = 0) -> None:
        tokens = [int(t) for t in tokens]
        if offset < 0 or offset + len(tokens) > self.n:
            raise ValueError(f"reads of {len(tokens)} items at offset {offset} do not fit {self.n} items")
        _, row = self.by_model.setdefault(model.identity, (model, [0] * self.n))
        for i, t in enumerate(tokens):
            row[offset + i] += t

    def merge(self, other: Reads, offset: int = 0) -> None:
        for model, row in other.by_model.values():
            self.add(model, row, offset)

    def tokens(self) -> list[int]:
        """Tokens read per item, all models together."""
        out = [0] * self.n
        for _, row in self.by_model.values():
            out = [a + b for a, b in zip(out, row)]
        return out

    def flops(self) -> list[float]:
        """FLOPs per item, all models together."""
        out = [0.0] * self.n
        for model, row in self.by_model.values():
            out = [a + model.flops(b) for a, b in zip(out, row)]
        return out

    def grouped(self, size: int) -> Reads:
        """Items summed over consecutive groups of ``size`` (pairs of K candidates -> groups)."""
        if size < 1 or self.n % size:
            raise ValueError(f"{self.n} items do not split into groups of {size}")
        out = Reads(self.n // size)
        for model, row in self.by_model.values():
            out.add(model, [sum(row[i : i + size]) for i in range(0, self.n, size)])
        return out

    def by_name(self, i: int) -> dict[str, int]:
        """Item ``i``'s tokens by model name (models that read nothing for it left out)."""
        return {m.name: row[i] for m, row in self.by_model.values() if row[i]}


_ACTIVE: contextvars.ContextVar[Reads | None] = contextvars.ContextVar("moalign_reads", default=None)
_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("moalign_reads_offset", default=0)
_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("moalign_scoring_scope", default=None)


@contextmanager
def count_reads(n: int) -> Iterator[Reads]:
    """Collect what models read while scoring ``n`` items (an inner :func:`count_reads` collects its own)."""
    reads = Reads(n)
    t1, t2 = _ACTIVE.set(reads), _OFFSET.set(0)
    try:
        yield reads
    finally:
        _ACTIVE.reset(t1)
        _OFFSET.reset(t2)


@contextmanager
def at_offset(offset: int) -> Iterator[None]:
    """Reads recorded inside are for items ``offset, offset + 1, ...`` of the active :func:`count_reads`."""
    token = _OFFSET.set(_OFFSET.get() + int(offset))
    try:
        yield
    finally:
        _OFFSET.reset(token)


def record_read(model: ModelCost, tokens: Sequence[int]) -> None:
    """A model read ``tokens[i]`` tokens for item i (of the current batch); nothing when not counting."""
    reads = _ACTIVE.get()
    if reads is not None:
        reads.add(model, tokens, _OFFSET.get())


def counting() -> bool:
    return _ACTIVE.get() is not None


@contextmanager
def scoring_scope(reuse: bool = True) -> Iterator[dict]:
    """A fresh store for scorers' caches (see :func:`scope_store`); ``reuse``: join the scope already open."""
    current = _SCOPE.get()
    if reuse and current is not None:
        yield current
        return
    token = _SCOPE.set({})
    try:
        yield _SCOPE.get()
    finally:
        _SCOPE.reset(token)


def scope_store(name: str, factory):
    """The active scope's cache called ``name`` (made by ``factory()`` on first use), or None outside a
    scope."""
    scope = _SCOPE.get()
    if scope is None:
        return None
    if name not in scope:
        scope[name] = factory()
    return scope[name]
