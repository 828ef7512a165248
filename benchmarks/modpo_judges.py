"""Multi-objective DPO, PROXY and JUDGE: re-score the generations of ``benchmarks/modpo_hh.py`` with the judges.

``modpo_hh.py`` trains one LoRA policy per gradient combiner and saves, per combiner (and for the untrained
``base`` policy), one sampled response to each of the first ``--winrate-prompts`` held-out HH helpful-base and
harmless-base prompts (``OUT/COMBINER/generations.json``). This script scores those responses and the dataset's
chosen responses to the same prompts by

* the PROXY: the objective's shipped reward model (``helpful`` / ``harmless``; trained on the other HH pairs),
* the JUDGE: ``judge_helpful`` (UltraFeedback) / ``judge_harmless`` (PKU-SafeRLHF), see
  :mod:`moalign.evaluation.judges`,

and reports per combiner the win rate against the chosen response (ties 1/2) on each objective and the worst
objective, by proxy and by judge, with 95% bootstrap CIs, the paired difference of the worst-objective win rate
against ``linear``, the held-out implicit-reward accuracy saved by ``modpo_hh.py``, and words per response.

    python benchmarks/modpo_hh.py --steps 40 --combiners linear mgda-decoupled --out benchmarks/results/modpo_hh_judged
    python benchmarks/modpo_judges.py --out benchmarks/results/modpo_hh_judged --winrate-prompts 40
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
from harness import RESULTS, SHARED_DATA, ci, fmt, parser, tie_wins, worst_of_means, write_result

from moalign.data.pairs import load_pairs, split_pairs
from moalign.evaluation import ensure_judges, judge_specs
from moalign.objectives.base import resolve_objectives

FILES = {"helpful": "hh-helpful-base-test.jsonl.gz", "harmless": "hh-harmless-base-test-2000.jsonl.gz"}
JUDGE_OF = {"helpful": "judge_helpful", "harmless": "judge_harmless"}
ORDER = ["base", "linear", "mgda-decoupled", "mgda", "mgda-normalized", "groupdro", "pcgrad"]


def heldout_prompt_pairs(name: str, n: int) -> list:
    """The first ``n`` held-out prompts (one pair each), exactly as ``modpo_hh.py`` picks them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ho = split_pairs(load_pairs(str(SHARED_DATA / FILES[name])))
    seen, uniq = set(), []
    for p in ho:
        if p.prompt.text not in seen:
            seen.add(p.prompt.text)
            uniq.append(p)
    return uniq[:n]


def main(argv=None) -> int:
    # --out-dir (or --out): modpo_hh.py's runs folder
    ap = parser(__doc__.splitlines()[0], out_dir=RESULTS / "modpo_hh", out_alias="--out", analyse_only=False,
                seed=None, threads=None)  # fmt: skip
    ap.add_argument("--winrate-prompts", type=int, default=40)
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    held = {n: heldout_prompt_pairs(n, args.winrate_prompts) for n in FILES}
    judges = ensure_judges(RESULTS / "judges", SHARED_DATA)
    scorers = {"PROXY": dict(zip(FILES, resolve_objectives(list(FILES)))),
               "JUDGE": dict(zip(FILES, resolve_objectives(judge_specs({JUDGE_OF[n]: judges[JUDGE_OF[n]]
                                                                        for n in FILES}))))}  # fmt: skip
    chosen = {side: {n: s[n].score([p.prompt.text for p in held[n]], [p.chosen for p in held[n]]).numpy()
                     for n in FILES} for side, s in scorers.items()}  # fmt: skip
    combiners = [c for c in ORDER if (out / c / "generations.json").exists()]
    if not combiners:
        raise SystemExit(f"no generations in {out}: run benchmarks/modpo_hh.py first")
    wins: dict = {}
    rows: dict = {}
    for c in combiners:
        gens = json.loads((out / c / "generations.json").read_text())
        row: dict = {"words": {}, "winrate": {}, "winrate_worst": {}}
        wins[c] = {}
        for side, s in scorers.items():
            wins[c][side] = {}
            for n in FILES:
                g = gens[n][: len(held[n])]
                sc = s[n].score([p.prompt.text for p in held[n]], g).numpy()
                wins[c][side][n] = tie_wins(sc, chosen[side][n])
                row["winrate"].setdefault(side, {})[n] = ci(np.mean, wins[c][side][n], digits=4)
            row["winrate_worst"][side] = ci(worst_of_means, wins[c][side]["helpful"], wins[c][side]["harmless"], digits=4)
        for n in FILES:
            row["words"][n] = ci(np.mean, np.array([len(x.split()) for x in gens[n][: len(held[n])]], float), digits=4)
        summ = out / c / "summary.json"
        if summ.exists():
            s = json.loads(summ.read_text())
            row["heldout_accuracy"] = {n: ci(np.mean, np.array(s["heldout_correct"][n]), digits=4) for n in FILES}
            row["mean_alpha"] = s.get("mean_alpha")
            row["steps"] = s.get("steps")
        rows[c] = row
    for c in rows:
        if c in ("base", "linear") or "linear" not in wins:
            continue
        rows[c]["worst_minus_linear"] = {
            side: ci(lambda a, b, x, y: worst_of_means(a, b) - worst_of_means(x, y), wins[c][side]["helpful"],
                      wins[c][side]["harmless"], wins["linear"][side]["helpful"], wins["linear"][side]["harmless"], digits=4)
            for side in scorers
        }  # fmt: skip
    chosen_words = {n: round(float(np.mean([len(p.chosen.split()) for p in held[n]])), 1) for n in FILES}
    md = markdown(rows, args.winrate_prompts, chosen_words)
    (RESULTS / f"{out.name}_judges.md").write_text(md)
    print(md)
    parts = [f"{c}: worst-objective win rate PROXY {r['winrate_worst']['PROXY'][0]:.3f} JUDGE "
             f"{r['winrate_worst']['JUDGE'][0]:.3f}" for c, r in rows.items()]  # fmt: skip
    write_result(f"{out.name}_judges", {"args": vars(args), "combiners": rows, "chosen_words": chosen_words},
                 f"{out.name}_judges ({args.winrate_prompts} prompts/objective): " + "; ".join(parts))  # fmt: skip
    return 0


def markdown(rows: dict, n: int, chosen_words: dict) -> str:
    lines = [f"Win rate of one sampled response against the dataset's chosen response on {n} held-out HH prompts "
             "per objective (ties 1/2; 95% bootstrap CIs). PROXY = the shipped `helpful`/`harmless` reward model; "
             "JUDGE = `judge_helpful` (UltraFeedback) / `judge_harmless` (PKU-SafeRLHF). The dataset's chosen responses "
             f"have {chosen_words['helpful']} / {chosen_words['harmless']} words on average.", "",
             "| combiner | PROXY win helpful | PROXY win harmless | PROXY win worst | JUDGE win helpful | "
             "JUDGE win harmless | JUDGE win worst | words (helpful / harmless prompts) | held-out acc worst |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c, r in rows.items():
        w = r["winrate"]
        acc = r.get("heldout_accuracy")
        accw = f"{min(acc['helpful'][0], acc['harmless'][0]):.3f}" if acc else "-"
        lines.append(f"| {c} | {fmt(w['PROXY']['helpful'])} | {fmt(w['PROXY']['harmless'])} | "
                     f"{fmt(r['winrate_worst']['PROXY'])} | {fmt(w['JUDGE']['helpful'])} | {fmt(w['JUDGE']['harmless'])} | "
                     f"{fmt(r['winrate_worst']['JUDGE'])} | {r['words']['helpful'][0]:.1f} / "
                     f"{r['words']['harmless'][0]:.1f} | {accw} |")  # fmt: skip
    diffs = [(c, r["worst_minus_linear"]) for c, r in rows.items() if "worst_minus_linear" in r]
    if diffs:
        lines += ["", "Worst-objective win rate minus `linear` (paired bootstrap):", "",
                  "| combiner | PROXY | JUDGE |", "|---|---|---|"]  # fmt: skip
        for c, d in diffs:
            lines.append(f"| {c} − linear | {fmt(d['PROXY'], True)} | {fmt(d['JUDGE'], True)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
