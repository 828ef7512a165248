"""The completions backend: the blockwise loop on an OpenAI-compatible completions server (``--backend server``).

:class:`CompletionsBackend` implements :class:`~moalign.decoding.backend.Backend`, so sample, best-of-N, CD,
RMOD, Darwin and its ablations run on it through the same loop as in process. Each block is one completion
request per distinct row state (``max_tokens`` = the block's length); a reindex copies row states, and a row
continues from its prompt + its response so far. The server's prefix cache does the KV reuse.

:class:`ServerClient` speaks the completions API over HTTP with ``httpx`` (a pool of kept-alive connections shared
by the worker threads), with bounded concurrency, a per-request timeout and retries with backoff.
What the server can do (:class:`ServerCapabilities`) is probed once at start or given with
``--server-capabilities``, and the backend declares it in its ``capabilities``:

- ``token_ids`` (vLLM): prompts are token-id lists and the generated token ids come back, so a block
  boundary never re-tokenises. Without it (e.g. llama-cpp-python) prompts are text (the rendered prompt +
  the response text so far) and the server tokenises the continuation itself: a boundary may then tokenise
  differently from how the tokens were generated, and a multi-byte character split across a boundary loses
  its bytes.
- ``n``: one request returns several choices (rows in the same state share one request); without it each
  row is its own single-choice request (sent concurrently).

Every request carries a seed derived from the run seed, the block and the row, so a run is reproducible on
the same server. Hidden states are not part of the API: value heads (``--values PATH``) are refused.

The policy's compute (``DecodeResult.forward_tokens``) is counted as in process, i.e. the tokens a policy with
perfect KV reuse processes for the group: each distinct prompt once, every generated token, and the prompt +
copied tokens of a row re-prefilled under its own prompt (Darwin). What the server itself processed depends
on its prefix cache; what was sent is in :attr:`ServerClient.stats` (prompt and completion tokens, requests,
retries).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch

from moalign.data.prompts import Prompt
from moalign.decoding.backend import Capabilities, RowOutput, RowsView, SamplingConfig, strip_eos
from moalign.decoding.loop import BlockwiseDecoding
from moalign.errors import MoalignError, SettingError
from moalign.policies import eos_token_ids, render_chat

CAPABILITIES = ("token_ids", "n")
_RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class ServerError(MoalignError):
    """The server refused a request or cannot return what a method needs (``status``, ``detail``: the HTTP
    status and the first line of the server's answer, where there was one)."""

    def __init__(self, message: str, status: int | None = None, detail: str = ""):
        super().__init__(message)
        self.status, self.detail = status, detail


class ServerUnreachable(ServerError):
    """No answer from the server (connection refused or dropped, timeout), retries spent."""


@dataclass
class ServerCapabilities:
    """What the server does beyond text-in / text-out single-choice completions."""

    token_ids: bool = False  # token-id prompts accepted and generated token ids returned (vLLM)
    n: bool = False  # several choices per request
    probed: bool = False  # found by probing the server (else declared with --server-capabilities)

    @classmethod
    def parse(cls, spec: str) -> ServerCapabilities | None:
        """``auto`` -> None (probe); ``none`` -> text prompts, one choice; else a comma list of names."""
        spec = (spec or "auto").strip()
        if spec == "auto":
            return None
        names = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
        bad = [s for s in names if s not in CAPABILITIES]
        if bad:
            raise MoalignError(
                f"--server-capabilities: unknown capability {bad[0]!r}; use auto, none or a comma list of "
                f"{', '.join(CAPABILITIES)}"
            )
        return cls(**{n: True for n in names})


@dataclass
class Choice:
    text: str
    finish_reason: str | None
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    n_tokens: int | None = None  # completion tokens, when the server says


@dataclass
class ServerStats:
    requests: int = 0
    choices: int = 0
    prompt_tokens: int = 0  # as reported by the server (before its prefix cache)
    completion_tokens: int = 0
    retries: int = 0
    seconds: float = 0.0  # summed over requests (concurrent requests overlap)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("requests", "choices", "prompt_tokens", "completion_tokens",
                                              "retries", "seconds")}  # fmt: skip


def normalize_base_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/v1`` (with or without a trailing slash) -> ``.../v1``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError("server", "base_url", f"must be an http(s) URL such as http://127.0.0.1:8000/v1, got {url!r}")
    return url if parts.path.endswith("/v1") else url + "/v1"


def _first_line(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            err = data.get("error", data.get("detail", data.get("message", data)))
            if isinstance(err, dict):
                err = err.get("message", err)
            text = json.dumps(err) if not isinstance(err, str) else err
    except (json.JSONDecodeError, TypeError):
        pass
    line = " ".join(text.split())
    return line[:limit] + ("..." if len(line) > limit else "")


class ServerClient:
    """An OpenAI-compatible completions client on ``httpx`` (a pool of kept-alive connections): bounded
    concurrency (a thread pool of ``max_concurrency``), timeouts, retries with exponential backoff."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_concurrency: int = 8,
        backoff: float = 0.5,
    ):
        import httpx

        self.base_url = normalize_base_url(base_url)
        parts = urlsplit(self.base_url)
        self._prefix = parts.path  # ends with /v1
        self.model = model
        self.api_key = api_key
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_concurrency = int(max_concurrency)
        self.caps = ServerCapabilities()
        self.stats = ServerStats()
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self._http = httpx.Client(
            base_url=f"{parts.scheme}://{parts.netloc}", headers=headers, timeout=self.timeout,
            limits=httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency),
        )  # fmt: skip
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="moalign-server")

    # ------------------------------------------------------------------------------------------ transport
    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        root: bool = False,
        retry_status: bool = True,
    ) -> dict:
        """One JSON request (``path`` under ``/v1``, or under the server root with ``root``), retried on
        connection errors, timeouts and (``retry_status``) HTTP 408/429/5xx; anything else raises a one-line
        ServerError."""
        import httpx

        url = (self._prefix[: -len("/v1")] if root else self._prefix) + path
        attempt, dropped = 0, False
        while True:
            try:
                resp = self._http.request(method, url, json=body)
                raw, status = resp.content, resp.status_code
            except httpx.TransportError as e:
                if isinstance(e, httpx.RemoteProtocolError) and not dropped:
                    dropped = True  # a kept-alive connection the server had closed: once more, free
                    continue
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if attempt < self.retries:
                    self._sleep(attempt)
                    attempt += 1
                    continue
                raise ServerUnreachable(
                    f"cannot reach the server at {self.base_url} ({method} {path}): {why} "
                    f"({attempt + 1} tries, --request-timeout {self.timeout:g}s)"
                ) from None
            if retry_status and status in _RETRY_STATUS and attempt < self.retries:
                self._sleep(attempt)
                attempt += 1
                continue
            if status in (401, 403):
                raise ServerError(
                    f"the server at {self.base_url} refused {method} {path} (HTTP {status}: "
                    f"{_first_line(raw)}): check the API key (--api-key-env)"
                )
            if status >= 400:
                detail = _first_line(raw)
                raise ServerError(
                    f"the server at {self.base_url} answered {method} {path} with HTTP {status}: {detail}",
                    status,
                    detail,
                )
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise ServerError(
                    f"the server at {self.base_url} answered {method} {path} with non-JSON: {_first_line(raw, 120)}"
                ) from None

    def _sleep(self, attempt: int) -> None:
        self.stats.add(retries=1)
        time.sleep(min(self.backoff * 2**attempt, 8.0))

    def map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(x) for x in items]`` on at most ``max_concurrency`` threads; the first error cancels the
        requests not yet sent and is raised."""
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(x) for x in items]
        futures = [self._pool.submit(fn, x) for x in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                for p in pending:
                    p.cancel()
                wait(pending)
                raise f.exception()
        return [f.result() for f in futures]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ------------------------------------------------------------------------------------------- API
    def served_models(self) -> list[str]:
        data = self.request("GET", "/models")
        try:
            return [str(m["id"]) for m in data["data"]]
        except (KeyError, TypeError):
            raise ServerError(
                f"{self.base_url} does not look like an OpenAI-compatible server (GET /models has no model list)"
            ) from None

    def resolve_model(self) -> str:
        """Check the server is up and serves ``model`` (default: its first model); return the name."""
        models = self.served_models()
        if not models:
            raise ServerError(f"the server at {self.base_url} serves no model")
        if self.model is None:
            self.model = models[0]
        elif self.model not in models:
            raise ServerError(
                f"the server at {self.base_url} does not serve model {self.model!r} (it serves: {', '.join(models)})"
            )
        return self.model

    def complete(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int,
        sampling: SamplingConfig,
        seed: int,
        n: int = 1,
        stop_token_ids: Sequence[int] = (),
        probe: bool = False,
    ) -> list[Choice]:
        """``n`` continuations of ``prompt`` (text, or token ids with the ``token_ids`` capability);
        ``probe``: HTTP errors are not retried (a server may answer a request it cannot serve with a 500)."""
        body: dict = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": int(max_tokens),
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            # the engine's sampling exactly: no min-p, no repetition penalty, top-k only when asked (0: off
            # on llama.cpp, whose default is 40; left out for token-id servers, where off is the default)
            "min_p": 0.0,
            "repeat_penalty": 1.0,  # llama.cpp's name (its default is 1.1)
            "repetition_penalty": 1.0,  # vLLM's name
            "seed": int(seed),
        }
        ids_mode = isinstance(prompt, list)
        if sampling.top_k > 0 or not ids_mode:
            body["top_k"] = int(sampling.top_k)
        if n > 1:
            body["n"] = n
        if ids_mode:  # vLLM: generated token ids back, and the policy's end-of-turn ids stop the row
            body.update(logprobs=1, return_tokens_as_token_ids=True, return_token_ids=True)
            if stop_token_ids:
                body["stop_token_ids"] = [int(t) for t in stop_token_ids]
        t0 = time.perf_counter()
        try:
            data = self.request("POST", "/completions", body, retry_status=not probe)
        except ServerUnreachable:
            raise
        except ServerError as e:
            if not ids_mode:
                raise
            why = f"HTTP {e.status}: {e.detail[:100]}..." if e.status is not None else str(e)
            raise ServerError(
                f"the server at {self.base_url} does not take token-id prompts (capability token_ids; {why}): "
                "use --server-capabilities auto or none",
                e.status,
                e.detail,
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or len(choices) < n:
            got = len(choices) if isinstance(choices, list) else 0
            raise ServerError(
                f"the server at {self.base_url} returned {got} completion choice(s) where {n} were asked "
                "(set --server-capabilities without n)"
            )
        choices = sorted(choices, key=lambda c: c.get("index", 0))[:n]
        out = [self._choice(c, ids_mode) for c in choices]
        usage = data.get("usage") or {}
        if n == 1 and out[0].n_tokens is None and usage.get("completion_tokens") is not None:
            out[0].n_tokens = int(usage["completion_tokens"])
        self.stats.add(
            requests=1, choices=n, prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0), seconds=time.perf_counter() - t0,
        )  # fmt: skip
        return out

    def _choice(self, c: dict, ids_mode: bool) -> Choice:
        text = c.get("text")
        if not isinstance(text, str):
            raise ServerError(f"the server at {self.base_url} returned a completion without text")
        ids, lps = None, None
        if ids_mode:
            ids = c.get("token_ids")
            lp = c.get("logprobs") or {}
            toks = lp.get("tokens") if isinstance(lp, dict) else None
            content = lp.get("content") if isinstance(lp, dict) else None
            if ids is None and toks is not None:  # vLLM: "token_id:123" strings
                try:
                    ids = [int(str(t).removeprefix("token_id:")) for t in toks]
                except ValueError:
                    ids = None
            if ids is None and isinstance(content, list):  # llama.cpp's server: one entry per token with its id
                try:
                    ids = [int(t["id"]) for t in content]
                    lps = [float(t.get("logprob", float("nan"))) for t in content]
                except (KeyError, TypeError, ValueError):
                    ids = None
            if ids is None:
                raise ServerError(
                    f"the server at {self.base_url} does not return generated token ids (capability token_ids): "
                    "use --server-capabilities auto or none"
                )
            ids = [int(t) for t in ids]
            tl = lp.get("token_logprobs") if isinstance(lp, dict) else None
            if lps is None and isinstance(tl, list) and len(tl) == len(ids):
                lps = [float(x) if x is not None else float("nan") for x in tl]
        return Choice(text=text, finish_reason=c.get("finish_reason"), token_ids=ids, logprobs=lps,
                      n_tokens=len(ids) if ids is not None else None)  # fmt: skip

    def probe(self, prompt_text: str, prompt_ids: list[int]) -> ServerCapabilities:
        """Find the capabilities with two tiny requests: a token-id prompt with n=2 (vLLM answers it with
        two choices and their token ids), then, if that fails, a text prompt with n=2."""
        plain = SamplingConfig(temperature=1.0)
        caps = ServerCapabilities(probed=True)

        def accepts(prompt, n: int) -> bool:
            try:
                self.complete(prompt, max_tokens=2, sampling=plain, seed=0, n=n, probe=True)
                return True
            except ServerUnreachable:
                raise
            except ServerError:
                return False

        if accepts(prompt_ids, 2):
            caps.token_ids, caps.n = True, True
            return caps
        caps.token_ids = accepts(prompt_ids, 1)
        caps.n = accepts(prompt_text, 2)
        if not caps.n:  # text prompts must work: a failure here is the server's error, raised
            self.complete(prompt_text, max_tokens=1, sampling=plain, seed=0, n=1, probe=True)
        return caps

    def server_tokenize(self, text: str) -> list[int] | None:
        """The server's own tokenisation of ``text`` (special tokens parsed), where it offers one
        (vLLM ``/tokenize``, llama-cpp-python ``/extras/tokenize``); None when it offers none."""
        for path, body, key in (
            ("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, "tokens"),  # vLLM
            ("/tokenize", {"content": text, "add_special": False, "parse_special": True}, "tokens"),  # llama.cpp
            ("/extras/tokenize", {"model": self.model, "input": text}, "tokens"),  # llama-cpp-python
        ):
            try:
                data = self._request_once("POST", path, body)
            except ServerError:
                continue
            if isinstance(data, dict) and isinstance(data.get(key), list) and data[key]:
                return [int(t) for t in data[key]]
        return None

    def _request_once(self, method: str, path: str, body: dict) -> dict:
        retries, self.retries = self.retries, 0
        try:
            return self.request(method, path, body, root=True)
        finally:
            self.retries = retries


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
