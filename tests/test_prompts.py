"""Prompt loading: strings, chat messages, HH dialogues, every shared file, errors."""

from __future__ import annotations

import gzip
import json

import pytest

from moalign.data.prompts import hh_prompt_and_response, load_prompts, parse_hh_dialogue, to_prompt
from moalign.errors import MoalignError


def test_hh_dialogue_to_messages():
    d = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
    msgs = parse_hh_dialogue(d)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[-1]["content"] == "Tell me a joke"
    p = to_prompt(d)
    assert p.messages == tuple(msgs)
    assert p.text.startswith("Human: Hi there") and p.text.endswith("Human: Tell me a joke")


def test_prompt_and_response_split():
    d = "\n\nHuman: a?\n\nAssistant: b\n\nHuman: c?\n\nAssistant: final answer"
    prompt, resp = hh_prompt_and_response(d)
    assert prompt.endswith("\n\nAssistant:") and resp == "final answer"


def test_plain_and_chat_prompts():
    assert to_prompt("  hello ").text == "hello"
    chat = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    assert to_prompt(chat).messages[-1] == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("bad", ["", "   ", [{"role": "assistant", "content": "x"}], 42])
def test_bad_prompts(bad):
    with pytest.raises(MoalignError):
        to_prompt(bad)


def test_file_formats(tmp_path):
    recs = [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "one"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.csv").write_text("prompt\none\ntwo\n")
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    for name in ["a.jsonl", "a.jsonl.gz", "a.json", "a.csv", "a.txt"]:
        ps = load_prompts(str(tmp_path / name))
        assert [p.text for p in ps] == ["one", "two"], name  # duplicates dropped
    assert len(load_prompts(str(tmp_path / "a.jsonl"), limit=1)) == 1


def test_file_errors(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "hi"}))
    with pytest.raises(MoalignError, match="no prompt column"):
        load_prompts(str(tmp_path / "x.jsonl"))
    with pytest.raises(MoalignError, match="column 'nope' not found"):
        load_prompts(str(tmp_path / "x.jsonl"), column="nope")
    with pytest.raises(MoalignError, match="file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "  "}))
    with pytest.raises(MoalignError, match="empty prompt"):
        load_prompts(str(tmp_path / "e.jsonl"))
    (tmp_path / "b.jsonl").write_text("{not json\n{}\n")
    with pytest.raises(MoalignError, match="line 1"):
        load_prompts(str(tmp_path / "b.jsonl"))


@pytest.mark.real
@pytest.mark.parametrize(
    "name,column,first_words",
    [
        ("hh-helpful-base-test.jsonl.gz", None, None),
        ("hh-helpful-rejection-sampled-test.jsonl.gz", None, None),
        ("hh-harmless-base-test-2000.jsonl.gz", None, None),
        ("pku-saferlhf-safer-5k.json.gz", None, None),
        ("ultrafeedback-binarized-1000.jsonl.gz", None, None),
        ("ultrafeedback-binarized-eval-200.jsonl.gz", None, None),
        ("mt-bench-questions.jsonl", None, None),
        ("vicuna-bench-questions.jsonl", None, None),
        ("truthfulqa.csv.gz", "Question", None),
    ],
)
def test_shared_files_load(shared_data, name, column, first_words):
    ps = load_prompts(str(shared_data / name), column=column, limit=20)
    assert len(ps) == 20
    assert all(p.messages[-1]["role"] == "user" and p.text.strip() for p in ps)
    if name.startswith("hh-"):
        assert all("Assistant:" not in p.messages[-1]["content"] for p in ps)
