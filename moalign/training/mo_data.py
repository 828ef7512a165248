"""Data for multi-objective DPO: per-objective preference pairs, tokenisation, a zipped dataset and a collator.

One training item holds one pair per objective, so the Trainer's ordinary sampler/dataloader (shuffling,
distributed sharding, resume-by-skipping) yields batches that contain ``B`` pairs of EVERY objective. The
collator turns them into one padded sub-batch per objective::

    {"objectives": {name: {"input_ids": [2B, T], "attention_mask": [2B, T], "completion_mask": [2B, T],
                           ("ref_logps": [2B])}}}

Rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected. Item ``i`` uses pair
``perm_k[i mod n_k]`` of objective ``k`` (``perm_k`` a seeded permutation), so objectives with fewer pairs
are cycled and the pairing of objectives changes between epochs.

Truncation (as in TRL): the prompt keeps its LAST ``max_prompt_length`` tokens; the completion keeps its
first ``max_length - len(prompt)`` tokens (at least one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moalign.errors import MoalignError


@dataclass(frozen=True)
class ObjectiveSpec:
    """``NAME=SOURCE`` from the command line: an objective name and its preference data (path or hub id)."""

    name: str
    source: str


def parse_objective_spec(spec: str) -> ObjectiveSpec:
    """Parse ``NAME=PATH_OR_HUB_ID``; raise :class:`MoalignError` when the ``=`` or a side is missing."""
    if not isinstance(spec, str) or "=" not in spec:
        raise MoalignError(
            f"objective spec {spec!r} must look like NAME=PATH (e.g. helpful=hh-helpful.jsonl.gz)"
        )
    name, source = (s.strip() for s in spec.split("=", 1))
    if not name:
        raise MoalignError(f"objective spec {spec!r} has an empty name before '='")
    if not source:
        raise MoalignError(f"objective spec {spec!r} has an empty data source after '='")
    return ObjectiveSpec(name, source)


def flatten_specs(value) -> list[str]:
    """Objective specs given as a string, a list, or a list of lists (repeated ``--objective`` flags)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    for v in value:
        out.extend(flatten_specs(v))
    return out


# -------------------------------------------------------------------------------------------- tokenising
@dataclass
class TokenizedPair:
    """Token ids of one preference pair after truncation; ``ref`` = reference log-probs (chosen, rejected)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref: tuple[float, float] | None = None


def completion_text(tokenizer, messages: Sequence[dict], prompt_text: str, response: str) -> str:
    """The text that follows ``prompt_text`` when ``response`` is the assistant's reply, end-of-turn
    marker included (from the chat template; ``response + eos`` for template-less tokenizers)."""
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(prompt_text) and len(full) > len(prompt_text):
            return full[len(prompt_text) :]
    return " " + response + (tokenizer.eos_token or "")


def tokenize_pair(tokenizer, pair, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """Render a :class:`~moalign.data.pairs.PreferencePair` with the policy's chat template and truncate."""
    from moalign.policies import render_chat

    prompt_text = render_chat(tokenizer, pair.prompt.messages)
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    outs = []
    for resp in (pair.chosen, pair.rejected):
        c = tokenizer(
            completion_text(tokenizer, pair.prompt.messages, prompt_text, resp), add_special_tokens=False
        ).input_ids
        outs.append(c)
    return truncate(p, outs[0], outs[1], max_length, max_prompt_length)


def truncate(prompt, chosen, rejected, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """Keep the prompt's last ``max_prompt_length`` tokens, then cut completions to fit ``max_length``."""
    if max_prompt_length >= max_length:
        raise MoalignError(
            f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})"
        )
    prompt = list(prompt)[-max_prompt_length:] if max_prompt_length > 0 else list(prompt)
    room = max(1, max_length - len(prompt))
    return TokenizedPair(prompt, list(chosen)[:room], list(rejected)[:room])


# ---------------------------------------------------------------------------------------------- dataset
class MultiObjectiveDataset(torch.utils.data.Dataset):
    """Zips K lists of tokenised pairs: item ``i`` = one pair index per objective (see module docstring)."""

    def __init__(self, data: dict[str, list[TokenizedPair]], seed: int = 0):
        if not data:
            raise MoalignError("need at least one objective with preference pairs")
        for name, pairs in data.items():
            if not pairs:
                raise MoalignError(f"objective {name!r} has no training pairs")
        self.names = list(data)
        self.data = data
        g = torch.Generator().manual_seed(int(seed))
        self.perms = {n: torch.randperm(len(p), generator=g).tolist() for n, p in data.items()}
        self.length = max(len(p) for p in data.values())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, int]:
        return {n: self.perms[n][i % len(self.perms[n])] for n in self.names}


class MultiObjectiveCollator:
    """Pads each objective's pairs into one ``[2B, T]`` sub-batch (right padding)."""

    def __init__(self, dataset: MultiObjectiveDataset, pad_token_id: int):
        self.dataset = dataset
        self.pad = int(pad_token_id)

    def batch_for(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        """One objective's sub-batch from a list of tokenised pairs."""
        seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        width = max(len(a) + len(b) for a, b in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        comp = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (a, b) in enumerate(seqs):
            n = len(a) + len(b)
            ids[r, :n] = torch.tensor(a + b, dtype=torch.long)
            attn[r, :n] = 1
            comp[r, len(a) : n] = True
        out = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
        if all(p.ref is not None for p in pairs):
            out["ref_logps"] = torch.tensor(
                [p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32
            )
        return out

    def __call__(self, items: list[dict[str, int]]) -> dict:
        return {
            "objectives": {
                n: self.batch_for([self.dataset.data[n][it[n]] for it in items]) for n in self.dataset.names
            }
        }


def load_objective_data(cfg) -> dict[str, tuple[list, list]]:
    """``{objective: (train pairs, held-out pairs)}`` of a :class:`~moalign.training.dpo_config.MultiObjectiveDPOConfig`,
    with moalign's stable prompt-hash split."""
    from moalign.data.pairs import load_pairs, split_pairs

    kw = dict(
        prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column
    )
    groups: dict[str, list] = {}
    if cfg.dataset:
        pairs = load_pairs(cfg.dataset, **kw)
        for p in pairs:
            if cfg.objective_column not in p.meta:
                present = ", ".join(sorted(k for k in p.meta if k not in ("source", "index", "format")))
                raise MoalignError(
                    f"--dataset {cfg.dataset}: column {cfg.objective_column!r} not found (other columns: {present})"
                )
            groups.setdefault(str(p.meta[cfg.objective_column]), []).append(p)
    else:
        for spec in cfg.objective_specs():
            groups[spec.name] = load_pairs(spec.source, **kw)
    out = {}
    for name, pairs in groups.items():
        train, held = split_pairs(pairs, heldout_frac=cfg.heldout_frac, seed=cfg.split_seed)
        if not train:
            raise MoalignError(
                f"objective {name!r}: no training pairs left after holding out {cfg.heldout_frac}"
            )
        if cfg.max_pairs is not None:
            train = train[: cfg.max_pairs]
        out[name] = (train, held)
    return out
