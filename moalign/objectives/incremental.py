"""Incremental scoring for decoder reward models: each candidate reads only what is new since its parent.

A decoder reward model (a ``*ForSequenceClassification`` head on Llama, Qwen, Gemma, Mistral, GPT-2, SmolLM,
...) scores a sequence by a linear head (``model.score``) on the last token's final hidden state, and a token's
keys and values depend only on the tokens before it. So when a search scores the K candidates of a block, each
of which continues the response its row's parent had at the previous block, the reward model need not re-read
prompt + whole response: it keeps, per scored sequence, its KV cache, and a new sequence reads only the tokens
past the longest token prefix it shares with a sequence already read.

The store is content-addressed (by the token ids each entry holds), so it needs nothing from the loop: a row that
continues from a parent (CD's and RMOD's broadcast winner, Darwin's copied beams, a re-prefilled beam whose text
is unchanged) finds the parent's entry as its longest shared prefix; an unchanged sequence (a row that ended)
reads nothing and reuses its score. A group's K first-block candidates share the prompt, which is read once.

Exactness. The fed tokens of several sequences go in one batch with each sequence's own past (left-padded to the
longest past, masked) and explicit positions, so every token sees exactly the keys and values it would see in a
full re-encode; the head reads the last non-pad token, as the model's own forward does. The tests check the
scores against a full re-encode to 1e-5 in float32.

Memory. The store lives in the search's :func:`moalign.compute.scoring_scope` and keeps the most recently used
entries up to ``max_bytes`` of KV cache (least recently used evicted first: the parents of the previous block go
before the rows of this one).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

#: the default KV budget of one store (least recently used entries are evicted past it)
DEFAULT_MAX_BYTES = 2 * 1024**3


def supports_incremental(model) -> bool:
    """Whether ``model`` is a decoder sequence classifier this module can score incrementally: a linear
    ``score`` head on a base model whose forward takes a KV cache, no encoder."""
    import inspect

    head = getattr(model, "score", None)
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        return False
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(base.forward).parameters
    return "position_ids" in params and ("past_key_values" in params or "cache" in params)


@dataclass
class Entry:
    """One sequence the model read: its token ids, KV cache, the head on its last non-pad token (``logits``;
    the final hidden state there when the store has no head) and, when the store keeps them, the cumulative
    sums of its final hidden states (``csum[i]`` = the sum over tokens 0..i)."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [heads, len(ids), dim]
    logits: torch.Tensor
    csum: torch.Tensor | None = None  # [len(ids), hidden]

    @property
    def nbytes(self) -> int:
        extra = self.csum.numel() * self.csum.element_size() if self.csum is not None else 0
        return extra + sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class IncrementalScorer:
    """The KV store of one decoder model within one search, and its batched incremental forward.

    ``model``: a decoder sequence classifier (its ``base_model`` is run, its ``score`` head read), or with
    ``head=False`` a decoder backbone itself (its final hidden states are the output; ``sums=True`` keeps their
    running sums, for mean pooling)."""

    def __init__(self, model, pad_token_id: int | None, max_bytes: int = DEFAULT_MAX_BYTES, *, head: bool = True,
                 sums: bool = False):  # fmt: skip
        self.model = model
        self.base = model.base_model if head else model
        self.head = model.score if head else None
        self.sums = bool(sums)
        self.pad = pad_token_id
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()  # (group key, ids) -> entry, LRU order
        self._by_group: dict[object, set[tuple]] = {}
        self._bytes = 0
        key = "cache" if "cache" in _forward_params(self.base) else "past_key_values"
        self._cache_kw = key

    # ------------------------------------------------------------------------------------------- store
    def _put(self, group, entry: Entry) -> None:
        key = (group, tuple(entry.ids))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = entry
        self._by_group.setdefault(group, set()).add(key)
        self._bytes += entry.nbytes
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            old_key, old = self._entries.popitem(last=False)
            self._by_group[old_key[0]].discard(old_key)
            self._bytes -= old.nbytes

    def _best(self, group, ids: list[int]) -> tuple[Entry | None, int]:
        """The entry of ``group`` sharing the longest token prefix with ``ids``, and that length."""
        best, n = None, 0
        for key in self._by_group.get(group, ()):
            e = self._entries[key]
            c = _common_prefix(e.ids, ids)
            if c > n:
                best, n = e, c
        if best is not None:
            self._entries.move_to_end((group, tuple(best.ids)))
        return best, n

    def _last_real(self, ids: list[int]) -> int:
        """Index of the token the head reads: the last one that is not the pad token (the model's own rule)."""
        if self.pad is not None:
            for i in range(len(ids) - 1, -1, -1):
                if ids[i] != self.pad:
                    return i
        return len(ids) - 1

    # ----------------------------------------------------------------------------------------- scoring
    def logits(self, groups: list, sequences: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """The head's outputs ``[n, num_labels]`` for token sequences (``groups[i]``: the key under which
        sequence i shares prefixes, its prompt) and the tokens the model read for each (0: reused)."""
        entries, read = self.entries(groups, sequences)
        return torch.stack([e.logits for e in entries]), read

    @torch.inference_mode()
    def entries(self, groups: list, sequences: list[list[int]]) -> tuple[list[Entry], list[int]]:
        """The :class:`Entry` of each token sequence (read incrementally, see :meth:`logits`) and the tokens
        the model read for each."""
        n = len(sequences)
        out: list[Entry | None] = [None] * n
        read = [0] * n
        todo: dict[tuple, list[int]] = {}  # identical sequences of one call read once
        for i, (g, ids) in enumerate(zip(groups, sequences)):
            todo.setdefault((g, tuple(ids)), []).append(i)
        # a group met for the first time with several sequences: the prefix they all share (the prompt) is read
        # once, first, less its last token (so that each sequence still feeds the token its head reads)
        pend = []
        for g in dict.fromkeys(g for g, _ in todo):
            seqs = [ids for gg, ids in todo if gg == g]
            if self._by_group.get(g) or len(seqs) < 2:
                continue
            n_shared = min(_common_prefix(list(seqs[0]), list(x)) for x in seqs[1:])
            if n_shared > 1:
                pend.append((g, list(seqs[0][: n_shared - 1]), todo[(g, seqs[0])][0]))
        if pend:
            for (g, _, first), (entry, n_read) in zip(pend, self._forward([(None, 0, g, p) for g, p, _ in pend])):
                self._put(g, entry)
                read[first] += n_read
        jobs = []
        for (g, ids), idx in todo.items():
            ids = list(ids)
            entry, common = self._best(g, ids)
            last = self._last_real(ids)
            if entry is not None and common == len(ids) == len(entry.ids):
                for i in idx:
                    out[i] = entry
                continue
            common = min(common, last)  # the token the head reads is fed again if the past holds it
            jobs.append(((entry, common, g, ids), idx))
        if jobs:
            got = self._forward([job for job, _ in jobs])
            for (job, idx), (entry, n_read) in zip(jobs, got):
                self._put(job[2], entry)
                read[idx[0]] += n_read
                for i in idx:
                    out[i] = entry
        return out, read

    def _forward(self, jobs: list[tuple[Entry | None, int, object, list[int]]]) -> list[tuple[Entry, int]]:
        """Feed each job's ``ids[common:]`` after the first ``common`` positions of its entry's KV cache, in one
        batch; returns each job's new entry and the tokens fed."""
        base = self.base
        dev = next(base.parameters()).device
        past = [e.kv if e is not None and c > 0 else None for e, c, _, _ in jobs]
        plen = [c if p is not None else 0 for (_, c, _, _), p in zip(jobs, past)]
        new = [ids[c:] for (_, _, _, ids), c in zip(jobs, plen)]
        B, P, N = len(jobs), max(plen), max(len(x) for x in new)
        pad = self.pad if self.pad is not None else 0
        input_ids = torch.full((B, N), pad, dtype=torch.long)
        mask = torch.zeros(B, P + N, dtype=torch.long)
        pos = torch.zeros(B, N, dtype=torch.long)
        for b, (x, lp) in enumerate(zip(new, plen)):
            input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, P - lp : P] = 1
            mask[b, P : P + len(x)] = 1
            pos[b] = lp + torch.arange(N)
        kw = {}
        if P > 0:
            layers = []
            ref = next(p for p in past if p is not None)
            for li, (k0, v0) in enumerate(ref):
                k = k0.new_zeros((B, k0.shape[0], P, k0.shape[-1]))
                v = v0.new_zeros((B, v0.shape[0], P, v0.shape[-1]))
                for b, (p, lp) in enumerate(zip(past, plen)):
                    if p is not None and lp > 0:
                        k[b, :, P - lp :] = p[li][0][:, :lp]
                        v[b, :, P - lp :] = p[li][1][:, :lp]
                layers.append((k.to(dev), v.to(dev)))
            from transformers import DynamicCache

            kw[self._cache_kw] = DynamicCache(ddp_cache_data=layers)
        res = base(input_ids=input_ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                   use_cache=True, **kw)  # fmt: skip
        hidden = res.last_hidden_state
        cache = res["cache"] if "cache" in res else res["past_key_values"]
        kv_layers = [(layer.keys, layer.values) for layer in cache.layers]
        out = []
        for b, ((e, _, _, ids), lp, x) in enumerate(zip(jobs, plen, new)):
            last = self._last_real(ids) - lp  # within the fed tokens (the past never holds it, see logits())
            h = hidden[b, last][None]
            logit = (self.head(h) if self.head is not None else h).reshape(-1).float().cpu()
            kv = [(k[b, :, P - lp : P + len(x)].contiguous(), v[b, :, P - lp : P + len(x)].contiguous())
                  for k, v in kv_layers]  # fmt: skip
            csum = None
            if self.sums:
                fed = hidden[b, : len(x)].float().cpu().cumsum(0)
                if lp > 0:
                    fed = torch.cat([e.csum[:lp], e.csum[lp - 1] + fed])
                csum = fed
            out.append((Entry(list(ids), kv, logit, csum), len(x)))
        return out


def _forward_params(module) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)
