"""Prompt loading: strings, chat messages, HH dialogues, every shared file, errors."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest

from moalign.data.prompts import (
    hh_prompt_and_response,
    load_prompts,
    parse_hh_dialogue,
    prompts_from_records,
    to_prompt,
)
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


def _write_jsonl(path, recs):
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return str(path)


_SWALLOWED = "\n\nHuman: a?\n\nAssistant: b.  Human: and c?\n\nAssistant: d"  # the reply ate the next turn


def test_bad_record_names_file_and_record(tmp_path):
    good = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: a{i}"} for i in range(4)]
    src = _write_jsonl(tmp_path / "hh.jsonl", good[:2] + [{"chosen": _SWALLOWED}] + good[2:])
    with pytest.raises(MoalignError, match=r"^.*hh\.jsonl: record 2: prompt must end with a user turn$"):
        load_prompts(src)
    # an id column is named too
    with_id = [{"id": "x1", "prompt": "hi"}, {"id": "x2", "prompt": [{"role": "assistant", "content": "a"}]}]
    with pytest.raises(
        MoalignError, match=r"ids\.jsonl: record 1 \(id x2\): prompt must end with a user turn"
    ):
        load_prompts(_write_jsonl(tmp_path / "ids.jsonl", with_id))


def test_skip_invalid_counts_and_warns(tmp_path):
    good = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: a{i}"} for i in range(4)]
    src = _write_jsonl(tmp_path / "hh.jsonl", good[:2] + [{"chosen": _SWALLOWED}] + good[2:])
    report: dict = {}
    with pytest.warns(
        UserWarning, match=r"hh\.jsonl: skipped 1 of 5 records: 1 prompt must end with a user turn"
    ):
        ps = load_prompts(src, skip_invalid=True, report=report)
    assert [p.text for p in ps] == ["q0?", "q1?", "q2?", "q3?"]
    assert [p.id for p in ps] == ["0", "1", "3", "4"]  # ids stay the record indices
    assert report == {
        "skipped": 1,
        "total": 5,
        "reasons": {"prompt must end with a user turn": 1},
        "first": "record 2: prompt must end with a user turn",
        "duplicates": 0,
    }
    # limit counts valid prompts: the bad record does not use up one of the 3
    with pytest.warns(UserWarning, match="skipped 1 of 4 records"):
        assert [p.text for p in load_prompts(src, skip_invalid=True, limit=3)] == ["q0?", "q1?", "q2?"]
    # a clean file: no warning, an empty count
    clean = _write_jsonl(tmp_path / "clean.jsonl", good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_prompts(clean, skip_invalid=True, report=report)) == 4
    assert report["skipped"] == 0 and report["total"] == 4


def test_skip_invalid_mixed_reasons_and_all_bad(tmp_path):
    recs = [{"prompt": "ok"}, {"prompt": "  "}, {"text": "no column"}, {"prompt": "fine"}]
    src = _write_jsonl(tmp_path / "m.jsonl", recs)
    with pytest.raises(MoalignError, match=r"m\.jsonl: record 1: empty prompt"):
        load_prompts(src)
    report: dict = {}
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 records: 1 empty prompt, 1 no prompt column found"):
        assert [p.text for p in prompts_from_records(recs, skip_invalid=True, source="m", report=report)] == [
            "ok",
            "fine",
        ]
    assert report["reasons"] == {"empty prompt": 1, "no prompt column found": 1}
    # nothing valid at all: still an error, with the reasons
    with pytest.raises(
        MoalignError, match=r"no valid prompts in .*x\.jsonl: all 1 records invalid .*'nope' not found"
    ):
        load_prompts(_write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]), column="nope", skip_invalid=True)
    # in-memory lists take the same keyword
    with pytest.raises(MoalignError, match=r"prompts: item 1: prompt must end with a user turn"):
        load_prompts(["a", [{"role": "assistant", "content": "x"}], "b"])
    with pytest.warns(UserWarning, match="prompts: skipped 1 of 3 records"):
        assert [
            p.id for p in load_prompts(["a", [{"role": "assistant", "content": "x"}], "b"], skip_invalid=True)
        ] == [
            "0",
            "2",
        ]


@pytest.mark.real
def test_real_hh_file_with_swallowed_turns(shared_data):
    path = shared_data / "hh-harmless-base-test-2000.jsonl.gz"
    with gzip.open(path, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # count the bad dialogues independently: the prompt part of `chosen` must end with a Human turn
    bad = [
        i
        for i, r in enumerate(records)
        if parse_hh_dialogue(hh_prompt_and_response(r["chosen"])[0])[-1]["role"] != "user"
    ]
    assert bad and bad[0] == 1254 and 1952 in bad  # 3 in this file: 1254, 1688, 1952
    with pytest.raises(
        MoalignError, match=r"hh-harmless-base-test-2000\.jsonl\.gz: record 1254: prompt must end"
    ):
        load_prompts(str(path))
    report: dict = {}
    with pytest.warns(UserWarning, match=rf"skipped {len(bad)} of {len(records)} records"):
        ps = load_prompts(str(path), skip_invalid=True, report=report)
    assert report["skipped"] == len(bad) and report["total"] == len(records)
    assert len(ps) == len(records) - len(bad) - report["duplicates"]
    assert not {str(i) for i in bad} & {p.id for p in ps}
    assert all(p.messages[-1]["role"] == "user" for p in ps)
