"""Preference-pair loading (every shared data file, synthetic files, errors) and the held-out split."""

from __future__ import annotations

import csv
import gzip
import json
import warnings
from pathlib import Path

import pytest

from moalign.data.pairs import PreferencePair, is_heldout, load_pairs, split_pairs
from moalign.data.prompts import to_prompt
from moalign.errors import MoalignError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not available")

HH_FILES = {
    "hh-helpful-base-test.jsonl.gz": 2354,
    "hh-helpful-rejection-sampled-test.jsonl.gz": 2749,
    "hh-harmless-base-test-2000.jsonl.gz": 2000,
}


def _load_quiet(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pairs(str(path), **kw)


def _raw_records(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        if path.name.endswith(".jsonl.gz"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


@needs_data
@pytest.mark.parametrize("fname", sorted(HH_FILES))
def test_hh_files_load(fname):
    path = DATA / fname
    with pytest.warns(UserWarning, match="skipped"):
        pairs = load_pairs(str(path))
    raw = _raw_records(path)
    assert len(raw) == HH_FILES[fname]
    # at most a handful of records are unusable (empty response, tie)
    assert len(raw) - 40 <= len(pairs) < len(raw)
    for p in pairs:
        assert isinstance(p, PreferencePair)
        assert p.chosen and p.rejected and p.chosen != p.rejected
        assert p.prompt.messages[-1]["role"] == "user"
        assert p.meta["format"] == "hh"
    # the usual case: chosen dialogue == prompt text + "\n\nAssistant: " + response, reassembled exactly
    by_index = {p.meta["index"]: p for p in pairs}
    checked = 0
    for i, rec in enumerate(raw[:200]):
        p = by_index.get(i)
        if p is None or p.meta["prompt_cut"] != "last_assistant":
            continue
        cut = rec["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert rec["chosen"][cut:].strip() == p.chosen
        assert rec["rejected"][cut:].strip() == p.rejected
        assert to_prompt(rec["chosen"][:cut]).messages == p.prompt.messages
        checked += 1
    assert checked > 150


@needs_data
def test_hh_divergent_dialogues_use_common_prefix():
    pairs = _load_quiet(DATA / "hh-helpful-base-test.jsonl.gz")
    odd = [p for p in pairs if p.meta["prompt_cut"] == "common_prefix"]
    assert odd, "the helpful-base test split has records whose dialogues diverge before the last turn"
    raw = _raw_records(DATA / "hh-helpful-base-test.jsonl.gz")
    for p in odd:
        rec = raw[p.meta["index"]]
        # both responses are the continuation of a shared prompt ending with "Assistant:"
        assert rec["chosen"].rstrip().endswith(p.chosen[-40:])
        assert rec["rejected"].rstrip().endswith(p.rejected[-40:])


@needs_data
def test_pku_file_loads_safer_first():
    pairs = _load_quiet(DATA / "pku-saferlhf-safer-5k.json.gz")
    raw = _raw_records(DATA / "pku-saferlhf-safer-5k.json.gz")
    assert len(pairs) == len(raw) == 5135
    assert len({p.prompt.text for p in pairs}) == 930
    for p, r in zip(pairs[:50], raw[:50]):
        assert p.chosen == r["response"][0].strip()
        assert p.rejected == r["response"][1].strip()
        assert p.prompt.text == r["prompt"].strip()
        assert p.meta["format"] == "pku"


@needs_data
@pytest.mark.parametrize("fname,n", [("ultrafeedback-binarized-1000.jsonl.gz", 1000),
                                     ("ultrafeedback-binarized-eval-200.jsonl.gz", 200)])  # fmt: skip
def test_ultrafeedback_files_load(fname, n):
    pairs = _load_quiet(DATA / fname)
    raw = _raw_records(DATA / fname)
    assert len(raw) == n
    assert n - 10 <= len(pairs) <= n
    p = pairs[0]
    assert p.prompt.text == raw[0]["prompt"].strip()
    assert p.chosen == raw[0]["chosen"].strip()
    assert p.meta["metadata"]["score_chosen"] >= p.meta["metadata"]["score_rejected"]


@needs_data
def test_truthfulqa_expands_incorrect_answers():
    pairs = _load_quiet(DATA / "truthfulqa.csv.gz")
    with gzip.open(DATA / "truthfulqa.csv.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    first = [p for p in pairs if p.meta["index"] == 0]
    wrong = [w.strip() for w in rows[0]["Incorrect Answers"].split(";") if w.strip()]
    assert [p.rejected for p in first] == wrong
    assert all(p.chosen == rows[0]["Best Answer"].strip() for p in first)
    assert len({p.meta["index"] for p in pairs}) == len(rows) == 817


@needs_data
@pytest.mark.parametrize("fname", ["mt-bench-questions.jsonl", "vicuna-bench-questions.jsonl"])
def test_question_only_files_raise_clear_error(fname):
    with pytest.raises(MoalignError, match=r"column 'chosen' not found.*question_id, category, turns"):
        load_pairs(str(DATA / fname))


def _write(path: Path, records, kind: str) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        if kind == "jsonl":
            for r in records:
                f.write(json.dumps(r) + "\n")
        elif kind == "json":
            json.dump(records, f)
        else:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    return path


GENERIC = [
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "A car."},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]


@pytest.mark.parametrize("name,kind", [("p.jsonl", "jsonl"), ("p.jsonl.gz", "jsonl"), ("p.json", "json"),
                                       ("p.json.gz", "json"), ("p.csv", "csv"), ("p.csv.gz", "csv")])  # fmt: skip
def test_generic_files_all_formats(tmp_path, name, kind):
    pairs = load_pairs(str(_write(tmp_path / name, GENERIC, kind)))
    assert [(p.prompt.text, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in GENERIC
    ]
    assert load_pairs(str(tmp_path / name), limit=2) == pairs[:2]


def test_hh_synthetic_and_pku_and_custom_columns(tmp_path):
    hh = [
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
        }
    ]
    (p,) = load_pairs(str(_write(tmp_path / "hh.jsonl.gz", hh, "jsonl")))
    assert p.prompt.messages == (
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    )
    assert (p.chosen, p.rejected) == ("Fine, thanks.", "Go away.")

    pku = [{"prompt": "How do I pick a lock?", "response": ["Call a locksmith.", "Use a tension wrench..."]}]
    (q,) = load_pairs(str(_write(tmp_path / "pku.json", pku, "json")))
    assert (q.chosen, q.rejected) == ("Call a locksmith.", "Use a tension wrench...")

    hub_pku = [{"prompt": "Q?", "response_0": "bad", "response_1": "good", "safer_response_id": 1}]
    (h,) = load_pairs(hub_pku)
    assert (h.chosen, h.rejected) == ("good", "bad")

    custom = [{"q": "Why?", "good": "Because.", "bad": "Dunno."}]
    (c,) = load_pairs(custom, prompt_column="q", chosen_column="good", rejected_column="bad")
    assert (c.prompt.text, c.chosen, c.rejected) == ("Why?", "Because.", "Dunno.")


def test_chat_message_lists_ultrafeedback_hub_layout():
    rec = {
        "prompt": "Tell me a joke",
        "chosen": [
            {"role": "user", "content": "Tell me a joke"},
            {"role": "assistant", "content": "Knock knock."},
        ],
        "rejected": [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}],
    }
    (p,) = load_pairs([rec])
    assert (p.prompt.text, p.chosen, p.rejected) == ("Tell me a joke", "Knock knock.", "No.")
    # without a prompt column the prompt comes from the messages before the reply
    rec2 = {k: v for k, v in rec.items() if k != "prompt"}
    (p2,) = load_pairs([rec2])
    assert p2.prompt.messages == ({"role": "user", "content": "Tell me a joke"},)
    assert p2.chosen == "Knock knock."


def test_missing_column_names_column_and_columns_present():
    with pytest.raises(
        MoalignError, match=r"column 'rejected' not found in record 0; columns present: prompt, chosen"
    ):
        load_pairs([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(MoalignError, match=r"column 'answer' not found.*prompt, chosen, rejected"):
        load_pairs(GENERIC, chosen_column="answer")
    with pytest.raises(MoalignError, match=r"column 'q' not found"):
        load_pairs(GENERIC, prompt_column="q")


def test_empty_responses_skip_with_warning_or_raise():
    recs = [
        *GENERIC,
        {"prompt": "x", "chosen": "  ", "rejected": "y"},
        {"prompt": "x", "chosen": "y", "rejected": ""},
    ]
    with pytest.warns(
        UserWarning, match=r"skipped 2 of 5 records: 1 empty chosen response, 1 empty rejected"
    ):
        pairs = load_pairs(recs)
    assert len(pairs) == 3
    with pytest.raises(MoalignError, match=r"record 3: empty chosen response"):
        load_pairs(recs, strict=True)
    with pytest.raises(MoalignError, match=r"no usable preference pairs.*1 empty rejected response"):
        load_pairs([{"prompt": "x", "chosen": "y", "rejected": None}])
    with pytest.raises(MoalignError, match="file not found"):
        load_pairs("/nonexistent/pairs.jsonl")
    with pytest.raises(MoalignError, match="limit"):
        load_pairs(GENERIC, limit=0)


def _synthetic_pairs(n_prompts: int, per_prompt: int = 3) -> list[PreferencePair]:
    return [
        PreferencePair(to_prompt(f"question number {i}"), f"good {i}.{j}", f"bad {i}.{j}", {})
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]


def test_split_is_deterministic_disjoint_and_respects_fraction():
    pairs = _synthetic_pairs(2000)
    train, held = split_pairs(pairs, heldout_frac=0.2, seed=0)
    assert len(train) + len(held) == len(pairs)
    assert split_pairs(pairs, 0.2, 0) == (train, held)
    # independent of order and of the subset given
    train_r, held_r = split_pairs(list(reversed(pairs)), 0.2, 0)
    assert {id(p) for p in held_r} == {id(p) for p in held}
    _, held_sub = split_pairs(pairs[:600], 0.2, 0)
    assert held_sub == [p for p in held if p in pairs[:600]]
    # disjoint by prompt: every pair of a prompt is on the same side
    tr_prompts = {p.prompt.text for p in train}
    ho_prompts = {p.prompt.text for p in held}
    assert not tr_prompts & ho_prompts
    # fraction of prompts held out ~ Binomial(2000, 0.2): mean 400, sd ~18
    assert 330 < len(ho_prompts) < 470
    assert all(is_heldout(p.prompt, 0.2, 0) for p in held)
    # another seed gives another split; fraction 0 holds nothing out
    _, held1 = split_pairs(pairs, 0.2, seed=1)
    assert {p.prompt.text for p in held1} != ho_prompts
    assert split_pairs(pairs, 0.0, 0)[1] == []
    with pytest.raises(MoalignError, match="heldout_frac"):
        split_pairs(pairs, 1.0)


@needs_data
def test_split_of_real_file_is_stable():
    pairs = _load_quiet(DATA / "pku-saferlhf-safer-5k.json.gz")
    train, held = split_pairs(pairs, 0.2, 0)
    assert not {p.prompt.text for p in train} & {p.prompt.text for p in held}
    frac = len({p.prompt.text for p in held}) / 930
    assert 0.15 < frac < 0.25


def test_hub_dataset_records_and_split_are_passed_through(monkeypatch):
    """A hub id goes through read_records with the split; the hub's UltraFeedback layout loads."""
    from moalign.data import files

    seen = {}

    def fake_hub(source, split):
        seen["args"] = (source, split)
        msgs = [{"role": "user", "content": "Hi?"}]
        return [
            {
                "prompt": "Hi?",
                "chosen": [*msgs, {"role": "assistant", "content": "Hello! How can I help?"}],
                "rejected": [*msgs, {"role": "assistant", "content": "What."}],
                "score_chosen": 8.0,
            }
        ]

    monkeypatch.setattr(files, "_read_hub", fake_hub)
    (p,) = load_pairs("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert seen["args"] == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert (p.prompt.text, p.chosen, p.rejected) == ("Hi?", "Hello! How can I help?", "What.")
    assert p.meta["score_chosen"] == 8.0


def test_unknown_hub_dataset_is_a_clear_error():
    with pytest.raises(MoalignError, match="cannot load dataset"):
        load_pairs("moalign-test-nonexistent-org/no-such-dataset")
