"""Prompt sets, judges and objectives that several benchmarks share (a helper, not a benchmark)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from _common import RESULTS, SHARED_DATA

from moalign.data.pairs import load_pairs, split_pairs
from moalign.data.prompts import Prompt
from moalign.objectives.base import Objective, register_objective

HH_FILES = ("hh-helpful-base-test.jsonl.gz", "hh-harmless-base-test-2000.jsonl.gz")
JUDGE_DIR = RESULTS / "judges"  # trained on first use (moalign.evaluation.ensure_judges); gitignored
JUDGES = {"helpful": JUDGE_DIR / "judge_helpful", "harmless": JUDGE_DIR / "judge_harmless"}


# ---------------------------------------------------------------------------------------------- HH prompts
def heldout_prompts(n: int, offset: int = 0) -> list[Prompt]:
    """n prompts alternating helpful / harmless, from the reward models' held-out split."""
    out: list[Prompt] = []
    for name in HH_FILES:
        _, held = split_pairs(load_pairs(str(SHARED_DATA / name)), heldout_frac=0.2, seed=0)
        seen, ps = set(), []
        for pair in held:
            if pair.prompt.text not in seen:
                seen.add(pair.prompt.text)
                ps.append(pair.prompt)
        tag = name.split("-")[1]
        out.append([Prompt(p.messages, id=f"{tag}-{i}") for i, p in enumerate(ps[offset : offset + n // 2])])
    return [p for pair in zip(*out) for p in pair]


def split_prompts(out: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    """Train prompts from the first records of each file, held-out prompts from the last ones."""
    from moalign.data.prompts import load_prompts

    train, held = [], []
    for f in HH_FILES:
        ps = load_prompts(str(SHARED_DATA / f), skip_invalid=True)
        ps = [p for p in ps if len(p.text) <= 300]  # short prompts: CPU time goes to the responses
        train += ps[: n_train // 2]
        held += ps[-(n_eval // 2) :]
    paths = []
    for name, ps in (("train", train), ("eval", held)):
        p = out / f"{name}_prompts.jsonl"
        p.write_text(
            "".join(json.dumps({"id": x.id, "messages": [dict(m) for m in x.messages]}) + "\n" for x in ps)
        )
        paths.append(p)
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------- MT-Bench and Vicuna
def load_prompt_set(per_source: int):
    from moalign.data.prompts import load_prompts

    sources = []
    for tag, f in (("mt", "mt-bench-questions.jsonl"), ("vicuna", "vicuna-bench-questions.jsonl")):
        sources.append([dataclasses.replace(p, id=f"{tag}{p.id}")
                        for p in load_prompts(str(SHARED_DATA / f), limit=per_source)])  # fmt: skip
    # interleaved, so that a larger --per-source only appends prompts (and a rerun resumes)
    return [p for pair in zip(*sources) for p in pair]


# ----------------------------------------------------------------------------------------- length targets
class LengthTarget(Objective):
    """``-(|len - target| / l_max)^2`` with ``len`` the response's length in policy tokens."""

    def __init__(self, target: int, l_max: int):
        from moalign.policies import load_tokenizer

        self.target, self.l_max = target, l_max
        self.name = f"len{target}"
        self.tok = load_tokenizer("smollm2-135m-instruct")

    def _score(self, prompts, responses):
        lens = torch.tensor([len(self.tok(r, add_special_tokens=False)["input_ids"]) for r in responses])
        return -(((lens - self.target).abs().double() / self.l_max) ** 2)


def short_prompts(src: Path, dst: Path, max_chars: int = 200) -> Path:
    """The prompts of ``src`` no longer than ``max_chars`` (long prompts cost CPU time and say nothing here)."""
    from moalign.data.files import read_records

    rows = [
        {"prompt": r["prompt"]} for r in read_records(str(src)) if 0 < len(r["prompt"].strip()) <= max_chars
    ]
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def register_length_targets(targets, l_max: int) -> None:
    """Register ``len{t}`` for each target, scaled by the completion cap ``l_max``."""
    for t in targets:
        register_objective(f"len{t}", lambda t=t: LengthTarget(t, l_max))
