"""The HTTP client of an OpenAI-compatible completions server: :class:`ServerClient` speaks the completions
API with ``httpx`` (a pool of kept-alive connections shared by the worker threads), with bounded concurrency, a
per-request timeout and retries with backoff; :class:`ServerCapabilities` is what the server can do (probed once
or given); :class:`ServerStats` counts what was sent. The backend on top is
:class:`moalign.decoding.completions.CompletionsBackend`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from moalign.decoding.backend import SamplingConfig
from moalign.errors import MoalignError, SettingError

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
