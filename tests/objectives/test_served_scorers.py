"""Scorers served like the policy (``--encoder-url``): the shipped reward models' MiniLM encoder behind a real
llama.cpp server (llama-cpp-python's, ``--embedding True``) on the GGUF the set-up converts
(scripts/minilm_gguf.sh), against the same scorers in process; and the one-line failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llama_server import LlamaServer, free_port, llama_cpp_available  # scripts/ (see conftest)

from moalign.compute import count_reads, scoring_scope
from moalign.config import GenerateConfig
from moalign.data.prompts import Prompt
from moalign.errors import MoalignError
from moalign.generate import generate
from moalign.objectives.served import EncoderServer, served_encoder, share
from moalign.records import read_records

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[2]
MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Human: How do I keep basil alive on a windowsill?", "Water it when the soil is dry.", "",
         "word " * 400]  # the last is longer than the encoder's 256 word pieces  # fmt: skip


def _gguf() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "minilm_gguf.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(out.stdout.strip().splitlines()[-1])


def _server(tmp: Path, **kw) -> LlamaServer:
    extra = ["--embedding", "True", *kw.pop("extra", [])]
    return LlamaServer(kw.pop("gguf", None) or _gguf(), alias=kw.pop("alias", MODEL), n_ctx=512, n_threads=1,
                       log=tmp / "server.log", extra=extra, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def encoder_server(tmp_path_factory):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
    srv = _server(tmp_path_factory.mktemp("encoder_server")).start()
    yield srv
    srv.stop()


def test_served_embeddings_equal_the_in_process_ones(encoder_server):
    from moalign.objectives.embeddings import encode, token_counts

    with scoring_scope(reuse=False), count_reads(len(TEXTS)) as local_reads:
        local = encode(TEXTS, side="left")
    with served_encoder(encoder_server.base_url + "#" + MODEL) as server, scoring_scope(reuse=False):
        with count_reads(len(TEXTS)) as served_reads:
            served = encode(TEXTS, side="left")
        # a cache hit reads nothing, served or not
        with count_reads(len(TEXTS)) as again:
            encode(TEXTS, side="left")
        assert again.tokens() == [0] * len(TEXTS)
        assert server.cost.params == next(iter(local_reads.by_model.values()))[0].params  # ~11M, from the config
    cos = (served * local).sum(1)
    assert cos.min() > 0.9999, cos  # the long text cut to its last 256 word pieces on both sides
    # cost: what the server reported for the request, shared in proportion to the word pieces sent
    assert sum(served_reads.tokens()) == pytest.approx(sum(local_reads.tokens()), abs=4)
    assert local_reads.tokens() == token_counts(TEXTS)


def test_rmod_scored_through_the_server_picks_what_in_process_picks(encoder_server, real_policy, shared_data,
                                                                    tmp_path):  # fmt: skip
    """``generate --method rmod`` with the shipped helpful,harmless on the real policy and held-out HH prompts:
    the same candidates at every block, and the same records up to the server's arithmetic: raw scores within
    2e-3 (measured: 4e-4 at most; the shipped heads read standardised features, which magnify the last bits in
    which llama.cpp's float32 embeddings differ from torch's)."""
    _same_picks_as_in_process(encoder_server.base_url, real_policy, shared_data, tmp_path, limit=3)


def _native_llama_server():
    import glob

    found = sorted(glob.glob(os.path.expanduser("~/.cache/moalign/llama.cpp/*/bin/llama-server")))
    return found[0] if found else None


@pytest.mark.skipif(_native_llama_server() is None, reason="llama.cpp's llama-server not built (scripts/install_llama_cpp.sh)")
def test_native_llama_server_embedding_serves_the_encoder(real_policy, shared_data, tmp_path):
    """The same against llama.cpp's own ``llama-server --embedding`` on the converted GGUF."""
    from llama_server import NativeLlamaServer

    with NativeLlamaServer(_native_llama_server(), gguf=_gguf(), alias=MODEL, parallel=1, n_threads=1, n_ctx=512,
                           log=tmp_path / "native.log", extra=["--embedding"]) as srv:  # fmt: skip
        _same_picks_as_in_process(srv.base_url, real_policy, shared_data, tmp_path, limit=2)


def _same_picks_as_in_process(base_url: str, real_policy, shared_data, tmp_path, limit: int) -> None:
    from moalign.data.prompts import load_prompts

    prompts = load_prompts(str(shared_data / "hh-harmless-base-test-2000.jsonl.gz"), limit=limit)
    runs = {}
    for label, url in (("local", ""), ("served", base_url + "#" + MODEL)):
        cfg = GenerateConfig(method="rmod", k=4, block_size=8, max_new_tokens=24, objectives="helpful,harmless",
                             encoder_url=url, out=str(tmp_path / f"{label}.jsonl"), seed=5)  # fmt: skip
        runs[label] = generate(cfg, policy=real_policy, prompts=prompts, progress=False)
    local, served = runs["local"], runs["served"]
    assert [r["response"] for r in local] == [r["response"] for r in served]
    for a, b in zip(local, served):
        assert [e.get("chosen") for e in a["trace"]] == [e.get("chosen") for e in b["trace"]]
        assert max(abs(a["scores"][g] - b["scores"][g]) for g in ("helpful", "harmless")) < 2e-3
        assert set(b["scorer_reads"]) == {f"{MODEL} (served at {base_url})"}
        assert b["scorer_flops"] > 0 and abs(b["scorer_tokens"] - a["scorer_tokens"]) <= 0.05 * a["scorer_tokens"]


def test_one_line_failures(encoder_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(MoalignError, match="unreachable") as e:
        EncoderServer(dead, retries=0)
    assert "\n" not in str(e.value)
    with pytest.raises(MoalignError, match="does not serve model 'nope'"), served_encoder(encoder_server.base_url + "#nope"):
        pass
    with pytest.raises(MoalignError, match="must be an http"):
        EncoderServer("127.0.0.1:8080")
    with pytest.raises(MoalignError, match="none of the objectives .positive, concise. embeds with MiniLM"):
        generate(GenerateConfig(method="sample", objectives="positive,concise", encoder_url=encoder_server.base_url,
                                out=str(tmp_path / "unused.jsonl")), prompts=[Prompt(({"role": "user", "content": "Hi"},))])  # fmt: skip
    assert not (tmp_path / "unused.jsonl").exists()
    with pytest.raises(MoalignError, match="MOALIGN_NO_SUCH_KEY is not set"), served_encoder(
            encoder_server.base_url, api_key_env="MOALIGN_NO_SUCH_KEY"):  # fmt: skip
        pass


def test_a_rejected_key_and_the_wrong_width_are_one_line(tmp_path, monkeypatch):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
    with _server(tmp_path, extra=["--api_key", "right"]) as srv:
        monkeypatch.setenv("MOALIGN_TEST_KEY", "wrong")
        with pytest.raises(MoalignError, match="rejected the request .HTTP 401"), served_encoder(
                srv.base_url, api_key_env="MOALIGN_TEST_KEY"):  # fmt: skip
            pass
        monkeypatch.setenv("MOALIGN_TEST_KEY", "right")
        with served_encoder(srv.base_url, api_key_env="MOALIGN_TEST_KEY") as server:
            assert server.model == MODEL
    from moalign.policies import bundled_gguf

    with _server(tmp_path, gguf=bundled_gguf(), alias="smollm2") as srv:  # a 576-wide model
        with pytest.raises(MoalignError, match="576-wide embeddings; the MiniLM objectives need 384"):
            with served_encoder(srv.base_url):
                pass


def test_a_run_whose_encoder_server_stopped_resumes_losing_nothing(real_policy, tmp_path):
    if not llama_cpp_available():
        pytest.skip("llama-cpp-python[server] is not installed: bash scripts/install_server.sh")
    prompts = [Prompt(({"role": "user", "content": t},), id=str(i))
               for i, t in enumerate(["Name a colour.", "Say hello.", "Why is the sea salty?"])]  # fmt: skip
    out = tmp_path / "run.jsonl"

    def cfg(url: str, limit: int, path: Path = out) -> GenerateConfig:
        return GenerateConfig(method="cd", k=2, block_size=8, max_new_tokens=8, batch_size=1, limit=limit,
                              objectives="helpful,harmless", encoder_url=url, out=str(path), retries=0)  # fmt: skip

    srv = _server(tmp_path).start()
    try:
        first = generate(cfg(srv.base_url, 1), policy=real_policy, prompts=prompts, progress=False)
    finally:
        srv.stop()
    with pytest.raises(MoalignError, match="unreachable"):
        generate(cfg(srv.base_url, 3), policy=real_policy, prompts=prompts, progress=False)
    assert read_records(out) == first  # nothing lost, nothing half-written
    with _server(tmp_path) as again:  # another port
        generate(cfg(again.base_url, 3), policy=real_policy, prompts=prompts, progress=False)
        whole = generate(cfg(again.base_url, 3, tmp_path / "whole.jsonl"), policy=real_policy, prompts=prompts,
                         progress=False)  # fmt: skip
    recs = read_records(out)
    assert len(recs) == 3 and recs[0] == first[0]
    # the same responses and scores as a run that never stopped
    assert [(r["response"], r["scores"]) for r in recs] == [(r["response"], r["scores"]) for r in whole]


def test_served_reward_model_spec_and_failures_are_one_line(decoder_rm_dir):
    """``rm+http://HOST:PORT/v1#MODEL[@INDEX]`` resolves to a served reward model (vLLM's pooling runner); a
    missing model name, an unloadable tokenizer and an unreachable server are one line each."""
    from moalign.objectives.base import get_objective
    from moalign.objectives.served import ServedRewardModel

    url = f"http://127.0.0.1:{free_port()}/v1"
    rm = get_objective(f"rm+{url}#{decoder_rm_dir}@1")
    assert isinstance(rm, ServedRewardModel) and rm.index == 1 and rm.base == url.removesuffix("/v1")
    assert rm.cost.params > 0  # counted from the model's configuration, no weights
    rm.http.retries = 0
    with pytest.raises(MoalignError, match="reward model server .* is unreachable") as e:
        rm.score(["Say hi"], ["Hi!"])
    assert "\n" not in str(e.value)
    with pytest.raises(MoalignError, match="name the model"):
        ServedRewardModel(url)
    with pytest.raises(MoalignError, match="cannot load its tokenizer"):
        _ = ServedRewardModel(f"{url}#/no/such/model").tokenizer


@pytest.fixture(scope="module")
def decoder_rm_dir(tmp_path_factory, policy_tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=2)  # fmt: skip
    d = tmp_path_factory.mktemp("served_rm")
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.skipif(not os.environ.get("MOALIGN_VLLM_RM_URL"), reason="no vLLM reward model server (MOALIGN_VLLM_RM_URL)")
def test_vllm_served_reward_model_scores_as_in_process():
    """Against ``vllm serve MODEL --runner pooling --pooler-config '{"use_activation": false}'`` at
    ``MOALIGN_VLLM_RM_URL`` (``MOALIGN_VLLM_RM_MODEL``: the same model as a local folder): a search's
    records scored through the server equal the in-process reward model's to 1e-2 (bf16 on the server)."""
    from moalign.objectives.base import get_objective

    model = os.environ["MOALIGN_VLLM_RM_MODEL"]
    served = get_objective(f"rm+{os.environ['MOALIGN_VLLM_RM_URL']}#{model}")
    local = get_objective(f"rm:{model}")
    prompts = ["Human: How do I keep basil alive?"] * 3
    responses = ["Water it when dry.", "Give it sun.", "I don't know."]
    assert torch.allclose(served.score(prompts, responses), local.score(prompts, responses), atol=1e-2)


def test_share_splits_a_reported_total_in_proportion():
    assert share(31, [11, 17, 2]) == [11, 18, 2] and sum(share(31, [11, 17, 2])) == 31
    assert share(5, [0, 0]) == [5, 0] and share(0, [3, 4]) == [0, 0]
    torch.manual_seed(0)
    for _ in range(20):
        w = torch.randint(0, 50, (6,)).tolist()
        t = int(torch.randint(0, 300, ()).item())
        got = share(t, w)
        assert sum(got) == t and all(x >= 0 for x in got)
