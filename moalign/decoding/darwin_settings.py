"""The settings of Darwin and its two ablations (:class:`Darwin`, :class:`SampleReplace`, :class:`MutateBoN`):
beams and cycles, replacement, mutation; each class is exactly the settings its method has. The search is
:mod:`moalign.decoding.darwin`, the rewrite operator :mod:`moalign.decoding.rewrites`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moalign.configbase import config_field as _f
from moalign.decoding.backend import RECACHE
from moalign.decoding.rewrites import DEFAULT_MUTATION_TEMPLATE
from moalign.decoding.settings import (
    MethodSettings,
    check_scalarization,
    check_values,
    scalarization_field,
    values_field,
)
from moalign.errors import MoalignError

__all__ = ["Darwin", "DarwinArgs", "MutateBoN", "SampleReplace"]


@dataclass
class _Beams(MethodSettings):
    mutations: int = _f(5, "beams per cycle, one per mutated instruction (n)")
    cycles: int = _f(3, "mutation cycles (the best-so-far after each one is kept: MC = 1..N)")
    replace_top_k: int = _f(3, "beams kept at each replacement (top-k); the others copy one of them")
    scalarization: str = scalarization_field()
    values: str = values_field()

    def check(self) -> None:
        super().check()
        self.at_least(1, "mutations", "cycles")
        if not isinstance(self.replace_top_k, int) or not 1 <= self.replace_top_k <= self.mutations:
            self.fail("replace_top_k", f"must be between 1 and mutations ({self.mutations}), got {self.replace_top_k!r}")
        check_scalarization(self)
        check_values(self)


@dataclass
class _Replacement(_Beams):
    replace_every: int = _f(40, "score the beams and replace the weak ones every m tokens")
    recache: str = _f(
        "reprefill",
        "a replaced beam keeps its own instruction and is re-encoded (reprefill), or takes the copied beam's "
        "cache whole (copy: cheaper, continues under the other instruction)",
        choices=RECACHE,
    )

    def check(self) -> None:
        super().check()
        self.at_least(1, "replace_every")
        self.one_of("recache", RECACHE)


@dataclass
class _Mutation(_Beams):
    mutation_mode: str = _f(
        "one",
        "one (sample one rewrite per request, keep the usable ones) or list (one request for a numbered list "
        "of n rewrites)",
        choices=("one", "list"),
    )
    mutation_oversample: int = _f(
        3,
        "mutation mode one: requests per wanted rewrite (the n most faithful usable replies are kept; the first "
        "n with mutation_min_similarity 0)",
    )
    mutation_min_similarity: float = _f(
        0.7,
        "mutation mode one: a rewrite whose sentence embedding (MiniLM) has a cosine similarity below this with "
        "its request (or the request with its set-up) is dropped as drift; 0 turns the check off",
    )
    mutation_template: str | None = _f(
        None,
        "file with the mutation prompt ({instruction} and, in list mode, {n} slots); default: built in (a "
        "few-shot request for one rewrite, or the numbered-list request)",
    )
    mutator: str | None = _f(None, "model that mutates instructions (default: the policy)")
    mutation_temperature: float = _f(0.7, "sampling temperature of the mutator")
    mutation_top_k: int = _f(40, "top-k sampling of the mutator")
    mutation_max_new_tokens: int = _f(160, "token budget of one mutation reply")

    def check(self) -> None:
        super().check()
        self.at_least(1, "mutation_oversample", "mutation_max_new_tokens")
        sim = self.mutation_min_similarity
        if not isinstance(sim, int | float) or not 0.0 <= sim <= 1.0:
            self.fail("mutation_min_similarity", f"must be between 0 and 1, got {sim!r}")
        self.one_of("mutation_mode", ("one", "list"))
        self.template()  # a bad template fails here, before any decoding

    def template(self) -> str | None:
        """The user's mutation prompt, the built-in list prompt, or None (the built-in few-shot request)."""
        if self.mutation_template is None:
            return DEFAULT_MUTATION_TEMPLATE if self.mutation_mode == "list" else None
        p = Path(self.mutation_template)
        if not p.is_file():
            raise MoalignError(f"mutation template not found: {self.mutation_template}")
        text = p.read_text(encoding="utf-8")
        if "{instruction}" not in text:
            raise MoalignError(f"mutation template {self.mutation_template} has no {{instruction}} slot")
        return text


@dataclass
class Darwin(_Mutation, _Replacement):
    """Darwin: ``cycles`` of instruction mutation into ``mutations`` beams, with reward-guided replacement
    every ``replace_every`` tokens (the top ``replace_top_k`` kept); reward = ``scalarization``."""


@dataclass
class SampleReplace(_Replacement):
    """Darwin without mutation: ``mutations`` beams of the original instruction, with replacement."""


@dataclass
class MutateBoN(_Mutation):
    """Darwin without replacement: best-of-n over mutated instructions, archive as in Darwin."""


DarwinArgs = Darwin  # the older name
