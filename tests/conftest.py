"""Shared fixtures: a tiny random Llama policy (built from a config in a temp dir), the real bundled policy,
and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one intra-op thread per worker (and its subprocesses)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models run faster, and 2 threads oversubscribe a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """Three short prompts in a JSONL file."""
    import json

    f = tmp_path / "prompts.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["Say hi", "Name a color", "Why is the sky blue?"])
    )
    return f


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv) -> (exit code, stdout, stderr)`` of ``moalign`` called in-process."""
    from moalign.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data folder {SHARED_DATA} not present (it sits beside the project in CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def policy_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled policy's tokenizer saved as a normal HF tokenizer folder."""
    from moalign.policies import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    load_tokenizer("smollm2-135m-instruct").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory, policy_tokenizer_dir) -> Path:
    """A 2-layer random Llama with the bundled tokenizer and chat template, saved to a temp dir.

    Its weights are drawn wide (initializer_range 0.3) and its end-of-turn row (tied input/output
    embedding, zero by default because it is also the pad id) is set so that greedy decoding varies from
    prompt to prompt and reaches end-of-turn on some prompts and not on others: tests comparing outputs
    are then not void (``test_tiny_policy_is_not_degenerate`` checks it).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
        initializer_range=0.3,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        eot = tok.convert_tokens_to_ids("<|im_end|>")
        model.get_output_embeddings().weight[eot] = 0.6 * torch.randn(
            32, generator=torch.Generator().manual_seed(1)
        )
    d = tmp_path_factory.mktemp("tiny_policy")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_policy(tiny_policy_dir):
    from moalign.policies import load_policy

    return load_policy(str(tiny_policy_dir))


@pytest.fixture
def no_eos(tiny_policy):
    """The tiny policy never ends a row early (its end-of-turn logits are -inf), so every block of a search is
    scored: hand counts of what scorers read assume it."""
    import math

    from moalign.decoding.in_process import TransformersBackend

    eos = TransformersBackend(tiny_policy).eos_ids.tolist()

    def hook(module, inputs, output):
        output[..., eos] = -math.inf
        return output

    handle = tiny_policy.model.get_output_embeddings().register_forward_hook(hook)
    yield
    handle.remove()


@pytest.fixture(scope="session")
def real_policy():
    from moalign.policies import load_policy

    return load_policy("smollm2-135m-instruct")


def make_tiny_reward_model(folder: Path, num_labels: int):
    """A 2-layer BERT sequence classifier (``num_labels`` outputs, random weights, seed 0) with the MiniLM
    tokenizer, saved to ``folder``; returns ``(model, tokenizer)``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from moalign.objectives.embeddings import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
