"""The serving backend (``--backend server``) against a real OpenAI-compatible server, no mocks.

The real-server tests (marked ``real``) start llama-cpp-python's server (``python -m llama_cpp.server``,
installed by ``scripts/install_server.sh``) on the bundled SmolLM2 GGUF once for the session, at one thread,
and run every decoding method through it. That server takes text prompts only and returns one choice per
request, so these tests cover the client's text fallback; the token-id path (vLLM) runs in
``test_vllm_token_id_path`` when ``MOALIGN_VLLM_URL`` points at a vLLM server (a GPU machine).
Cost on 2 shared CPU cores: about a minute for the whole file (53-68 s measured; the server starts in ~1 s).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import replace

import pytest
import torch
from llama_server import LlamaServer, free_port, llama_cpp_available  # scripts/ (see conftest)

from moalign.config import GenerateConfig, for_method
from moalign.data.prompts import Prompt
from moalign.decoding.backend import Capabilities
from moalign.decoding.server_client import (
    ServerCapabilities,
    ServerClient,
    ServerUnreachable,
    normalize_base_url,
)
from moalign.errors import MoalignError
from moalign.generate import generate
from moalign.objectives.base import CallableObjective, move_objectives, resolve_objectives
from moalign.records import meta_path, read_records

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    Prompt(({"role": "user", "content": "Name a color."},), id="a"),
    Prompt(({"role": "user", "content": "Say hello to a friend."},), id="b"),
]
SMALL = dict(
    objectives="positive,concise", normalize="none", max_new_tokens=12, block_size=6, k=3, n=3, batch_size=2,
    mutations=2, replace_every=6, replace_top_k=1, cycles=1, mutation_max_new_tokens=40, seed=3,
)  # fmt: skip
METHODS = ["sample", "best-of-n", "cd", "rmod", "darwin", "sample-replace", "mutate-bon"]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    srv = LlamaServer(log=log, n_ctx=2048, n_threads=1, n_batch=1)  # n_batch=1: deterministic (see there)
    try:
        srv.start()
    except MoalignError as e:
        pytest.fail(f"{e}\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
    yield srv
    srv.stop()


def server_cfg(srv, **kw) -> GenerateConfig:
    """SMALL on the server for ``kw["method"]`` (the settings only other methods have left at their defaults)."""
    base = dict(SMALL, backend="server", base_url=srv.base_url, request_timeout=60.0, retries=2)
    method = kw.pop("method", "sample")
    return for_method(GenerateConfig(**{**base, **kw}), method)


def _objectives():
    return resolve_objectives("positive,concise")


#: dicts keyed by data, not structure: the scorers' tokens by model name (which models read depends on the run:
#: Darwin's drift check reads only when a mutation reply parses)
_KEYED_BY_DATA = {"scorer_reads"}


def _shape(x):
    """The nested key structure of a record (values' types aside); empty lists match anything."""
    if isinstance(x, dict):
        return {k: None if k in _KEYED_BY_DATA else _shape(v) for k, v in x.items()}
    if isinstance(x, list):
        shapes = [_shape(v) for v in x if isinstance(v, dict | list)]
        return shapes[0] if shapes else "list"
    return None


def _same_shape(a, b) -> bool:
    if a == "list" or b == "list":
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_shape(a[k], b[k]) for k in a)
    return a == b


# ------------------------------------------------------------------------------------------ no server
def test_base_url_and_capabilities_parse():
    assert normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(MoalignError, match="^server: base_url must be an http"):
        normalize_base_url("127.0.0.1:8000")
    assert ServerCapabilities.parse("auto") is None
    assert ServerCapabilities.parse("none") == ServerCapabilities()
    assert ServerCapabilities.parse("token_ids,n") == ServerCapabilities(token_ids=True, n=True)
    with pytest.raises(MoalignError, match="unknown capability 'logits'"):
        ServerCapabilities.parse("n,logits")
    with pytest.raises(MoalignError, match="^generate: max_concurrency must be >= 1"):
        GenerateConfig(max_concurrency=0).validate()


def test_unreachable_server_is_one_line(run_cli, prompts_file, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    t0 = time.perf_counter()
    code, _, err = run_cli("generate", "--backend", "server", "--base-url", url, "--retries", "1",
                           "--prompts", prompts_file, "--out", tmp_path / "o.jsonl")  # fmt: skip
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("moalign: error: cannot reach the server at " + url)
    assert "2 tries" in err and time.perf_counter() - t0 < 30
    code, _, err = run_cli(
        "generate", "--backend", "server", "--prompts", prompts_file, "--out", tmp_path / "p.jsonl"
    )
    assert code == 2 and "--base-url" in err and err.count("\n") == 1


def test_objective_device_moves_objectives_and_is_recorded(tiny_policy, tmp_path):
    class Neural(CallableObjective):
        device = "unset"

        def to(self, device):
            self.device = device
            return self

    obj = Neural("lenfrac", lambda p, r: [len(x) / 100 for x in r])
    cfg = GenerateConfig(method="sample", n=1, max_new_tokens=3, normalize="none", objective_device="policy",
                         out=str(tmp_path / "o.jsonl"))  # fmt: skip
    generate(cfg, policy=tiny_policy, objectives=[obj], prompts=PROMPTS[:1], progress=False)
    assert obj.device == str(tiny_policy.device)
    assert json.loads(meta_path(cfg.out).read_text())["config"]["objective_device"] == "policy"
    assert move_objectives([obj], "cpu") == ["lenfrac"] and obj.device == "cpu"
    with pytest.raises(MoalignError, match="--objective-device"):
        move_objectives([obj], "nonsense")


# ------------------------------------------------------------------------------------------ real server
@pytest.mark.real
def test_capabilities_probed_on_llama_cpp(llama_server):
    from moalign.decoding.completions import connect

    policy, engine = connect(server_cfg(llama_server), _sampling())
    caps = engine.client.caps
    assert caps.probed and not caps.token_ids and not caps.n  # llama-cpp-python: text prompts, one choice
    # ... declared to the loop as the backend's capabilities
    assert engine.capabilities == Capabilities(hidden_states=False, token_ids=False, n_choices=False)
    assert policy.describe()["model"] == "smollm2"
    assert policy.describe()["tokenizer_matches_server"] is True
    engine.client.close()


def _sampling():
    from moalign.decoding.backend import SamplingConfig

    return SamplingConfig()


@pytest.mark.real
@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_the_server(method, llama_server, tiny_policy, tmp_path):
    cfg = server_cfg(llama_server, method=method, out=str(tmp_path / f"{method}.jsonl"))
    recs = generate(cfg, objectives=_objectives(), prompts=PROMPTS, progress=False)
    n_out = SMALL["n"] if method == "sample" else 1
    assert len(recs) == len(PROMPTS) * n_out and read_records(cfg.out) == recs
    for r in recs:
        assert r["policy"] == "smollm2" and set(r["scores"]) == {"positive", "concise"}
        assert 0 < r["n_tokens"] <= SMALL["max_new_tokens"] + 2  # local re-tokenisation of the server's text
        assert r["response"].strip() and isinstance(r["finished"], bool)
        assert r["policy_tokens"] > r["n_tokens"]
    meta = json.loads(meta_path(cfg.out).read_text())
    assert meta["config"]["backend"] == "server" and meta["config"]["base_url"] == llama_server.base_url
    assert meta["policy"]["backend"] == "server" and meta["policy"]["capabilities"]["token_ids"] is False
    # the same record shape, trace included, as the in-process engine's
    local = replace(cfg, backend="local", out=str(tmp_path / f"{method}-local.jsonl"))
    ref = generate(local, policy=tiny_policy, objectives=_objectives(), prompts=PROMPTS, progress=False)
    assert _same_shape(_shape(recs[0]), _shape(ref[0]))
    if method in ("cd", "rmod"):
        assert all(len(r["trace"]) >= 1 for r in recs)
        if method == "rmod":
            assert "weights" in recs[0]["trace"][0]
    if method in ("darwin", "mutate-bon"):
        cycle = recs[0]["trace"][1]
        mutation = cycle["mutation"]
        assert mutation["mode"] == "one"  # the default: one rewrite per request
        assert any(reply.strip() for reply in mutation["replies"])  # the mutation replies came from the server too
        assert len(cycle["instructions"]) == SMALL["mutations"]
    if method == "sample-replace":
        assert any(c.get("replacements") for r in recs for c in r["trace"][1:])


@pytest.mark.real
def test_seeded_runs_reproduce_on_the_same_server(llama_server, tmp_path):
    a = generate(server_cfg(llama_server, method="cd", out=str(tmp_path / "a.jsonl")), objectives=_objectives(),
                 prompts=PROMPTS, progress=False)  # fmt: skip
    b = generate(server_cfg(llama_server, method="cd", out=str(tmp_path / "b.jsonl"), max_concurrency=1),
                 objectives=_objectives(), prompts=PROMPTS, progress=False)  # fmt: skip
    assert [r["response"] for r in a] == [r["response"] for r in b]
    c = generate(server_cfg(llama_server, method="cd", seed=4, out=str(tmp_path / "c.jsonl")),
                 objectives=_objectives(), prompts=PROMPTS, progress=False)  # fmt: skip
    assert [r["response"] for r in a] != [r["response"] for r in c]


@pytest.mark.real
def test_resume_after_the_server_drops(llama_server, tmp_path):
    """Stop the server mid-run: the run ends with a one-line error and keeps every record it wrote; once the
    server is back, the same command completes the run with no record lost or repeated, and the records are
    those of an uninterrupted run."""
    prompts = [Prompt(({"role": "user", "content": f"Tell me one fact about the number {i}."},), id=f"q{i}")
               for i in range(4)]  # fmt: skip
    cfg = server_cfg(llama_server, method="cd", batch_size=1, retries=0, out=str(tmp_path / "r.jsonl"))
    errors: list[Exception] = []

    def run():
        try:
            generate(cfg, objectives=_objectives(), prompts=prompts, progress=False)
        except MoalignError as e:
            errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(cfg.out) and open(cfg.out).read().count("\n")):
        time.sleep(0.02)
    llama_server.stop()
    th.join(timeout=120)
    try:
        assert errors and "cannot reach the server" in str(errors[0]) and "\n" not in str(errors[0])
        before = read_records(cfg.out)
        assert 1 <= len(before) < len(prompts)
    finally:
        llama_server.start()
    after = generate(cfg, objectives=_objectives(), prompts=prompts, progress=False)
    recs = read_records(cfg.out)
    assert [r["record_id"] for r in recs] == [f"q{i}" for i in range(4)]  # all, once, in order
    assert recs[: len(before)] == before and len(after) == len(prompts) - len(before)
    whole = generate(replace(cfg, out=str(tmp_path / "whole.jsonl")), objectives=_objectives(), prompts=prompts,
                     progress=False)  # fmt: skip
    assert [r["response"] for r in recs] == [r["response"] for r in whole]


@pytest.mark.real
def test_one_line_errors_with_a_running_server(llama_server, run_cli, prompts_file, tmp_path):
    base = ["generate", "--backend", "server", "--base-url", llama_server.base_url, "--prompts", prompts_file,
            "--objectives", "positive", "--normalize", "none", "--max-new-tokens", "4", "--limit", "1"]  # fmt: skip
    code, _, err = run_cli(*base, "--model", "gpt-5", "--out", tmp_path / "m.jsonl")
    assert code == 2 and err.count("\n") == 1
    assert "does not serve model 'gpt-5' (it serves: smollm2)" in err
    code, _, err = run_cli(
        *base, "--method", "cd", "--values", tmp_path / "heads", "--out", tmp_path / "v.jsonl"
    )
    assert (
        code == 2
        and err.count("\n") == 1
        and "value heads (values=PATH) need the policy's hidden states" in err
    )
    # capabilities declared that this server lacks: named, not silently worked around
    code, _, err = run_cli(*base, "--server-capabilities", "token_ids", "--out", tmp_path / "t.jsonl")
    assert code == 2 and err.count("\n") == 1 and "token-id prompts" in err
    code, _, err = run_cli(*base, "--server-capabilities", "n", "--n", "3", "--out", tmp_path / "n.jsonl")
    assert code == 2 and err.count("\n") == 1 and "returned 1 completion choice(s) where 2 were asked" in err
    code, _, err = run_cli(*base, "--out", tmp_path / "ok.jsonl")  # and the same command without them runs
    assert code == 0 and len(read_records(tmp_path / "ok.jsonl")) == 4


@pytest.mark.real
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
def test_api_key_from_the_environment(run_cli, prompts_file, tmp_path, monkeypatch):
    with LlamaServer(n_batch=1, extra=["--api_key", "sekret"], log=tmp_path / "server.log") as srv:
        base = ["generate", "--backend", "server", "--base-url", srv.base_url, "--prompts", prompts_file,
                "--objectives", "concise", "--normalize", "none", "--max-new-tokens", "3", "--limit", "1", "--n", "1"]  # fmt: skip
        code, _, err = run_cli(*base, "--out", tmp_path / "a.jsonl")
        assert code == 2 and err.count("\n") == 1 and "HTTP 401" in err and "--api-key-env" in err
        code, _, err = run_cli(*base, "--api-key-env", "MOALIGN_TEST_KEY", "--out", tmp_path / "b.jsonl")
        assert code == 2 and "MOALIGN_TEST_KEY is not set" in err
        monkeypatch.setenv("MOALIGN_TEST_KEY", "sekret")
        code, _, err = run_cli(*base, "--api-key-env", "MOALIGN_TEST_KEY", "--out", tmp_path / "c.jsonl")
        assert code == 0 and len(read_records(tmp_path / "c.jsonl")) == 1


@pytest.mark.real
def test_client_retries_then_names_the_failure(llama_server):
    client = ServerClient(llama_server.base_url, retries=1, backoff=0.01, timeout=30)
    assert client.resolve_model() == "smollm2"
    with pytest.raises(MoalignError, match="HTTP 404"):  # a client error is not retried: it is named
        client.request("POST", "/no-such-endpoint", {"prompt": "x"})
    assert client.stats.retries == 0
    with pytest.raises(MoalignError, match="HTTP 500"):  # llama-cpp-python answers a bad body with a 500
        client.request("POST", "/completions", {"prompt": {"not": "a prompt"}})
    assert client.stats.retries == 1  # retried once (--retries 1), then named
    client.close()
    slow = ServerClient(llama_server.base_url, model="smollm2", retries=1, backoff=0.01, timeout=0.05)
    with pytest.raises(ServerUnreachable, match="timed out"):  # a timeout is retried, then named
        slow.complete("Count to fifty:", max_tokens=48, sampling=_sampling(), seed=0)
    assert slow.stats.retries == 1
    slow.close()


@pytest.mark.real
@pytest.mark.skipif(not os.environ.get("MOALIGN_VLLM_URL"), reason="no vLLM server (MOALIGN_VLLM_URL) here")
def test_vllm_token_id_path(tmp_path):
    """vLLM (``vllm serve HuggingFaceTB/SmolLM2-135M-Instruct``): token-id prompts and ``n``, probed."""
    cfg = for_method(GenerateConfig(**{**SMALL, "backend": "server", "base_url": os.environ["MOALIGN_VLLM_URL"],
                                       "model": os.environ.get("MOALIGN_VLLM_MODEL"),
                                       "out": str(tmp_path / "v.jsonl")}), "cd")  # fmt: skip
    recs = generate(cfg, objectives=_objectives(), prompts=PROMPTS, progress=False)
    meta = json.loads(meta_path(cfg.out).read_text())
    assert meta["policy"]["capabilities"] == {"token_ids": True, "n": True, "probed": True}
    assert all(r["response"].strip() for r in recs)
    assert torch.tensor([r["n_tokens"] for r in recs]).le(SMALL["max_new_tokens"]).all()


def test_generated_ids_read_from_each_server_format():
    """vLLM returns "token_id:N" strings (or token_ids), llama.cpp's server one logprobs entry per token."""
    client = ServerClient("http://127.0.0.1:9/v1")
    vllm = client._choice({"text": "ab", "finish_reason": "length",
                           "logprobs": {"tokens": ["token_id:5", "token_id:7"], "token_logprobs": [-0.5, -1.0]}},
                          ids_mode=True)  # fmt: skip
    assert vllm.token_ids == [5, 7] and vllm.logprobs == [-0.5, -1.0] and vllm.n_tokens == 2
    native = client._choice({"text": "ab", "finish_reason": "stop", "logprobs": {"content": [
        {"id": 11, "token": "a", "logprob": -0.25}, {"id": 12, "token": "b", "logprob": -2.0}]}}, ids_mode=True)
    assert native.token_ids == [11, 12] and native.logprobs == [-0.25, -2.0] and native.finish_reason == "stop"
    with pytest.raises(MoalignError, match="does not return generated token ids"):
        client._choice({"text": "ab", "finish_reason": "stop"}, ids_mode=True)
    client.close()


def _native_llama_server():
    import glob

    found = sorted(glob.glob(os.path.expanduser("~/.cache/moalign/llama.cpp/*/bin/llama-server")))
    return found[0] if found else None


@pytest.mark.real
@pytest.mark.skipif(_native_llama_server() is None, reason="llama.cpp's llama-server not built (scripts/install_llama_cpp.sh)")
@pytest.mark.parametrize("method", ["cd", "darwin"])
def test_token_id_path_on_llama_cpp_server(method, tmp_path):
    """llama.cpp's own server (parallel slots): token-id prompts, n choices and generated ids, probed and used
    by every block (the local tokenizer matches the server's)."""
    from llama_server import NativeLlamaServer

    # this llama.cpp takes at most `parallel` choices per request: Darwin asks for mutations x oversample = 6
    with NativeLlamaServer(_native_llama_server(), parallel=8, n_threads=1, n_ctx=8192) as srv:
        cfg = server_cfg(srv, method=method, out=str(tmp_path / f"{method}.jsonl"))
        recs = generate(cfg, objectives=_objectives(), prompts=PROMPTS, progress=False)
    meta = json.loads(meta_path(cfg.out).read_text())
    assert meta["policy"]["capabilities"] == {"token_ids": True, "n": True, "probed": True}
    assert meta["policy"]["tokenizer_matches_server"] is True
    for r in recs:
        assert 0 < r["n_tokens"] <= SMALL["max_new_tokens"] and r["policy_tokens"] > 0
        assert r["response"].strip()
