"""The completions backend: the blockwise loop on an OpenAI-compatible completions server (``--backend server``).

:class:`CompletionsBackend` implements :class:`~moalign.decoding.backend.Backend`, so sample, best-of-N, CD,
RMOD, Darwin and its ablations run on it through the same loop as in process. Each block is one completion
request per distinct row state (``max_tokens`` = the block's length); a reindex copies row states, and a row
continues from its prompt + its response so far. The server's prefix cache does the KV reuse.

:class:`~moalign.decoding.server_client.ServerClient` speaks the completions API over HTTP. What the server
can do (:class:`ServerCapabilities`) is probed once at start or given with ``--server-capabilities``, and the
backend declares it in its ``capabilities``:

- ``token_ids`` (vLLM): prompts are token-id lists and the generated token ids come back, so a block
  boundary never re-tokenises. Without it (e.g. llama-cpp-python) prompts are text (the rendered prompt +
  the response text so far) and the server tokenises the continuation itself: a boundary may then tokenise
  differently from how the tokens were generated, and a multi-byte character split across a boundary loses
  its bytes.
- ``n``: one request returns several choices (rows in the same state share one request); without it each
  row is its own single-choice request (sent concurrently).

Every request carries a seed derived from the run seed, the block and the row, so a run is reproducible on
the same server. Hidden states are not part of the API: value heads (``--values PATH``) are refused.

The policy's compute (``DecodeResult.policy_tokens``) is counted as in process, i.e. the tokens a policy with
perfect KV reuse processes for the group: each distinct prompt once, every generated token, and the prompt +
copied tokens of a row re-prefilled under its own prompt (Darwin). What the server itself processed depends
on its prefix cache; what was sent is in :attr:`ServerClient.stats` (prompt and completion tokens, requests,
retries).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass, field

import torch

from moalign.data.prompts import Prompt
from moalign.decoding.backend import Capabilities, RowOutput, RowsView, SamplingConfig, strip_eos
from moalign.decoding.loop import BlockwiseDecoding
from moalign.decoding.server_client import (
    CAPABILITIES,
    ServerCapabilities,
    ServerClient,
    ServerStats,
)
from moalign.errors import MoalignError, SettingError
from moalign.policies import eos_token_ids, render_chat


@dataclass
class ServerPolicy:
    """The policy of a server run: served by ``client``; the tokenizer (chat template, end-of-turn ids,
    token-id continuation) is loaded locally."""

    tokenizer: object
    name: str
    source: str
    info: dict = field(default_factory=dict)
    model = None  # no weights here

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "backend": "server", **self.info}


@dataclass
class _Row:
    ctx_text: str  # the rendered prompt this row continues (its own, or its parent's under recache=copy)
    ctx_ids: list[int]
    ids: list[int] = field(default_factory=list)  # response tokens (text mode: counted, not kept)
    text: str = ""  # response text as generated (text mode: the server's text, concatenated)
    done: bool = False
    logprobs: list[float] | None = None

    def copy(self) -> _Row:
        return dataclasses.replace(self, ids=list(self.ids),
                                   logprobs=list(self.logprobs) if self.logprobs is not None else None)  # fmt: skip


@dataclass
class _Rows:
    """The row state of one decode on the server."""

    rows: list[_Row]
    rendered: list[str]  # each row's own rendered prompt
    ids_of: dict[str, list[int]]  # the local tokenisation of each rendered prompt
    seed: int
    groups: list[list[int]]
    block: int = 0  # blocks sent so far (part of every request's seed)


class CompletionsBackend(BlockwiseDecoding):
    """The blockwise loop's backend on a completions server; see the module docstring."""

    #: a served policy's parameter count is unknown here: its compute is reported in tokens sent, not FLOPs
    model_cost = None

    def __init__(
        self,
        client: ServerClient,
        policy: ServerPolicy,
        sampling: SamplingConfig | None = None,
        system_prompt: str | None = None,
    ):
        self.client, self.policy = client, policy
        self.tok = policy.tokenizer
        self.sampling = sampling or SamplingConfig()
        self.sampling.validate()
        self.system_prompt = system_prompt
        self.eos_ids = eos_token_ids(self.tok)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_ids[0]

    @property
    def capabilities(self) -> Capabilities:
        """Declared from the client's (probed or given) server capabilities; never hidden states."""
        return Capabilities(
            hidden_states=False, token_ids=self.client.caps.token_ids, n_choices=self.client.caps.n
        )

    @property
    def stats(self) -> ServerStats:
        return self.client.stats

    def with_sampling(self, sampling: SamplingConfig, system_prompt: str | None = None) -> CompletionsBackend:
        """Another backend on the same server (and client) with its own sampling (Darwin's mutator)."""
        return CompletionsBackend(self.client, self.policy, sampling, system_prompt)

    def close(self) -> None:
        self.client.close()

    def render(self, prompt: Prompt) -> str:
        return render_chat(self.tok, prompt.messages, self.system_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _text(self, row: _Row) -> str:
        if self.client.caps.token_ids:
            return self.tok.decode(strip_eos(row.ids, self.eos_ids), skip_special_tokens=True)
        return row.text

    # -------------------------------------------------------------------------------------------- verbs
    def prefill(self, rendered: list[str], group_of: list[int], seed: int, hidden: bool):
        """Nothing is sent yet (a row's first request carries its prompt); the policy is counted as reading
        each distinct prompt of a group once."""
        ids_mode = self.client.caps.token_ids
        ids_of: dict[str, list[int]] = {}
        for text in rendered:
            if text not in ids_of:
                ids_of[text] = self._ids(text)
        rows = _Rows(
            rows=[_Row(ctx_text=t, ctx_ids=ids_of[t], logprobs=[] if ids_mode else None) for t in rendered],
            rendered=list(rendered), ids_of=ids_of, seed=int(seed),
            groups=[[r for r, g in enumerate(group_of) if g == p] for p in dict.fromkeys(group_of)],
        )  # fmt: skip
        read, seen = [0] * len(rendered), set()
        for r, (g, text) in enumerate(zip(group_of, rendered)):
            if (g, text) not in seen:
                seen.add((g, text))
                read[r] = len(ids_of[text])
        return rows, read

    def extend(self, rows: _Rows, steps: int, last: bool):
        """One request per running row (or per group of rows in the same state, with ``n``) for ``steps``
        tokens; every row advances by ``steps`` positions (ended rows by none)."""
        ids_mode, caps = self.client.caps.token_ids, self.client.caps
        jobs: list[tuple[list[int], str | list[int]]] = []
        for members in rows.groups:
            buckets: dict = {}
            for r in members:
                row = rows.rows[r]
                if row.done:
                    continue
                key = (row.ctx_text, tuple(row.ids)) if ids_mode else (row.ctx_text, row.text)
                if caps.n:
                    buckets.setdefault(key, []).append(r)
                else:
                    buckets[(key, r)] = [r]
            for rs in buckets.values():
                row = rows.rows[rs[0]]
                jobs.append((rs, row.ctx_ids + row.ids if ids_mode else row.ctx_text + row.text))
        block = rows.block

        def run(job):
            rs, prompt = job
            s = zlib.crc32(f"{rows.seed}:{block}:{rs[0]}".encode()) & 0x7FFFFFFF
            return self.client.complete(prompt, max_tokens=steps, sampling=self.sampling, seed=s, n=len(rs),
                                        stop_token_ids=self.eos_ids)  # fmt: skip

        results = self.client.map(run, jobs)
        rows.block += 1
        made = [0] * len(rows.rows)
        eos = set(self.eos_ids)
        for (rs, _), choices in zip(jobs, results):
            for r, ch in zip(rs, choices):
                row = rows.rows[r]
                if ids_mode:
                    new = ch.token_ids[:steps]
                    row.ids.extend(new)
                    if row.logprobs is not None and ch.logprobs is not None:
                        row.logprobs.extend(ch.logprobs[: len(new)])
                    else:
                        row.logprobs = None
                    made[r] = len(new)
                    row.done = ch.finish_reason == "stop" or any(t in eos for t in new)
                else:
                    row.text += ch.text
                    made[r] = ch.n_tokens if ch.n_tokens is not None else len(self._ids(ch.text))
                    row.done = ch.finish_reason == "stop"
                if not row.done and ch.finish_reason not in ("length", None) and made[r] < steps:
                    row.done = True  # ended early for a reason of the server's own (e.g. a stop string)
        return steps, made

    def read(self, rows: _Rows) -> RowsView:
        seqs = [row.ids if self.client.caps.token_ids else self._ids(row.text) for row in rows.rows]
        T = max([len(s) for s in seqs] + [1])
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return RowsView(
            texts=[self._text(row).strip() for row in rows.rows],
            token_ids=ids,  # text mode: the local tokenisation of the text
            done=torch.tensor([row.done for row in rows.rows]),
        )

    def finish(self, rows: _Rows, mask: torch.Tensor) -> None:
        for row, f in zip(rows.rows, mask.tolist()):
            row.done = row.done or bool(f)

    def reindex(self, rows: _Rows, src: list[int], reprefill: list[int]):
        """Rows copy their parent's state; a re-prefilled row continues its own prompt + the copied response
        (counted as the policy reading both again)."""
        old = rows.rows
        rows.rows = [old[s].copy() if s != r else old[r] for r, s in enumerate(src)]
        read = [0] * len(src)
        for r in reprefill:
            row = rows.rows[r]
            row.ctx_text, row.ctx_ids = rows.rendered[r], rows.ids_of[rows.rendered[r]]
            n_resp = len(row.ids) if self.client.caps.token_ids else len(self._ids(row.text))
            read[r] = len(row.ctx_ids) + n_resp
        return read

    def output(self, rows: _Rows, r: int) -> RowOutput:
        row = rows.rows[r]
        text = self._text(row)
        ids = strip_eos(row.ids, self.eos_ids) if self.client.caps.token_ids else self._ids(text)
        lps = [round(float(x), 6) for x in row.logprobs[: len(ids)]] if row.logprobs is not None else None
        return RowOutput(response=text.strip(), token_ids=ids, finished=row.done, token_logprobs=lps)


# ------------------------------------------------------------------------------------------ from a config
def connect(cfg, sampling: SamplingConfig, policy=None) -> tuple[ServerPolicy, CompletionsBackend]:
    """The server policy and engine (a passed local ``policy`` is not used) of a run config (``--base-url``, ``--model``, ``--api-key-env``,
    ``--tokenizer``, ``--server-capabilities``, ``--max-concurrency``, ``--request-timeout``, ``--retries``):
    checks the server is reachable and serves the model, loads the tokenizer, finds the capabilities."""
    from moalign.policies import load_tokenizer

    if not cfg.base_url:
        raise SettingError(
            "server", "base_url", "is required: the URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"
        )
    declared = ServerCapabilities.parse(cfg.server_capabilities)
    api_key = None
    if cfg.api_key_env:
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise SettingError("server", "api_key_env", f"is {cfg.api_key_env}, but the environment variable {cfg.api_key_env} is not set")
    client = ServerClient(
        cfg.base_url, model=cfg.model, api_key=api_key, timeout=cfg.request_timeout, retries=cfg.retries,
        max_concurrency=cfg.max_concurrency,
    )  # fmt: skip
    model = client.resolve_model()
    tok_src = cfg.tokenizer or cfg.policy
    try:
        tok = load_tokenizer(tok_src)
    except OSError as e:
        raise MoalignError(
            f"cannot load the tokenizer {tok_src!r} (--tokenizer): {str(e).splitlines()[0]}"
        ) from None
    probe_text = render_chat(tok, [{"role": "user", "content": "Hello"}], cfg.system_prompt)
    probe_ids = tok(probe_text, add_special_tokens=False).input_ids
    if declared is None:
        client.caps = client.probe(probe_text, probe_ids)
    else:  # one tiny request with what was declared: a server that lacks it fails here, before decoding
        client.caps = declared
        client.complete(probe_ids if declared.token_ids else probe_text, max_tokens=1, sampling=sampling,
                        seed=0, n=2 if declared.n else 1, probe=True)  # fmt: skip
    server_ids = client.server_tokenize(probe_text)
    match = None if server_ids is None else server_ids == probe_ids
    if match is False and client.caps.token_ids:
        raise MoalignError(
            f"the local tokenizer {tok_src!r} does not match model {model!r} on the server at {client.base_url}: "
            "pass the served model's tokenizer with --tokenizer"
        )
    info = {
        "server": client.base_url,
        "model": model,
        "tokenizer": tok_src,
        "tokenizer_matches_server": match,
        "capabilities": {**{c: getattr(client.caps, c) for c in CAPABILITIES}, "probed": client.caps.probed},
    }
    policy = ServerPolicy(tokenizer=tok, name=model, source=client.base_url, info=info)
    return policy, CompletionsBackend(client, policy, sampling, system_prompt=cfg.system_prompt)
