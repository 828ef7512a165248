"""Batched blockwise sampling with KV-cache reuse.

For P prompts at a time the engine encodes each prompt once, expands its KV cache to K rows, samples a block
of B tokens for all P*K rows, asks a *selector* to pick one candidate per prompt, and continues every prompt's
K new candidates from the chosen row's cache (an index-select of the cache, never a re-encoding of the
prefix). Decoding methods differ only in the selector and the block length:

- plain sampling of N responses: K = N, B = max_new_tokens, keep every candidate;
- best-of-N: K = N, B = max_new_tokens, select by the scalarised reward of the full responses;
- controlled decoding / RMOD: K candidates of B tokens per block, select by (weighted / worst-case) values.

Rows that reach an end-of-turn token stop (later positions are padding and are ignored); a prompt is finished
when its chosen candidate is. The final block may be shorter than B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from moalign.data.prompts import Prompt
from moalign.errors import MoalignError
from moalign.policies import Policy, eos_token_ids, render_chat


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
    """What a selector sees after each block, for the P prompts still being decoded.

    ``texts[p][k]`` is candidate k's whole response so far (prefix + new block) for prompt ``prompts[p]``.
    ``done[p, k]`` says whether that candidate has ended (end-of-turn token); ``final`` is True when no
    further block follows (every candidate ended, or the token budget is spent).
    """

    prompts: list[Prompt]
    prompt_indices: list[int]
    texts: list[list[str]]
    token_ids: torch.Tensor  # [P, K, T] response tokens so far (pad after the end)
    done: torch.Tensor  # [P, K] bool
    block_index: int
    final: bool
    #: [P, K, H] last-layer hidden state of each candidate's last token (end-of-turn token for ended rows);
    #: only when the engine was asked for it (``need_hidden=True``), e.g. for value heads
    last_hidden: torch.Tensor | None = None


@dataclass
class Selection:
    """A selector's answer: the chosen candidate per prompt and a JSON-able trace entry per prompt."""

    chosen: torch.Tensor  # [P] long
    info: list[dict] | None = None


Selector = Callable[[BlockStep], Selection]


@dataclass
class DecodeResult:
    prompt: Prompt
    response: str
    token_ids: list[int]
    finished: bool  # ended with an end-of-turn token (False: cut by max_new_tokens)
    trace: list[dict] = field(default_factory=list)
    candidates: list[str] | None = None  # every final candidate (keep_all=True)
    token_logprobs: list[float] | None = None  # log pi(token | prefix) of each response token, untempered


def first_candidate(step: BlockStep) -> Selection:
    """The trivial selector: always candidate 0 (with K = 1 this is plain decoding)."""
    return Selection(torch.zeros(len(step.prompts), dtype=torch.long))


class BlockwiseEngine:
    """Blockwise K-candidate decoding on one policy; see the module docstring."""

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

    def _next_tokens(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Sample (or argmax) one token per row from the warped distribution."""
        if self.sampling.temperature == 0:
            return logits.argmax(dim=-1)
        scores = self.warpers(None, logits.float())
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _forward(self, ids, attn, cache):
        pos = (attn.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            output_hidden_states=self.need_hidden,
        )
        hidden = out.hidden_states[-1][:, -1, :] if self.need_hidden else None
        return out.logits[:, -1, :], out.past_key_values, hidden

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
    ) -> list[DecodeResult]:
        """Decode one batch of prompts. ``on_block(n_new_tokens)`` is called after every block."""
        if k < 1:
            raise MoalignError(f"K (candidates per block) must be >= 1, got {k}")
        if block_size < 1:
            raise MoalignError(f"block size must be >= 1, got {block_size}")
        if max_new_tokens < 1:
            raise MoalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompts = list(prompts)
        if not prompts:
            return []
        P = len(prompts)
        indices = list(prompt_indices) if prompt_indices is not None else list(range(P))
        device = self.policy.device
        gen = torch.Generator(device="cpu").manual_seed(int(seed))

        enc = self.tok(
            [self.render(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
        )
        attn = enc.attention_mask.to(device)
        logits, cache, hid = self._forward(enc.input_ids.to(device), attn, DynamicCache())
        expand = torch.arange(P, device=device).repeat_interleave(k)
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
            if final:
                final_sel = sel
                break
            rows = torch.arange(P, device=device) * k + chosen
            # a prompt whose chosen candidate ended keeps all K copies of that candidate (they only pad on)
            idx = rows.repeat_interleave(k)
            cache.reorder_cache(idx)
            attn, logits, resp, done, logp = attn[idx], logits[idx], resp[idx], done[idx], logp[idx]
            if last_h is not None:
                last_h = last_h[idx]

        assert final_sel is not None
        chosen = torch.as_tensor(final_sel.chosen, dtype=torch.long).reshape(-1).cpu()
        resp, done, logp = resp.cpu(), done.cpu(), logp.cpu()
        results = []
        for p in range(P):
            row = p * k + int(chosen[p])
            ids = _strip(resp[row].tolist(), self.eos_ids.tolist(), self.pad_id)
            results.append(
                DecodeResult(
                    prompt=prompts[p],
                    response=self.tok.decode(ids, skip_special_tokens=True).strip(),
                    token_ids=ids,
                    finished=bool(done[row]),
                    trace=traces[p],
                    candidates=texts_flat[p * k : (p + 1) * k] if keep_all else None,
                    token_logprobs=[round(float(x), 6) for x in logp[row, : len(ids)]],
                )
            )
        return results


def _strip(ids: list[int], eos: list[int], pad: int) -> list[int]:
    """Response tokens up to (excluding) the first end-of-turn token."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out
