"""Prompts: plain strings, chat message lists, or Anthropic-HH dialogues, from files or the hub."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from moalign.errors import MoalignError

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


# columns tried, in order, when none is given
PROMPT_COLUMNS = ("prompt", "messages", "instruction", "question", "Question", "chosen", "turns")


def _prompt_from_record(rec: dict, column: str | None, idx: int) -> Prompt:
    if column is not None:
        if column not in rec:
            raise MoalignError(f"column {column!r} not found; record {idx} has columns {sorted(rec)}")
        value = rec[column]
        col = column
    else:
        col = next((c for c in PROMPT_COLUMNS if c in rec), None)
        if col is None:
            raise MoalignError(
                f"no prompt column found in record {idx} (columns {sorted(rec)}); pass --prompt-column"
            )
        value = rec[col]
    if col == "chosen" and isinstance(value, str):
        value = hh_prompt_and_response(value)[0]
    if col == "turns" and isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]  # MT-Bench / Vicuna: the first turn
    rid = rec.get("id", rec.get("question_id", idx))
    return to_prompt(value, id=str(rid))


def prompts_from_records(
    records: Iterable[dict], column: str | None = None, limit: int | None = None, dedupe: bool = True
) -> list[Prompt]:
    out: list[Prompt] = []
    seen: set[tuple] = set()
    for i, rec in enumerate(records):
        p = _prompt_from_record(rec, column, i)
        if dedupe:
            key = tuple((m["role"], m["content"]) for m in p.messages)
            if key in seen:
                continue
            seen.add(key)
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out


def load_prompts(
    source: str | Sequence,
    column: str | None = None,
    limit: int | None = None,
    split: str = "test",
    dedupe: bool = True,
) -> list[Prompt]:
    """Load prompts from a list, a local JSONL/JSON/CSV/TXT file (gzip too) or a hub dataset id.

    With no ``column``, the first of ``prompt, messages, instruction, question, chosen, turns`` present
    is used; HH ``chosen`` dialogues are cut at the last ``Assistant:`` turn.
    """
    from moalign.data.files import read_records

    if limit is not None and limit < 1:
        raise MoalignError(f"--limit must be >= 1, got {limit}")
    if not isinstance(source, str):
        items = list(source)
        prompts = [to_prompt(x, id=str(i)) for i, x in enumerate(items)]
        return prompts[:limit] if limit else prompts
    records = read_records(source, split=split)
    prompts = prompts_from_records(records, column=column, limit=limit, dedupe=dedupe)
    if not prompts:
        raise MoalignError(f"no prompts found in {source}")
    return prompts
