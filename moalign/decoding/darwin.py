"""Darwin: evolutionary reward-guided decoding (spec: shared/specs/darwin.md; Hung et al., 2024).

Exploration and exploitation are separate operators on the shared engine:

- **mutation** (exploration): the policy (or ``--mutator``) rewrites the instruction into ``n`` variants;
  row j of the group decodes from variant j. Two modes (``--mutation-mode``): ``one`` (default) samples
  ``--mutation-oversample`` x n replies to a few-shot request for *one* rewrite each and keeps the n usable ones
  closest in meaning to the request (:func:`parse_rewrite` says which are usable by their form, :class:`DriftCheck`
  drops those whose sentence embedding strays from the request; only the question of an instruction is
  rewritten, its set-up and the data below it are kept, :func:`split_request`); ``list`` asks once for a numbered list of n
  rewrites (the spec's operator). Slots left without a usable rewrite decode the parent instruction, and the run warns;
- **replacement** (exploitation): every ``m`` tokens all rows are scored against the ORIGINAL instruction;
  the top-k keep their state and every unfinished row outside them continues from a random top-k row's
  response, keeping its own instruction (the engine re-prefills it as its own prompt + the copied tokens).

An archive of instructions (seeded with the original, scored by one plain sample, which is decoded as an
extra row of the first cycle rather than before it) drives ``cycles`` outer iterations: pick a parent uniformly, mutate it, run one replacement cycle, add the two instructions most
often in the top-k when their beam beats the parent (dropping the parent if one was added). The best
response by reward over all cycles is the output; the best-so-far after every cycle is kept in the trace,
so one run reports MC = 1..N.

Ablations are methods of their own: ``sample-replace`` (the original instruction on every row, with
replacement) and ``mutate-bon`` (mutation, no replacement: best-of-n over the mutated instructions).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from moalign.compute import scoring_scope
from moalign.data.prompts import Prompt
from moalign.decoding.backend import Backend, BlockStep, DecodeResult, SamplingConfig, Selection
from moalign.decoding.darwin_settings import (  # noqa: F401  (the settings classes, importable from here too)
    Darwin,
    DarwinArgs,
    MutateBoN,
    SampleReplace,
    _Beams,
)
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.rewrites import (  # noqa: F401  (the public names re-exported: the older import path)
    DEFAULT_MUTATION_TEMPLATE,
    REWRITE_ASK,
    REWRITE_CONTEXT,
    REWRITE_EXAMPLES,
    DriftCheck,
    RequestParts,
    _stop_when_complete,
    _stop_when_decided,
    faithfulness,
    mutation_complete,
    mutation_prompt,
    parse_mutations,
    parse_rewrite,
    rewrite_decided,
    rewrite_request,
    split_request,
)
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import ValueFn, rounded, values_for_active
from moalign.objectives.base import objective_device


def with_instruction(prompt: Prompt, instruction: str) -> Prompt:
    """The conversation with its last user turn replaced by ``instruction``."""
    msgs = list(prompt.messages)
    msgs[-1] = {"role": "user", "content": instruction}
    return Prompt(tuple(msgs), id=prompt.id)


def replacement_parents(
    scores: torch.Tensor, done: torch.Tensor, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Darwin's exploitation step for one group: ``scores [K]``, ``done [K]`` ->
    (``parents [K]``: the top-k rows and finished rows keep their own state, every other row points at a
    random top-k row; ``top [top_k]``: the top-k rows, best first)."""
    K = scores.shape[0]
    top = torch.topk(scores, top_k).indices
    parents = torch.arange(K)
    keep = torch.zeros(K, dtype=torch.bool)
    keep[top] = True
    for j in range(K):
        if not keep[j] and not bool(done[j]):
            parents[j] = top[int(torch.randint(top_k, (1,), generator=generator))]
    return parents, top


class _ReplacementSelector:
    """The per-cycle selector: replacement every block (if ``replace``), argmax of the reward at the end.
    Keeps the top-k counts and the final values of every row for the archive. The first ``reserved`` rows
    of a group (the seed sample, decoded alongside the first cycle) take no part in the search: they are
    never replaced, never copied and never counted."""

    def __init__(
        self,
        value_fn: ValueFn,
        reward_fn: ValueFn,
        scal: Scalarization,
        top_k: int,
        replace: bool,
        P: int,
        K: int,
        reserved: int = 0,
    ):
        self.value_fn, self.reward_fn, self.scal = value_fn, reward_fn, scal
        self.top_k, self.replace = top_k, replace
        self.reserved = reserved
        self.counts = torch.zeros(P, K - reserved, dtype=torch.long)
        self.final_values: torch.Tensor | None = None
        self.final_scores: torch.Tensor | None = None

    def __call__(self, step: BlockStep) -> Selection:
        # partial responses are scored by the value function; complete ones by the reward itself
        v, active = values_for_active(step, self.reward_fn if step.final else self.value_fn)
        s = self.scal(v)  # [P, K]
        P, K = s.shape
        r = self.reserved
        parents = torch.arange(K).expand(P, K).clone()
        info: list[dict | None] = [None] * P
        for p in active.nonzero().flatten().tolist():
            beams = s[p, r:]
            top = torch.topk(beams, self.top_k).indices
            self.counts[p, top] += 1
            if step.final or not self.replace:
                continue
            par, _ = replacement_parents(beams, step.done[p, r:].cpu(), self.top_k, step.rng)
            parents[p, r:] = par + r
            info[p] = {
                "scores": rounded(beams),
                "top_k": top.tolist(),
                "parents": par.tolist(),
                "replaced": int((par != torch.arange(K - r)).sum()),
            }
        if step.final:
            self.final_values, self.final_scores = v, s
        return Selection(s[:, r:].argmax(dim=1) + r, info, parents)


@dataclass
class _PromptSearch:
    """One prompt's search over the cycles: its archive of (instruction prompt, reward), the best response so
    far, the compute spent, the trace; and this cycle's parent, instructions, beam prompts and mutation record."""

    prompt: Prompt
    archive: list[tuple[Prompt, float]]
    spent: DecodeResult
    best: DecodeResult | None = None
    best_r: float = float("-inf")
    best_cycle: int = 0
    trace: list[dict] = field(default_factory=list)
    parent: tuple[Prompt, float] | None = None
    instructions: list[str] = field(default_factory=list)
    beams: list[Prompt] = field(default_factory=list)
    mutation: dict | None = None


class DarwinDecoder:
    """Darwin and its ablations on the engine; see the module docstring."""

    n_outputs = 1

    def __init__(self, ctx: MethodContext, args: DarwinArgs, *, mutate: bool, replace: bool):
        self.ctx, self.args, self.mutate, self.replace = ctx, args, mutate, replace
        self.backend: Backend = ctx.backend
        self.value_fn = ctx.value_fn()
        self.reward = ctx.reward_fn()
        self.scal = ctx.scalarization()
        self.max_new_tokens = ctx.cfg.max_new_tokens
        self.template = args.template()
        #: mutation outcomes of the run so far (generate writes them to the run's meta)
        self.report = {"mutations": 0, "rewrites_wanted": 0, "rewrites_usable": 0, "failed": 0}
        self.mutator: Backend | None = None
        if mutate:
            sampling = SamplingConfig(temperature=args.mutation_temperature, top_k=args.mutation_top_k)
            if args.mutator:
                from moalign.decoding.in_process import TransformersBackend
                from moalign.policies import load_policy

                policy = load_policy(args.mutator, device=str(ctx.policy.device))
                self.mutator = TransformersBackend(policy, sampling, system_prompt=None)
            else:  # the policy itself, on the run's backend (in-process or server)
                self.mutator = ctx.backend_with(sampling)
            if hasattr(self.mutator, "share_prefix"):  # in process: the requests' few-shot prefix is prefilled
                self.mutator.share_prefix = 32  # once per batch (a server's prefix cache does this itself)
        #: where the drift check's sentence encoder runs: --objective-device, else the policy's device
        spec = getattr(ctx.cfg, "objective_device", None)
        policy_device = getattr(ctx.policy, "device", None)
        self.encoder_device = objective_device(spec, policy_device) if spec else torch.device(policy_device or "cpu")

    # -------------------------------------------------------------------------------------------- parts
    def _mutate(self, parents: list[Prompt], seed: int) -> tuple[list[list[str]], list[dict], list[DecodeResult]]:
        """n instructions per parent (slots without a usable rewrite decode the parent) and a trace entry per
        parent (the replies, what was made of them, how many rewrites were usable, the mutator's tokens) and
        the mutation's compute per parent (the mutator's decoding and the drift check's reads)."""
        if self.args.mutation_mode == "list":
            return self._mutate_list(parents, seed)
        n, m = self.args.mutations, self.args.mutations * self.args.mutation_oversample
        whole = [p.messages[-1]["content"] for p in parents]
        split = [split_request(w) for w in whole]  # the set-up and the data around the question are kept
        bases = [parts.request for parts in split]
        # a rewrite is about as long as its request: a budget of 16 tokens + ~3 per word of the longest
        budget = min(self.args.mutation_max_new_tokens, 16 + 3 * max(len(b.split()) for b in bases))
        stopped: set[tuple[int, int]] = set()
        drift = DriftCheck(split, self.args.mutation_min_similarity, self.encoder_device) \
            if self.args.mutation_min_similarity > 0 else None  # fmt: skip
        res = self.mutator.decode(
            [rewrite_request(pt.request, self.template, pt.before) for pt in split], k=m, block_size=4, max_new_tokens=budget,
            seed=seed, selector=_stop_when_decided(bases, n if drift is None else None, stopped), keep_all=True,
        )  # fmt: skip
        every = [[(None, "enough rewrites") if (i, k) in stopped else
                  parse_rewrite(row.response, parts.request, finished=row.finished) for k, row in enumerate(r.rows)]
                 for i, (parts, r) in enumerate(zip(split, res))]  # fmt: skip
        ok = [(i, k) for i, verdicts in enumerate(every) for k, (_, why) in enumerate(verdicts) if why == "ok"]
        sims = dict(zip(ok, drift.similarity([(i, every[i][k][0]) for i, k in ok]))) if drift is not None else {}
        out, info = [], []
        for i, (parts, r) in enumerate(zip(split, res)):
            verdicts = every[i]
            similarity: list[float | None] = [None] * len(verdicts)
            for k in range(len(verdicts)):  # the drift check, all prompts' rewrites encoded in one batch
                if (i, k) in sims:
                    similarity[k] = round(sims[(i, k)], 4)
                    if sims[(i, k)] < drift.threshold:
                        verdicts[k] = (None, "drift")
            # the first n distinct usable rewrites; with the drift check, the n most faithful (every reply decoded)
            order = sorted(range(len(verdicts)), key=lambda k: -(similarity[k] or 0.0)) if drift is not None \
                else range(len(verdicts))  # fmt: skip
            kept: list[str] = []
            for k in order:
                text, why = verdicts[k]
                if why == "ok" and text not in kept and len(kept) < n:
                    kept.append(text)
            out.append([parts.join(t) for t in kept] + [whole[i]] * (n - len(kept)))
            info.append({"mode": "one", "replies": [row.response for row in r.rows],
                         "verdicts": [why for _, why in verdicts], "parsed": len(kept),
                         "complete": len(kept) == n, "policy_tokens": r.policy_tokens, "similarity": similarity,
                         "scorer_tokens": drift.cost[i].scorer_tokens if drift is not None else 0})  # fmt: skip
            if drift is not None:
                r.add_compute(drift.cost[i])
            info[-1].update(policy_flops=r.policy_flops, scorer_flops=r.scorer_flops)
        return out, info, res

    def _mutate_list(
        self, parents: list[Prompt], seed: int
    ) -> tuple[list[list[str]], list[dict], list[DecodeResult]]:
        """``--mutation-mode list``: one reply per parent, a numbered list of n rewrites."""
        n = self.args.mutations
        asks = [
            Prompt(
                ({"role": "user", "content": mutation_prompt(self.template, p.messages[-1]["content"], n)},)
            )
            for p in parents
        ]
        res = self.mutator.decode(
            asks, k=1, block_size=16, max_new_tokens=self.args.mutation_max_new_tokens, seed=seed,
            selector=_stop_when_complete(n),
        )  # fmt: skip
        out, info = [], []
        for parent, r in zip(parents, res):
            items = parse_mutations(r.response, n)
            base = parent.messages[-1]["content"]
            out.append(items + [base] * (n - len(items)))
            info.append({"mode": "list", "reply": r.response, "parsed": len(items), "complete": len(items) == n,
                         "policy_tokens": r.policy_tokens, "policy_flops": r.policy_flops,
                         "scorer_flops": r.scorer_flops})  # fmt: skip
        return out, info, res

    def _warn_failed(self, info: list[dict | None]) -> None:
        """Count the mutation slots left to the parent instruction; warn when a prompt's mutation failed."""
        n = self.args.mutations
        done = [i for i in info if i is not None]
        failed = [i for i in done if i["parsed"] < n]
        self.report["mutations"] += len(done)
        self.report["rewrites_wanted"] += n * len(done)
        self.report["rewrites_usable"] += sum(i["parsed"] for i in done)
        self.report["failed"] += len(failed)
        if failed:
            missing = sum(n - i["parsed"] for i in failed)
            warnings.warn(
                f"darwin: the mutation of {len(failed)} of {len(done)} instruction(s) gave fewer than {n} usable "
                f"rewrites ({missing} beam(s) decode the parent instruction instead; see the records' trace)",
                stacklevel=2,
            )

    # --------------------------------------------------------------------------------------------- main
    def __call__(
        self, prompts: Sequence[Prompt], *, seed: int, prompt_indices: Sequence[int]
    ) -> list[list[DecodeResult]]:
        with scoring_scope():  # one scope for the scorers' caches over every cycle and the mutations
            return self._search(prompts, seed, prompt_indices)

    def _search(self, prompts, seed: int, prompt_indices) -> list[list[DecodeResult]]:
        a, T, n = self.args, self.max_new_tokens, self.args.mutations

        def sub(*parts) -> int:
            return zlib.crc32(":".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF

        rng = torch.Generator().manual_seed(sub("archive"))
        # the archive starts with the original instruction, scored by one plain sample (the first best);
        # that sample is decoded as an extra row of the first cycle (it needs nothing the cycle produces, and
        # the cycle needs nothing from it until its end), so it costs no extra sequential decoding
        states = [_PromptSearch(p, archive=[(p, float("nan"))], spent=DecodeResult.holder(p)) for p in prompts]
        for c in range(1, a.cycles + 1):
            seed_row = 1 if c == 1 else 0
            for st in states:  # each prompt's parent, drawn uniformly from its archive
                st.parent = st.archive[int(torch.randint(len(st.archive), (1,), generator=rng))]
            if self.mutate:
                instr, infos, costs = self._mutate([st.parent[0] for st in states], seed=sub("mutate", c))
                for st, ins, info, cost in zip(states, instr, infos, costs):
                    st.spent.add_compute(cost)
                    st.instructions, st.mutation = ins, info
                    st.beams = [with_instruction(st.parent[0], t) for t in ins]
                self._warn_failed(infos)
            else:
                for st in states:
                    st.instructions, st.mutation = [st.parent[0].messages[-1]["content"]] * n, None
                    st.beams = [st.parent[0]] * n
            sel = _ReplacementSelector(self.value_fn, self.reward, self.scal, a.replace_top_k, self.replace,
                                       len(states), n + seed_row, reserved=seed_row)  # fmt: skip
            res = self.backend.decode(
                [st.prompt for st in states], k=n + seed_row, block_size=a.replace_every if self.replace else T,
                max_new_tokens=T, selector=sel, seed=sub("cycle", c), keep_all=True, prompt_indices=prompt_indices,
                row_prompts=[[st.prompt] * seed_row + st.beams for st in states], recache=a.recache,
                hidden=self.ctx.hidden,
            )  # fmt: skip
            for i, (st, r) in enumerate(zip(states, res)):
                self._close_cycle(st, r, sel, i, c, seed_row)
        out = []
        for st in states:
            b = st.best
            result = DecodeResult(prompt=st.prompt, response=b.response, token_ids=b.token_ids, finished=b.finished,
                                  trace=st.trace, token_logprobs=b.token_logprobs, row_prompt=b.row_prompt,
                                  policy_flops=0.0)  # fmt: skip
            result.add_compute(st.spent)
            out.append([result])
        return out

    def _close_cycle(self, st: _PromptSearch, r, sel: _ReplacementSelector, i: int, c: int, seed_row: int) -> None:
        """The end of cycle ``c`` for one prompt (row ``i`` of the batch): the seed sample in cycle 1, the
        archive update, the best so far, the compute, the trace entry."""
        n, scores = self.args.mutations, sel.final_scores
        if seed_row:
            seed_r = float(scores[i, 0])
            st.archive = [(st.prompt, seed_r)]
            st.parent = st.archive[0]
            st.best, st.best_r = r.rows[0], seed_r
            st.trace.append({"cycle": 0, "seed_sample": True, "reward": round(seed_r, 4),
                             "values": rounded(sel.final_values[i, 0]), "response": r.rows[0].response,
                             "policy_tokens": 0, "decoded_with_cycle": 1})  # fmt: skip
        s = scores[i, seed_row:]
        rows = r.rows[seed_row:]
        j = int(s.argmax())
        # archive: the two instructions most often in the top-k, when their beam beats the parent
        order = sorted(range(n), key=lambda b: (-int(sel.counts[i, b]), -float(s[b]), b))
        added = []
        parent_prompt, parent_r = st.parent
        if self.mutate:
            known = {pp.messages[-1]["content"] for pp, _ in st.archive}
            for b in order[:2]:
                if float(s[b]) > parent_r and st.instructions[b] not in known:
                    st.archive.append((st.beams[b], float(s[b])))
                    known.add(st.instructions[b])
                    added.append(b)
            if added and len(st.archive) > 1:
                st.archive = [e for e in st.archive if e[0] is not parent_prompt]
        if float(s[j]) > st.best_r:
            st.best, st.best_r, st.best_cycle = rows[j], float(s[j]), c
        st.spent.add_compute(r)
        st.trace.append({
            "cycle": c,
            "parent": parent_prompt.messages[-1]["content"],
            "parent_reward": round(parent_r, 4),
            "instructions": st.instructions,
            "mutation": st.mutation,
            "replacements": [b for b in r.trace if "replaced" in b],
            "n_replaced": sum(b.get("replaced", 0) for b in r.trace),
            "top_k_counts": sel.counts[i].tolist(),
            "beam_rewards": rounded(s),
            "best_beam": j,
            "cycle_best_reward": round(float(s[j]), 4),
            "archive_added": added,
            "archive": [[pp.messages[-1]["content"], round(rw, 4)] for pp, rw in st.archive],
            "best_so_far": {"cycle": st.best_cycle, "reward": round(st.best_r, 4), "response": st.best.response},
            "policy_tokens": r.policy_tokens,  # this cycle's decoding (the seed row's too in cycle 1)
            "scorer_tokens": r.scorer_tokens,  # this cycle's scoring (replacements and the final one)
            "policy_flops": r.policy_flops,
            "scorer_flops": r.scorer_flops,
        })  # fmt: skip

def _builder(mutate: bool, replace: bool):
    def build(ctx: MethodContext, args: _Beams) -> DarwinDecoder:
        full = args if isinstance(args, Darwin) else Darwin(**asdict(args))  # an ablation: Darwin's other defaults
        return DarwinDecoder(ctx, full, mutate=mutate, replace=replace)

    return build


register_method(MethodSpec(
    "darwin",
    "evolutionary decoding: `--cycles` of instruction mutation into `--mutations` beams with reward-guided "
    "replacement every `--replace-every` tokens (top `--replace-top-k` kept); reward = `--scalarization`",
    Darwin, _builder(mutate=True, replace=True),
))  # fmt: skip
register_method(MethodSpec(
    "sample-replace", "Darwin without mutation: `--mutations` beams of the original instruction, with replacement",
    SampleReplace, _builder(mutate=False, replace=True),
))  # fmt: skip
register_method(MethodSpec(
    "mutate-bon", "Darwin without replacement: best-of-n over mutated instructions, archive as in Darwin",
    MutateBoN, _builder(mutate=True, replace=False),
))  # fmt: skip
