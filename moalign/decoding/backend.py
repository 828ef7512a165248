"""The interface every decoding backend implements, and the types the blockwise loop and the selectors share.

A *backend* holds a policy (in process, or behind a server) and knows how to advance rows of text. The one
blockwise loop (:mod:`moalign.decoding.loop`) drives any backend with a *selector*, the way transformers'
beam search drives a model and reorders its cache:

- ``prefill`` starts one row per rendered prompt (rows come in groups of K, one group per original prompt;
  each row may have its own prompt, e.g. a Darwin beam's mutated instruction);
- ``extend`` advances every running row by up to B tokens;
- ``read`` returns the rows' texts, token ids, ended flags (and last hidden states where the backend has them);
- ``finish`` ends rows as if they had produced an end-of-turn token (a selector's stop condition);
- ``reindex`` makes every row continue from a parent row (copying its state), re-prefilling the rows named in
  ``reprefill`` under their own prompt + the copied response tokens;
- ``output`` is one row's final response; ``with_sampling`` another backend on the same policy with other
  sampling settings (Darwin's mutator); ``close`` releases connections.

What a backend can do is declared in :attr:`Backend.capabilities` (never probed by callers): last-layer
hidden states (for value heads), exact token ids of what was generated, several choices per request.

Every verb that makes the policy read tokens returns, per row, how many it read, so the loop counts the
policy's compute per group (``DecodeResult.policy_tokens``): each distinct prompt of a group once, every
token fed to the model, and the re-prefill of a moved row. Scorers (objectives, value functions) add their
own reads to ``BlockStep.cost`` (``DecodeResult.scorer_tokens``, ``scored_pairs``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from moalign.compute import ModelCost, Reads
from moalign.data.prompts import Prompt
from moalign.errors import MoalignError

RECACHE = ("reprefill", "copy")


@dataclass
class SamplingConfig:
    """How tokens are drawn from the policy. ``temperature=0`` means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise MoalignError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoalignError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoalignError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond text in, text out (declared by the backend, read by the methods)."""

    hidden_states: bool = False  # last-layer hidden state of each row's last token (value heads need it)
    token_ids: bool = False  # the exact token ids generated (no re-tokenisation at block boundaries)
    n_choices: bool = False  # several continuations of one state in one request


class ScoringCost:
    """What the scorers read while a batch was decoded, per group (keyed by the group's prompt index).

    ``pairs``: (prompt, response) pairs scored (each by every objective of the run, or by the value heads);
    ``tokens`` and ``flops``: what the scorers' models actually read for them, and its cost
    (:mod:`moalign.compute`); ``models``: tokens by model name."""

    def __init__(self) -> None:
        self.pairs: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.flops: dict[int, float] = {}
        self.models: dict[int, dict[str, int]] = {}

    def add(self, prompt_indices: Sequence[int], pairs: Sequence[int], reads: Reads) -> None:
        if reads.n != len(prompt_indices):
            raise ValueError(f"reads of {reads.n} groups for {len(prompt_indices)} groups")
        for j, (i, n, t, f) in enumerate(zip(prompt_indices, pairs, reads.tokens(), reads.flops())):
            self.pairs[i] = self.pairs.get(i, 0) + int(n)
            self.tokens[i] = self.tokens.get(i, 0) + int(t)
            self.flops[i] = self.flops.get(i, 0.0) + float(f)
            by = self.models.setdefault(i, {})
            for name, tok in reads.by_name(j).items():
                by[name] = by.get(name, 0) + tok


@dataclass
class BlockStep:
    """What a selector sees after each block, for the P groups of the batch.

    ``texts[p][k]`` is row k's whole response so far for group ``prompts[p]`` (the original prompt, which
    objectives score against); ``row_prompts[p][k]`` is the prompt row k decodes from. ``done[p, k]`` says
    whether that row has ended (end-of-turn token); ``final`` is True when no further block follows (every
    row ended, or the token budget is spent). ``rng`` is a CPU generator seeded from the batch seed, for a
    selector's own randomness (so a resumed run draws the same). Scorers add what they read to ``cost``.
    """

    prompts: list[Prompt]
    prompt_indices: list[int]
    texts: list[list[str]]
    token_ids: torch.Tensor  # [P, K, T] response tokens so far (pad after the end)
    done: torch.Tensor  # [P, K] bool
    block_index: int
    final: bool
    #: [P, K, H] last-layer hidden state of each row's last token (end-of-turn token for ended rows);
    #: only when the loop was asked for it (``hidden=True``), e.g. for value heads
    last_hidden: torch.Tensor | None = None
    row_prompts: list[list[Prompt]] | None = None
    rng: torch.Generator | None = None
    cost: ScoringCost | None = None

    def subset(self, idx: list[int]) -> BlockStep:
        """The same step for groups ``idx`` only (sharing ``rng`` and ``cost``)."""
        return dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in idx],
            prompt_indices=[self.prompt_indices[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            token_ids=self.token_ids[idx],
            done=self.done[idx],
            last_hidden=self.last_hidden[idx] if self.last_hidden is not None else None,
            row_prompts=[self.row_prompts[i] for i in idx] if self.row_prompts is not None else None,
        )

    def add_cost(self, pairs: torch.Tensor | Sequence[int], reads: Reads) -> None:
        """Scorers: ``pairs[p]`` pairs scored and ``reads`` (over the P groups) what their models read for
        group p of this step."""
        if self.cost is not None:
            self.cost.add(self.prompt_indices, [int(x) for x in pairs], reads)


@dataclass
class Selection:
    """A selector's answer.

    ``chosen [P]``: the row whose response is the group's output (read at the final step).
    ``parents [P, K]``: the row (within the group) each row continues from; ``None`` broadcasts ``chosen``.
    ``info``: a JSON-able trace entry per group (or None).
    ``finish [P, K]``: rows to end here as if they had produced an end-of-turn token (a stop condition).
    """

    chosen: torch.Tensor
    info: list[dict | None] | None = None
    parents: torch.Tensor | None = None
    finish: torch.Tensor | None = None


Selector = Callable[[BlockStep], Selection]


@dataclass
class DecodeResult:
    prompt: Prompt
    response: str
    token_ids: list[int]
    finished: bool  # ended with an end-of-turn token (False: cut by max_new_tokens)
    trace: list[dict] = field(default_factory=list)
    candidates: list[str] | None = None  # every row's final text (keep_all=True)
    token_logprobs: list[float] | None = None  # log pi(token | prefix) of each response token, untempered
    rows: list[DecodeResult] | None = None  # every row's result (keep_all=True)
    policy_tokens: int = 0  # tokens the policy processed for this group (prefill included)
    row_prompt: Prompt | None = None  # the prompt this row decoded from (when it differs from ``prompt``)
    scorer_tokens: int = 0  # tokens the scorers (objectives, value functions) read for this group
    scored_pairs: int = 0  # (prompt, response) pairs the scorers scored for this group
    #: FLOPs (``moalign.compute.FORMULA``) of the policy's reads (None: its parameter count is unknown, a
    #: served policy) and of the scorers' reads for this group
    policy_flops: float | None = None
    scorer_flops: float = 0.0
    scorer_reads: dict[str, int] = field(default_factory=dict)  # the scorers' tokens by model name
    policy_seconds: float = 0.0  # wall time in the policy's verbs (prefill, extend, reindex), this group's share
    scorer_seconds: float = 0.0  # wall time in the selector (scoring and selection), this group's share

    @property
    def forward_tokens(self) -> int:
        """The older name of :attr:`policy_tokens` (read only)."""
        return self.policy_tokens

    @classmethod
    def holder(cls, prompt: Prompt | None = None) -> DecodeResult:
        """An empty result that only accumulates compute (:meth:`add_compute`), the policy's FLOPs at zero."""
        return cls(prompt if prompt is not None else Prompt(()), "", [], False, policy_flops=0.0)

    def add_compute(self, other: DecodeResult) -> None:
        """Add ``other``'s compute (tokens, FLOPs, seconds) to this result's (a search of several passes)."""
        self.policy_tokens += other.policy_tokens
        self.scorer_tokens += other.scorer_tokens
        self.scored_pairs += other.scored_pairs
        self.policy_flops = None if self.policy_flops is None or other.policy_flops is None \
            else self.policy_flops + other.policy_flops  # fmt: skip
        self.scorer_flops += other.scorer_flops
        for name, t in other.scorer_reads.items():
            self.scorer_reads[name] = self.scorer_reads.get(name, 0) + t
        self.policy_seconds += other.policy_seconds
        self.scorer_seconds += other.scorer_seconds

    def take_share(self, group: DecodeResult, k: int) -> None:
        """This row's compute: a 1/k share of its group's (k rows that are each an output, plain sampling)."""
        self.policy_tokens, self.scorer_tokens = group.policy_tokens // k, group.scorer_tokens // k
        self.scored_pairs = group.scored_pairs // k
        self.policy_flops = group.policy_flops / k if group.policy_flops is not None else None
        self.scorer_flops = group.scorer_flops / k
        self.scorer_reads = {m: t // k for m, t in group.scorer_reads.items()}
        self.policy_seconds, self.scorer_seconds = group.policy_seconds / k, group.scorer_seconds / k


@dataclass
class RowsView:
    """What ``Backend.read`` returns for the R = P x K rows of a decode."""

    texts: list[str]  # each row's response so far, stripped
    token_ids: torch.Tensor  # [R, T] response tokens so far (padded)
    done: torch.Tensor  # [R] bool
    hidden: torch.Tensor | None = None  # [R, H], when asked for and the backend has them


@dataclass
class RowOutput:
    """One row's final response, as ``Backend.output`` returns it."""

    response: str
    token_ids: list[int]
    finished: bool
    token_logprobs: list[float] | None


@runtime_checkable
class Backend(Protocol):
    """A policy that advances rows of text; see the module docstring. ``Rows`` objects are the backend's
    own (its row state for one decode); the loop only passes them back."""

    capabilities: Capabilities
    sampling: SamplingConfig
    #: the policy as compute is counted (``moalign.compute.model_cost``), or None when its parameter count is
    #: unknown (a served policy)
    model_cost: ModelCost | None

    def render(self, prompt: Prompt) -> str:
        """The prompt as the policy reads it (chat template, system prompt)."""

    def prefill(
        self, rendered: list[str], group_of: list[int], seed: int, hidden: bool
    ) -> tuple[Any, list[int]]:
        """Start a row per rendered prompt (``group_of[r]``: row r's group); returns the rows and the tokens
        the policy read per row (each distinct prompt of a group once)."""

    def extend(self, rows: Any, steps: int, last: bool) -> tuple[int, list[int]]:
        """Advance every running row by up to ``steps`` tokens (``last``: no block follows). Returns the
        tokens advanced (fewer when every row ended) and the tokens the policy read per row."""

    def read(self, rows: Any) -> RowsView: ...

    def finish(self, rows: Any, mask: torch.Tensor) -> None: ...

    def reindex(self, rows: Any, src: list[int], reprefill: list[int]) -> list[int]:
        """Row r continues from row ``src[r]``; rows ``reprefill`` are re-read under their own prompt + the
        copied response. Returns the tokens the policy read per row."""

    def output(self, rows: Any, r: int) -> RowOutput: ...

    def with_sampling(self, sampling: SamplingConfig, system_prompt: str | None = None) -> Backend: ...

    def close(self) -> None: ...


def first_candidate(step: BlockStep) -> Selection:
    """The trivial selector: every row keeps its own state; the output is row 0."""
    P, K = step.done.shape
    return Selection(torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K))


def strip_eos(ids: list[int], eos: Sequence[int]) -> list[int]:
    """Response tokens up to (excluding) the first end-of-turn token."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out
