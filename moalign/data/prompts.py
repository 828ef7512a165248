"""Prompts: plain strings, chat message lists, or Anthropic-HH dialogues, from files or the hub."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from moalign.errors import MoalignError, SettingError

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass(frozen=True)
class Prompt:
    """A conversation that ends with a user turn, waiting for the assistant's reply."""

    messages: tuple[dict, ...]
    id: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def text(self) -> str:
        """Plain text given to objectives: the user message for one turn, HH-style turns otherwise."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        parts = []
        for m in self.messages:
            role = {"user": "Human", "assistant": "Assistant"}.get(m["role"], m["role"].capitalize())
            parts.append(f"\n\n{role}: {m['content']}")
        return "".join(parts).strip()

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": [dict(m) for m in self.messages]}


def parse_hh_dialogue(text: str) -> list[dict]:
    """Split an Anthropic-HH dialogue (``\\n\\nHuman: ... \\n\\nAssistant: ...``) into messages.

    A trailing empty ``Assistant:`` turn (the prompt form) is dropped.
    """
    if "Human:" not in text:
        raise MoalignError("not an HH dialogue: no 'Human:' turn found")
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    pieces = _HH_TURN.split(text)
    # pieces: [preamble, role, content, role, content, ...]
    msgs: list[dict] = []
    for role, content in zip(pieces[1::2], pieces[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


def hh_prompt_and_response(dialogue: str) -> tuple[str, str]:
    """Split an HH dialogue into (prompt through the last ``\\n\\nAssistant:``, final response)."""
    idx = dialogue.rfind("\n\nAssistant:")
    if idx < 0:
        raise MoalignError("not an HH dialogue: no '\\n\\nAssistant:' turn found")
    cut = idx + len("\n\nAssistant:")
    return dialogue[:cut], dialogue[cut:].strip()


def to_prompt(item, id: str | None = None) -> Prompt:
    """Coerce a string, an HH dialogue, a message list or a Prompt into a :class:`Prompt`."""
    if isinstance(item, Prompt):
        return item
    if isinstance(item, str):
        if not item.strip():
            raise MoalignError(f"empty prompt{'' if id is None else f' (record {id})'}")
        if "\n\nHuman:" in item or item.lstrip().startswith("Human:"):
            msgs = parse_hh_dialogue(item)
        else:
            msgs = [{"role": "user", "content": item.strip()}]
    elif isinstance(item, Sequence) and item and all(isinstance(m, dict) for m in item):
        msgs = []
        for m in item:
            if "role" not in m or "content" not in m:
                raise MoalignError(f"chat message needs 'role' and 'content' keys, got {sorted(m)}")
            msgs.append({"role": str(m["role"]), "content": str(m["content"])})
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"].strip():
            msgs.pop()
    else:
        raise MoalignError(f"cannot read a prompt from {type(item).__name__}: {str(item)[:60]!r}")
    if not msgs or msgs[-1]["role"] != "user":
        raise MoalignError(f"prompt{'' if id is None else f' {id}'} must end with a user turn")
    if not msgs[-1]["content"].strip():
        raise MoalignError(f"empty prompt{'' if id is None else f' (record {id})'}")
    return Prompt(tuple(msgs), id=id)


def demo_prompts_path() -> str:
    """The bundled demo prompts (a JSONL file inside the package)."""
    from importlib import resources

    return str(resources.files("moalign") / "resources" / "demo_prompts.jsonl")


# columns tried, in order, when none is given
PROMPT_COLUMNS = ("prompt", "messages", "instruction", "question", "Question", "chosen", "turns")


def _record_id(rec: dict, idx: int) -> str:
    return str(rec.get("id", rec.get("question_id", idx)))


def _prompt_from_record(rec: dict, column: str | None, idx: int) -> Prompt:
    """The prompt of one record; errors name the problem only (the caller adds the file and record)."""
    if column is not None:
        if column not in rec:
            raise MoalignError(f"column {column!r} not found (columns present: {sorted(rec)})")
        value = rec[column]
        col = column
    else:
        col = next((c for c in PROMPT_COLUMNS if c in rec), None)
        if col is None:
            raise MoalignError(f"no prompt column found (columns {sorted(rec)}); name it (prompt_column, --prompt-column)")
        value = rec[col]
    if col == "chosen" and isinstance(value, str):
        value = hh_prompt_and_response(value)[0]
    if col == "turns" and isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]  # MT-Bench / Vicuna: the first turn
    p = to_prompt(value)
    return Prompt(p.messages, id=_record_id(rec, idx), meta=p.meta)


def _record_label(idx: int, rid: str) -> str:
    return f"record {idx}" + ("" if rid == str(idx) else f" (id {rid})")


def _reason_kind(message: str) -> str:
    """The kind of a parse error, for counting: its message up to the first detail."""
    return re.split(r" \(|: |, got ", message, maxsplit=1)[0]


def _collect(
    items: Iterable[tuple[str, Callable[[], Prompt]]],
    source: str,
    limit: int | None,
    dedupe: bool,
    skip_invalid: bool,
) -> tuple[list[Prompt], dict]:
    """Prompts from ``(record label, parse)`` items, raising on the first bad one or skipping and counting.

    Returns the prompts and ``{skipped, total, reasons, first, duplicates}`` (see :func:`load_prompts`).
    """
    out: list[Prompt] = []
    seen: set[tuple] = set()
    reasons: Counter[str] = Counter()
    first: str | None = None
    total = duplicates = 0
    for label, parse in items:
        total += 1
        try:
            p = parse()
        except MoalignError as e:
            if not skip_invalid:
                raise MoalignError(f"{source}: {label}: {e}") from None
            reasons[_reason_kind(str(e))] += 1
            first = first or f"{label}: {e}"
            continue
        if dedupe:
            key = tuple((m["role"], m["content"]) for m in p.messages)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    skipped = sum(reasons.values())
    if skipped and not out:
        counts = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        raise MoalignError(
            f"no valid prompts in {source}: all {total} records invalid ({counts}; first: {first})"
        )
    stats = {
        "skipped": skipped,
        "total": total,
        "reasons": dict(reasons),
        "first": first,
        "duplicates": duplicates,
    }
    return out, stats


def _report_skipped(source: str, stats: dict, report: dict | None) -> None:
    """Fill the caller's ``report`` and warn once about skipped records (at the public function's caller)."""
    if report is not None:
        report.clear()
        report.update(stats)
    if stats["skipped"]:
        reasons = sorted(stats["reasons"].items(), key=lambda kv: -kv[1])
        label, _, why = stats["first"].partition(": ")
        first = label if why == _reason_kind(why) else stats["first"]  # no repeat of a bare reason
        warnings.warn(
            f"{source}: skipped {stats['skipped']} of {stats['total']} records: "
            + ", ".join(f"{n} {r}" for r, n in reasons)
            + f" (first: {first})",
            stacklevel=3,
        )


def _record_items(records: Iterable[dict], column: str | None):
    for i, rec in enumerate(records):
        yield _record_label(i, _record_id(rec, i)), lambda rec=rec, i=i: _prompt_from_record(rec, column, i)


def _item_prompt(x, i: int) -> Prompt:
    if isinstance(x, Prompt):
        return x
    return Prompt(to_prompt(x).messages, id=str(i))


def prompts_from_records(
    records: Iterable[dict],
    column: str | None = None,
    limit: int | None = None,
    dedupe: bool = True,
    *,
    skip_invalid: bool = False,
    source: str = "records",
    report: dict | None = None,
) -> list[Prompt]:
    """Prompts from dict records (see :func:`load_prompts` for ``skip_invalid`` and ``report``)."""
    out, stats = _collect(_record_items(records, column), source, limit, dedupe, skip_invalid)
    _report_skipped(source, stats, report)
    return out


def load_prompts(
    source: str | Sequence,
    column: str | None = None,
    limit: int | None = None,
    split: str = "test",
    dedupe: bool = True,
    *,
    skip_invalid: bool = False,
    report: dict | None = None,
) -> list[Prompt]:
    """Load prompts from a list, a local JSONL/JSON/CSV/TXT file (gzip too) or a hub dataset id.

    With no ``column``, the first of ``prompt, messages, instruction, question, chosen, turns`` present
    is used; HH ``chosen`` dialogues are cut at the last ``Assistant:`` turn.

    A record that gives no prompt (a dialogue that does not end with a user turn, an empty prompt, a missing
    column) raises :class:`MoalignError` naming the file and the record
    (``data.jsonl: record 7: prompt must end with a user turn``). With ``skip_invalid=True`` such records are
    skipped instead, with one warning that counts them by reason; ``limit`` counts the valid prompts kept.
    A ``report`` dict, when given, is filled with ``skipped`` (records skipped), ``total`` (records read),
    ``reasons`` (``{reason: count}``), ``first`` (the first skipped record and why, or ``None``) and
    ``duplicates`` (records dropped by ``dedupe``).
    """
    from moalign.data.files import read_records

    if limit is not None and limit < 1:
        raise SettingError("prompts", "limit", f"must be >= 1, got {limit}")
    if isinstance(source, str):
        items = _record_items(read_records(source, split=split), column)
        out, stats = _collect(items, source, limit, dedupe, skip_invalid)
        if not out:
            raise MoalignError(f"no prompts found in {source}")
    else:  # an in-memory list: no dedupe
        items = ((f"item {i}", lambda x=x, i=i: _item_prompt(x, i)) for i, x in enumerate(source))
        out, stats = _collect(items, "prompts", limit, False, skip_invalid)
    _report_skipped(source if isinstance(source, str) else "prompts", stats, report)
    return out


def prompt_messages(prompt: str) -> list[dict]:
    """Chat messages from a prompt's plain text (:attr:`Prompt.text`): an HH-style multi-turn text
    (``Human: ... Assistant: ...``) is split into its turns, anything else is one user turn."""
    if prompt.lstrip().startswith("Human:") or "\n\nHuman:" in prompt:
        try:
            msgs = parse_hh_dialogue(prompt)
            if msgs and msgs[-1]["role"] == "user":
                return msgs
        except MoalignError:
            pass
    return [{"role": "user", "content": prompt}]
