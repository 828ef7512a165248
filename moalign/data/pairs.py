"""Preference pairs (prompt, chosen, rejected) from files, hub datasets or in-memory records.

Formats recognised per record (first match wins):

* **PKU-SafeRLHF** (local export): ``{"prompt", "response": [safer, less_safe]}``; the hub layout
  ``{"prompt", "response_0", "response_1", "safer_response_id"}`` is read too.
* **TruthfulQA**: ``Question`` / ``Best Answer`` / ``Incorrect Answers`` (CSV, ``;``-separated) or the hub's
  ``question`` / ``best_answer`` / ``incorrect_answers`` (list): one pair per incorrect answer.
* **Anthropic HH**: no prompt column, ``chosen`` / ``rejected`` are full dialogues
  ``\\n\\nHuman: ... \\n\\nAssistant: ...``. The prompt is everything up to and including the last
  ``\\n\\nAssistant:``, the response is the rest. When the two dialogues already differ before that point
  (a few HH records do), the prompt is their longest common prefix that ends with ``\\n\\nAssistant:``.
* **Generic / UltraFeedback**: a prompt column (``prompt_column`` or the first of ``prompt, messages,
  instruction, question``) plus ``chosen`` / ``rejected`` columns holding plain strings or chat-message lists
  (the hub's UltraFeedback layout: the response is the last assistant message, and the prompt is taken from
  the messages before it when there is no prompt column).

Records whose pair carries no preference are skipped with one warning that counts them by reason: an empty
chosen or rejected response, ``chosen == rejected``, or a prompt that does not end with a user turn. With
``strict=True`` the first such record raises :class:`MoalignError` instead; a file with no usable pair always
raises. A missing column always raises, naming the column and the columns present.

:func:`split_pairs` splits by a stable hash of the prompt text, so every pair of one prompt lands on the same
side, and every component (DPO trainer, reward models, benchmarks) sees the same held-out prompts.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from moalign.data.prompts import Prompt, hh_prompt_and_response, to_prompt
from moalign.errors import MoalignError

_ASSISTANT = "\n\nAssistant:"
_GENERIC_PROMPT_COLUMNS = ("prompt", "messages", "instruction", "question", "Question")


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``."""

    prompt: Prompt
    chosen: str
    rejected: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt.to_dict(),
            "chosen": self.chosen,
            "rejected": self.rejected,
            "meta": dict(self.meta),
        }


class _Skip(Exception):
    """A record that holds no usable preference (reason in args[0])."""


def _response_text(value, column: str, idx: int) -> tuple[str, list[dict] | None]:
    """(response text, preceding messages or None) from a string or a chat-message list."""
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, Sequence) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if "role" not in m or "content" not in m:
                raise MoalignError(
                    f"record {idx}: column {column!r} holds chat messages without 'role'/'content' keys"
                )
        last = value[-1]
        if last["role"] != "assistant":
            raise MoalignError(
                f"record {idx}: column {column!r} is a message list that does not end with an assistant turn"
            )
        return str(last["content"]), [dict(m) for m in value[:-1]]
    if isinstance(value, Sequence) and not value:
        return "", None
    raise MoalignError(
        f"record {idx}: column {column!r} must be a string or a chat-message list, got {type(value).__name__}"
    )


def _hh_split(chosen: str, rejected: str) -> tuple[str, str, str, str]:
    """(prompt, chosen response, rejected response, how) for two HH dialogues."""
    pc, rc = hh_prompt_and_response(chosen)
    pr, rr = hh_prompt_and_response(rejected)
    if pc == pr:
        return pc, rc, rr, "last_assistant"
    # the dialogues diverge earlier: cut at the last "\n\nAssistant:" inside their common prefix
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(_ASSISTANT, 0, n)
    if cut < 0:
        raise _Skip("chosen and rejected dialogues share no prompt")
    cut += len(_ASSISTANT)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip(), "common_prefix"


def _looks_hh(value) -> bool:
    return isinstance(value, str) and _ASSISTANT in value and "Human:" in value


def _check_columns(rec: dict, idx: int, *cols: str) -> None:
    for c in cols:
        if c not in rec:
            raise MoalignError(
                f"column {c!r} not found in record {idx}; columns present: {', '.join(map(str, rec))}. "
                "Preference pairs need a prompt plus chosen/rejected responses "
                "(set prompt_column / chosen_column / rejected_column)"
            )


def _json_meta(rec: dict, skip: Iterable[str]) -> dict:
    skip = set(skip)
    out = {}
    for k, v in rec.items():
        if k in skip:
            continue
        if isinstance(v, (str, int, float, bool, type(None), dict, list)):
            out[k] = v
    return out


def _pairs_from_record(
    rec: dict, idx: int, prompt_column: str | None, chosen_column: str, rejected_column: str
) -> list[tuple[object, str, str, dict]]:
    """Raw (prompt item, chosen, rejected, meta) tuples from one record; may raise _Skip."""
    if not isinstance(rec, dict):
        raise MoalignError(f"record {idx} is a {type(rec).__name__}, expected an object with named columns")
    # PKU-SafeRLHF, local export: response = [safer, less safe]
    if chosen_column not in rec and isinstance(rec.get("response"), list) and "prompt" in rec:
        resp = rec["response"]
        if len(resp) != 2:
            raise MoalignError(f"record {idx}: 'response' must hold exactly 2 responses, got {len(resp)}")
        meta = {"format": "pku", **_json_meta(rec, ("prompt", "response"))}
        return [(rec[prompt_column or "prompt"], resp[0], resp[1], meta)]
    # PKU-SafeRLHF, hub layout
    if chosen_column not in rec and {"response_0", "response_1", "safer_response_id"} <= set(rec):
        sid = int(rec["safer_response_id"])
        if sid not in (0, 1):
            raise MoalignError(f"record {idx}: safer_response_id must be 0 or 1, got {sid}")
        meta = {"format": "pku", "safer_response_id": sid}
        return [(rec[prompt_column or "prompt"], rec[f"response_{sid}"], rec[f"response_{1 - sid}"], meta)]
    # TruthfulQA: best answer vs each incorrect answer
    if chosen_column not in rec and (
        {"Question", "Best Answer", "Incorrect Answers"} <= set(rec)
        or {"question", "best_answer", "incorrect_answers"} <= set(rec)
    ):
        hub = "best_answer" in rec
        q = rec[prompt_column or ("question" if hub else "Question")]
        best = rec["best_answer" if hub else "Best Answer"]
        wrong = rec["incorrect_answers" if hub else "Incorrect Answers"]
        if isinstance(wrong, str):
            wrong = [w.strip() for w in wrong.split(";")]
        wrong = [w for w in wrong if w and w.strip()]
        if not wrong:
            raise _Skip("no incorrect answer")
        cat = rec.get("category", rec.get("Category"))
        return [
            (q, best, w, {"format": "truthfulqa", "category": cat, "answer": j}) for j, w in enumerate(wrong)
        ]
    _check_columns(rec, idx, chosen_column, rejected_column)
    chosen_v, rejected_v = rec[chosen_column], rec[rejected_column]
    pcol = prompt_column
    if pcol is None:
        pcol = next((c for c in _GENERIC_PROMPT_COLUMNS if c in rec), None)
    elif pcol not in rec:
        _check_columns(rec, idx, pcol)
    # Anthropic HH: full dialogues, no prompt column
    if pcol is None and _looks_hh(chosen_v) and _looks_hh(rejected_v):
        prompt, ch, rj, how = _hh_split(chosen_v, rejected_v)
        return [(prompt, ch, rj, {"format": "hh", "prompt_cut": how})]
    ch, ch_prefix = _response_text(chosen_v, chosen_column, idx)
    rj, rj_prefix = _response_text(rejected_v, rejected_column, idx)
    if pcol is not None:
        prompt = rec[pcol]
        # some exports repeat the prompt at the start of each response
        if isinstance(prompt, str) and prompt.strip():
            if ch.startswith(prompt) and rj.startswith(prompt):
                ch, rj = ch[len(prompt) :], rj[len(prompt) :]
    elif ch_prefix:
        prompt = ch_prefix  # UltraFeedback hub: the messages before the assistant reply
    else:
        raise MoalignError(
            f"no prompt column found in record {idx}; columns present: {', '.join(map(str, rec))} "
            "(set prompt_column)"
        )
    meta = {"format": "generic", **_json_meta(rec, (pcol, chosen_column, rejected_column))}
    return [(prompt, ch, rj, meta)]


def pairs_from_records(
    records: Iterable[dict],
    *,
    prompt_column: str | None = None,
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    limit: int | None = None,
    strict: bool = False,
    source: str = "records",
) -> list[PreferencePair]:
    """Preference pairs from an iterable of dict records (see the module docstring for the formats)."""
    if limit is not None and limit < 1:
        raise MoalignError(f"limit must be >= 1, got {limit}")
    out: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    n_records = 0
    for idx, rec in enumerate(records):
        n_records += 1
        try:
            raw = _pairs_from_record(rec, idx, prompt_column, chosen_column, rejected_column)
            made = []
            for j, (prompt_item, ch, rj, meta) in enumerate(raw):
                ch = ch.strip() if isinstance(ch, str) else ""
                rj = rj.strip() if isinstance(rj, str) else ""
                if not ch:
                    raise _Skip("empty chosen response")
                if not rj:
                    raise _Skip("empty rejected response")
                if ch == rj:
                    raise _Skip("chosen == rejected")
                rid = rec.get("id", rec.get("question_id", idx))
                try:
                    prompt = to_prompt(prompt_item, id=str(rid))
                except MoalignError as e:
                    raise _Skip(f"unusable prompt ({e})") from None
                meta = {"source": source, "index": idx, **({"sub": j} if len(raw) > 1 else {}), **meta}
                made.append(PreferencePair(prompt, ch, rj, meta))
        except _Skip as s:
            reason = str(s.args[0])
            if strict:
                raise MoalignError(f"{source}: record {idx}: {reason}") from None
            skipped[reason.split(" (")[0]] += 1
            continue
        out.extend(made)
        if limit is not None and len(out) >= limit:
            out = out[:limit]
            break
    if not out:
        why = f" ({', '.join(f'{n} {r}' for r, n in skipped.items())})" if skipped else ""
        raise MoalignError(f"no usable preference pairs in {source}: {n_records} records{why}")
    if skipped:
        warnings.warn(
            f"{source}: skipped {sum(skipped.values())} of {n_records} records: "
            + ", ".join(f"{n} {r}" for r, n in skipped.most_common()),
            stacklevel=3,
        )
    return out


def load_pairs(
    source: str | Sequence,
    *,
    prompt_column: str | None = None,
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    limit: int | None = None,
    split: str = "train",
    strict: bool = False,
) -> list[PreferencePair]:
    """Load preference pairs from a local JSONL/JSON/CSV file (gzip too), a hub dataset id
    (``owner/name`` or ``owner/name:split``), or a list of records / :class:`PreferencePair`.

    ``limit`` caps the number of pairs returned (after skipping unusable records).
    """
    if isinstance(source, str):
        from moalign.data.files import read_records

        records = read_records(source, split=split)
        name = source
    else:
        items = list(source)
        if items and all(isinstance(p, PreferencePair) for p in items):
            return items[:limit] if limit else items
        records, name = items, "records"
    return pairs_from_records(
        records,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        limit=limit,
        strict=strict,
        source=name,
    )


def heldout_score(prompt_text: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) from SHA-256 of ``seed`` and the prompt text."""
    h = hashlib.sha256(f"{int(seed)}\x1f{prompt_text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def is_heldout(prompt: Prompt | str, heldout_frac: float = 0.2, seed: int = 0) -> bool:
    """Whether a prompt belongs to the held-out side of :func:`split_pairs`."""
    text = prompt.text if isinstance(prompt, Prompt) else str(prompt)
    return heldout_score(text, seed) < heldout_frac


def split_pairs(
    pairs: Sequence[PreferencePair], heldout_frac: float = 0.2, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic (train, held-out) split by prompt.

    A pair is held out when ``sha256(seed, prompt.text)`` read as a number in [0, 1) is below
    ``heldout_frac``; so the split does not depend on the order or the subset of pairs given, all pairs of
    a prompt land on the same side, and the held-out share of prompts is ``heldout_frac`` in expectation.
    """
    if not 0.0 <= heldout_frac < 1.0:
        raise MoalignError(f"heldout_frac must be in [0, 1), got {heldout_frac}")
    train: list[PreferencePair] = []
    held: list[PreferencePair] = []
    for p in pairs:
        (held if is_heldout(p.prompt, heldout_frac, seed) else train).append(p)
    return train, held
