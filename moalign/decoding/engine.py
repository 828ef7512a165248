"""Batched blockwise decoding with KV-cache reuse, per-row prompts and parent pointers.

The engine decodes P *groups* at a time, each with K rows. A group answers one original prompt (what the
objectives score against); each row decodes from its own prompt (by default the group's prompt; a search
method such as Darwin gives row j a mutated instruction). Every B tokens a *selector* sees all rows and
returns, per row, the row it continues from (``parents [P, K]``, within the group), the way transformers'
beam search reorders its cache:

- plain sampling: the identity (every row keeps its own state);
- best-of-N, controlled decoding, RMOD: every row continues from the group's chosen row (the winner is
  broadcast);
- Darwin: the top-k rows keep their state, every other unfinished row copies a random top-k row.

The KV cache follows the parents by an index-select (no re-encoding). A row whose own prompt differs from
its parent's keeps its own prompt: it is re-prefilled as its own prompt + the copied response tokens
(``recache="reprefill"``, only those rows are), or takes the parent's cache whole (``recache="copy"``:
cheaper, but the row then continues conditioned on the parent's prompt).

Rows that reach an end-of-turn token stop (later positions are padding and are ignored). The final block
may be shorter than B. ``DecodeResult.forward_tokens`` counts, per group, the tokens the model processed for
it (prompt prefill, every fed token of a running row, re-prefills), so methods can be compared at matched
compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from moalign.data.prompts import Prompt
from moalign.errors import MoalignError
from moalign.policies import Policy, eos_token_ids, render_chat

# transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated there)
_CACHE_KW = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
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


@dataclass
class BlockStep:
    """What a selector sees after each block, for the P groups of the batch.

    ``texts[p][k]`` is row k's whole response so far for group ``prompts[p]`` (the original prompt, which
    objectives score against); ``row_prompts[p][k]`` is the prompt row k decodes from. ``done[p, k]`` says
    whether that row has ended (end-of-turn token); ``final`` is True when no further block follows (every
    row ended, or the token budget is spent). ``rng`` is a CPU generator seeded from the batch seed, for a
    selector's own randomness (so a resumed run draws the same).
    """

    prompts: list[Prompt]
    prompt_indices: list[int]
    texts: list[list[str]]
    token_ids: torch.Tensor  # [P, K, T] response tokens so far (pad after the end)
    done: torch.Tensor  # [P, K] bool
    block_index: int
    final: bool
    #: [P, K, H] last-layer hidden state of each row's last token (end-of-turn token for ended rows);
    #: only when the engine was asked for it (``need_hidden=True``), e.g. for value heads
    last_hidden: torch.Tensor | None = None
    row_prompts: list[list[Prompt]] | None = None
    rng: torch.Generator | None = None

    def subset(self, idx: list[int]) -> BlockStep:
        """The same step for groups ``idx`` only."""
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
    forward_tokens: int = 0  # tokens the model processed for this group (prefill included)
    row_prompt: Prompt | None = None  # the prompt this row decoded from (when it differs from ``prompt``)


def first_candidate(step: BlockStep) -> Selection:
    """The trivial selector: every row keeps its own state; the output is row 0."""
    P, K = step.done.shape
    return Selection(torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K))



def check_decode_args(prompts, k, block_size, max_new_tokens, recache, row_prompts, prompt_indices):
    """What every engine's ``decode`` checks first: ``(prompts as a list, prompt indices)`` or a one-line
    :class:`MoalignError` naming the bad argument."""
    if k < 1:
        raise MoalignError(f"K (candidates per block) must be >= 1, got {k}")
    if block_size < 1:
        raise MoalignError(f"block size must be >= 1, got {block_size}")
    if max_new_tokens < 1:
        raise MoalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if recache not in RECACHE:
        raise MoalignError(f"recache must be one of {RECACHE}, got {recache!r}")
    prompts = list(prompts)
    P = len(prompts)
    if row_prompts is not None and (len(row_prompts) != P or any(len(r) != k for r in row_prompts)):
        raise MoalignError(f"row_prompts must be {P} groups of K={k} prompts")
    indices = list(prompt_indices) if prompt_indices is not None else list(range(P))
    return prompts, indices

class BlockwiseEngine:
    """Blockwise K-row decoding on one policy; see the module docstring."""

    def __init__(
        self,
        policy: Policy,
        sampling: SamplingConfig | None = None,
        system_prompt: str | None = None,
        need_hidden: bool = False,
    ):
        self.policy = policy
        self.need_hidden = need_hidden
        self.model = policy.model
        self.tok = policy.tokenizer
        self.sampling = sampling or SamplingConfig()
        self.sampling.validate()
        self.system_prompt = system_prompt
        self.eos_ids = torch.tensor(eos_token_ids(self.tok, self.model), dtype=torch.long)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else int(self.eos_ids[0])
        warpers = []
        s = self.sampling
        if s.temperature > 0 and s.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k > 0:
            warpers.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(s.top_p))
        self.warpers = LogitsProcessorList(warpers)

    # ------------------------------------------------------------------ helpers
    def render(self, prompt: Prompt) -> str:
        return render_chat(self.tok, prompt.messages, self.system_prompt)

    def encode(self, texts: list[str]):
        """Left-padded token ids of rendered prompts (padding side passed per call, never set on the
        shared tokenizer)."""
        return self.tok(
            texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )

    def _next_tokens(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Sample (or argmax) one token per row from the warped distribution."""
        if self.sampling.temperature == 0:
            return logits.argmax(dim=-1)
        scores = self.warpers(None, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _forward(self, ids, attn, cache):
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.need_hidden,
            **{_CACHE_KW: cache},
        )
        hidden = out.hidden_states[-1][:, -1, :] if self.need_hidden else None
        return out.logits[:, -1, :], cache, hidden

    def _reprefill(self, rows, rendered, resp, attn, cache, logits, last_h, fwd, group_of):
        """Re-encode ``rows`` as their own prompt + their (copied) response tokens and splice the new KV
        entries, logits and hidden states into the batch (left-padding whichever side is shorter)."""
        device = attn.device
        enc = self.encode([rendered[r] for r in rows])
        ids = torch.cat([enc.input_ids.to(device), resp[rows]], dim=1)
        a_new = torch.cat([enc.attention_mask.to(device), torch.ones_like(resp[rows])], dim=1)
        # the splice below assumes every layer's keys span the whole attention mask (full-attention layers)
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            raise MoalignError(
                "re-prefilling rows is not supported for sliding-window caches; use recache='copy'"
            )
        fwd.index_add_(0, group_of[rows], a_new.sum(dim=1).to(fwd.dtype))
        lg, new_cache, hid = self._forward(ids, a_new, self._new_cache())
        L = max(attn.shape[1], a_new.shape[1])
        attn = _left_pad(attn, L, 0)
        a_new = _left_pad(a_new, L, 0)
        for old, new in zip(cache.layers, new_cache.layers):
            old.keys = _left_pad(old.keys, L, 0.0, dim=-2)
            old.values = _left_pad(old.values, L, 0.0, dim=-2)
            old.keys[rows] = _left_pad(new.keys, L, 0.0, dim=-2)
            old.values[rows] = _left_pad(new.values, L, 0.0, dim=-2)
        attn[rows] = a_new
        logits = logits.clone()
        logits[rows] = lg.to(logits.dtype)
        if last_h is not None and hid is not None:
            last_h = last_h.clone()
            last_h[rows] = hid
        return attn, cache, logits, last_h

    # ------------------------------------------------------------------ main loop
    @torch.inference_mode()
    def decode(
        self,
        prompts: Sequence[Prompt],
        *,
        k: int,
        block_size: int,
        max_new_tokens: int,
        selector: Selector = first_candidate,
        seed: int = 0,
        keep_all: bool = False,
        prompt_indices: Sequence[int] | None = None,
        on_block: Callable[[int], None] | None = None,
        row_prompts: Sequence[Sequence[Prompt]] | None = None,
        recache: str = "reprefill",
    ) -> list[DecodeResult]:
        """Decode one batch of P groups of K rows. ``row_prompts[p][k]`` (default: ``prompts[p]``) is the
        prompt row k of group p decodes from. ``on_block(n_new_tokens)`` is called after every block."""
        prompts, indices = check_decode_args(prompts, k, block_size, max_new_tokens, recache, row_prompts,
                                             prompt_indices)  # fmt: skip
        if not prompts:
            return []
        P = len(prompts)
        device = self.policy.device
        gen = torch.Generator(device=device).manual_seed(int(seed))
        rng = torch.Generator().manual_seed(int(seed) ^ 0x5EED5)

        # ---- prefill: each distinct prompt of a group once, expanded to its rows
        group_rendered = [self.render(p) for p in prompts]
        if row_prompts is None:
            rendered = [t for t in group_rendered for _ in range(k)]
            uniq, uniq_group = group_rendered, list(range(P))
            expand = torch.arange(P).repeat_interleave(k)
        else:
            rendered, uniq, uniq_group, inv = [], [], [], []
            for p, row in enumerate(row_prompts):
                local: dict[str, int] = {}
                for rp in row:
                    text = self.render(rp)
                    rendered.append(text)
                    if text not in local:
                        local[text] = len(uniq)
                        uniq.append(text)
                        uniq_group.append(p)
                    inv.append(local[text])
            expand = torch.tensor(inv)
        expand = expand.to(device)
        group_of = torch.arange(P, device=device).repeat_interleave(k)
        fwd = torch.zeros(P, dtype=torch.long, device=device)
        enc = self.encode(uniq)
        attn = enc.attention_mask.to(device)
        fwd.index_add_(0, torch.tensor(uniq_group, device=device), attn.sum(dim=1))
        logits, cache, hid = self._forward(enc.input_ids.to(device), attn, self._new_cache())
        cache.reorder_cache(expand)
        attn, logits = attn[expand], logits[expand]
        last_h = hid[expand] if hid is not None else None

        R = P * k
        resp = torch.full((R, 0), self.pad_id, dtype=torch.long, device=device)
        logp = torch.zeros((R, 0), dtype=torch.float32, device=device)
        done = torch.zeros(R, dtype=torch.bool, device=device)
        eos = self.eos_ids.to(device)
        traces: list[list[dict]] = [[] for _ in range(P)]
        n_new, block_index = 0, 0
        final_sel: Selection | None = None
        base = torch.arange(P, device=device)[:, None] * k
        while True:
            steps = min(block_size, max_new_tokens - n_new)
            for _ in range(steps):
                nxt = self._next_tokens(logits, gen).to(device)
                was_done = done
                nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
                lp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None])
                logp = torch.cat([logp, lp.masked_fill(done[:, None], 0.0)], dim=1)
                resp = torch.cat([resp, nxt[:, None]], dim=1)
                done = done | torch.isin(nxt, eos)
                n_new += 1
                last = n_new >= max_new_tokens or bool(done.all())
                if last and not self.need_hidden:
                    break
                attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
                fwd.index_add_(0, group_of, (~was_done).long())
                logits, cache, hid = self._forward(nxt[:, None], attn, cache)
                if hid is not None:  # ended rows keep the hidden state of their end-of-turn token
                    last_h = torch.where(was_done[:, None], last_h, hid)
                if last:
                    break
            final = n_new >= max_new_tokens or bool(done.all())
            texts_flat = [t.strip() for t in self.tok.batch_decode(resp, skip_special_tokens=True)]
            step = BlockStep(
                prompts=prompts,
                prompt_indices=indices,
                texts=[texts_flat[p * k : (p + 1) * k] for p in range(P)],
                token_ids=resp.view(P, k, -1),
                done=done.view(P, k),
                block_index=block_index,
                final=final,
                last_hidden=last_h.view(P, k, -1) if last_h is not None else None,
                row_prompts=[list(r) for r in row_prompts] if row_prompts is not None else None,
                rng=rng,
            )
            sel = selector(step)
            chosen = torch.as_tensor(sel.chosen, dtype=torch.long, device=device).reshape(-1)
            if chosen.shape[0] != P or bool(((chosen < 0) | (chosen >= k)).any()):
                raise MoalignError(f"selector returned invalid choices {chosen.tolist()} for K={k}")
            if sel.info:
                for p, info in enumerate(sel.info):
                    if info is not None:
                        traces[p].append({"block": block_index, "tokens": n_new, **info})
            if on_block is not None:
                on_block(steps)
            block_index += 1
            if sel.finish is not None:
                done = done | torch.as_tensor(sel.finish, dtype=torch.bool, device=device).reshape(-1)
                final = final or bool(done.all())
            if final:
                final_sel = sel
                break
            if sel.parents is None:
                parents = chosen[:, None].expand(P, k)
            else:
                parents = torch.as_tensor(sel.parents, dtype=torch.long, device=device)
                if parents.shape != (P, k) or bool(((parents < 0) | (parents >= k)).any()):
                    raise MoalignError(f"selector returned invalid parents of shape {tuple(parents.shape)}")
            idx = (base + parents).reshape(-1)
            moved = idx != torch.arange(R, device=device)
            if bool(moved.any()):
                cache.reorder_cache(idx)
                attn, logits, resp, done, logp = attn[idx], logits[idx], resp[idx], done[idx], logp[idx]
                if last_h is not None:
                    last_h = last_h[idx]
                if recache == "reprefill" and row_prompts is not None:
                    src = idx.tolist()
                    again = [
                        r for r in range(R)
                        if src[r] != r and rendered[src[r]] != rendered[r] and not bool(done[r])
                    ]  # fmt: skip
                    if again:
                        attn, cache, logits, last_h = self._reprefill(
                            torch.tensor(again, device=device), rendered, resp, attn, cache, logits, last_h,
                            fwd, group_of,
                        )  # fmt: skip

        assert final_sel is not None
        chosen = torch.as_tensor(final_sel.chosen, dtype=torch.long).reshape(-1).cpu()
        resp, done, logp, fwd = resp.cpu(), done.cpu(), logp.cpu(), fwd.cpu()

        def row_result(p: int, j: int, **kw) -> DecodeResult:
            r = p * k + j
            ids = _strip(resp[r].tolist(), self.eos_ids.tolist())
            rp = row_prompts[p][j] if row_prompts is not None else None
            return DecodeResult(
                prompt=prompts[p],
                response=self.tok.decode(ids, skip_special_tokens=True).strip(),
                token_ids=ids,
                finished=bool(done[r]),
                token_logprobs=[round(float(x), 6) for x in logp[r, : len(ids)]],
                row_prompt=rp if rp is not None and rp != prompts[p] else None,
                **kw,
            )

        results = []
        for p in range(P):
            rows = [row_result(p, j) for j in range(k)] if keep_all else None
            res = row_result(
                p, int(chosen[p]), trace=traces[p], forward_tokens=int(fwd[p]), rows=rows,
                candidates=texts_flat[p * k : (p + 1) * k] if keep_all else None,
            )  # fmt: skip
            results.append(res)
        return results


def _left_pad(x: torch.Tensor, length: int, value, dim: int = 1) -> torch.Tensor:
    """Pad ``x`` on the left of dimension ``dim`` to ``length``."""
    dim = dim % x.dim()
    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)


def _strip(ids: list[int], eos: list[int]) -> list[int]:
    """Response tokens up to (excluding) the first end-of-turn token."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out
