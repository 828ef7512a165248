"""The judges, measured: held-out accuracy of every judge and proxy on every held-out pair set, and the judges'
rank agreement with the proxies on the policy's own samples.

Models: the shipped PROXIES ``helpful`` (HH helpful-base + helpful-rejection-sampled) and ``harmless`` (HH
harmless-base), and the JUDGES ``judge_helpful`` (UltraFeedback) and ``judge_harmless`` (PKU-SafeRLHF), trained
on first use by :func:`moalign.evaluation.judges.ensure_judges` with the project's ``train reward`` (into
``benchmarks/results/judges/``, gitignored: the PKU judge is CC-BY-NC and is never shipped).

Held-out pair sets (``split_pairs(heldout_frac=0.2, seed=0)``, the split every model was trained against):
HH helpful, HH harmless, UltraFeedback (the held-out 20% of the 1,000 pairs), UltraFeedback eval-200 (a separate
file no model saw), PKU-SafeRLHF (held-out 20%). Pairwise accuracy with a 95% bootstrap CI over prompts.

Rank agreement (``--samples RUN.jsonl``, e.g. the 16-samples-per-prompt run of ``overoptimisation.py``):
Spearman and Kendall between each proxy and each judge on the same responses, pooled and within prompt (the
agreement that matters when a method picks among one prompt's candidates), and for the worst case of the
z-scored pair (proxies z-scored with the shipped statistics, judges on these samples).

    python benchmarks/judges.py [--samples benchmarks/results/overopt/sample16.jsonl]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from harness import RESULTS, SHARED_DATA, ci, parser, start, tie_wins, write_result

from moalign.data.pairs import load_pairs, split_pairs
from moalign.evaluation import ensure_judges, rank_agreement
from moalign.objectives.bradley_terry import BradleyTerryObjective, MiniLMBackbone

JUDGE_DIR = RESULTS / "judges"
SETS = {
    "HH helpful": ["hh-helpful-base-test.jsonl.gz", "hh-helpful-rejection-sampled-test.jsonl.gz"],
    "HH harmless": ["hh-harmless-base-test-2000.jsonl.gz"],
    "UltraFeedback": ["ultrafeedback-binarized-1000.jsonl.gz"],
    "UltraFeedback eval-200": ["ultrafeedback-binarized-eval-200.jsonl.gz"],
    "PKU-SafeRLHF": ["pku-saferlhf-safer-5k.json.gz"],
}
WHOLE = {"UltraFeedback eval-200"}  # a separate file: every pair is held out
TRAINED_ON = {"helpful": "HH helpful", "harmless": "HH harmless", "judge_helpful": "UltraFeedback",
              "judge_harmless": "PKU-SafeRLHF"}  # fmt: skip


def heldout_set(name: str) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = [p for f in SETS[name] for p in load_pairs(str(SHARED_DATA / f))]
    return pairs if name in WHOLE else split_pairs(pairs, 0.2, 0)[1]


def features(name: str, pairs, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM features (every model here shares the backbone) of chosen and rejected, cached on disk."""
    f = cache / f"features-{name.replace(' ', '_')}.pt"
    if f.exists():
        d = torch.load(f)
        if d["n"] == len(pairs):
            return d["xc"], d["xr"]
    bb = MiniLMBackbone()
    prompts = [p.prompt.text for p in pairs]
    t = time.time()
    xc = bb.features(prompts, [p.chosen for p in pairs])
    xr = bb.features(prompts, [p.rejected for p in pairs])
    print(f"features {name}: {len(pairs)} pairs in {time.time() - t:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"n": len(pairs), "xc": xc, "xr": xr}, f)
    return xc, xr


def accuracy_ci(obj: BradleyTerryObjective, xc, xr, groups) -> list[float]:
    with torch.no_grad():
        d = (obj.head(xc) - obj.head(xr)).numpy()
    correct = tie_wins(d, 0.0)
    # bootstrap over prompts (pairs of one prompt move together)
    keys = list(dict.fromkeys(groups))
    idx = {k: i for i, k in enumerate(keys)}
    g = np.array([idx[k] for k in groups])
    sums, counts = np.bincount(g, correct, len(keys)), np.bincount(g, minlength=len(keys)).astype(float)
    return ci(lambda s, c: float(s.sum() / c.sum()), sums, counts, digits=4)


def cross_table(models: dict[str, BradleyTerryObjective]) -> dict:
    out: dict = {"n_pairs": {}, "accuracy": {m: {} for m in models}}
    for name in SETS:
        pairs = heldout_set(name)
        xc, xr = features(name, pairs, JUDGE_DIR / "heldout_features")
        out["n_pairs"][name] = len(pairs)
        groups = [p.prompt.text for p in pairs]
        for m, obj in models.items():
            out["accuracy"][m][name] = accuracy_ci(obj, xc, xr, groups)
    return out


def agreement(models: dict[str, BradleyTerryObjective], run: Path, judges: dict[str, Path]) -> dict:
    from moalign.evaluation import fit_norm_stats, parse_judges, score_judges
    from moalign.objectives.normalize import shipped_norm_stats
    from moalign.records import read_records

    recs = read_records(run)
    specs = parse_judges([f"rm:{p}" for p in judges.values()])
    score_judges(run, recs, specs)  # cached in RUN.judges.jsonl
    names = [o.name for _, o in specs]
    proxy = np.array([[r["scores"]["helpful"], r["scores"]["harmless"]] for r in recs])
    judge = np.array([[r["judge_scores"][n] for n in names] for r in recs])
    groups = [r["prompt_id"] for r in recs]
    out = {"run": str(run), "n_responses": len(recs), "n_prompts": len(set(groups)), "pairs": {}}
    for i, pn in enumerate(("helpful", "harmless")):
        for j, jn in enumerate(names):
            out["pairs"][f"{pn} ~ {jn}"] = rank_agreement(proxy[:, i], judge[:, j], groups)
    pz = shipped_norm_stats("smollm2-135m-instruct").subset(["helpful", "harmless"]).apply(proxy)
    jz = fit_norm_stats(judge, names, source="judges on these samples").apply(judge)
    out["pairs"]["worst case: proxy ~ judge"] = rank_agreement(pz.min(1), jz.min(1), groups)
    out["pairs"]["helpful ~ harmless (proxies)"] = rank_agreement(proxy[:, 0], proxy[:, 1], groups)
    out["pairs"]["judge_helpful ~ judge_harmless"] = rank_agreement(judge[:, 0], judge[:, 1], groups)
    words = np.array([len(str(r["response"]).split()) for r in recs], dtype=float)
    for i, pn in enumerate(("helpful", "harmless")):
        out["pairs"][f"{pn} ~ words"] = rank_agreement(proxy[:, i], words, groups)
    for j, jn in enumerate(names):
        out["pairs"][f"{jn} ~ words"] = rank_agreement(judge[:, j], words, groups)
    return out


def markdown(res: dict) -> str:
    sets = list(SETS)
    lines = ["Held-out pairwise accuracy (95% bootstrap CI over prompts); **bold**: the set the model was trained "
             "against (its own held-out split).", "",
             "| model | " + " | ".join(f"{s} ({res['cross']['n_pairs'][s]})" for s in sets) + " |",
             "|---|" + "---|" * len(sets)]  # fmt: skip
    for m, row in res["cross"]["accuracy"].items():
        cells = []
        for s in sets:
            e, lo, hi = row[s]
            c = f"{e:.3f} [{lo:.3f}, {hi:.3f}]"
            cells.append(f"**{c}**" if TRAINED_ON.get(m) == s else c)
        kind = "JUDGE" if m.startswith("judge") else "PROXY"
        lines.append(f"| {kind} `{m}` | " + " | ".join(cells) + " |")
    if res.get("agreement"):
        a = res["agreement"]
        lines += ["", f"Rank agreement on the policy's samples ({a['n_responses']} responses to {a['n_prompts']} "
                  f"held-out HH prompts, `{Path(a['run']).name}`):", "",
                  "| pair | Spearman (pooled) | Kendall (pooled) | Spearman within prompt (mean) |",
                  "|---|---|---|---|"]  # fmt: skip
        for k, v in a["pairs"].items():
            lines.append(f"| {k} | {v['spearman']:+.3f} | {v['kendall']:+.3f} | "
                         f"{v['within_group_spearman_mean']:+.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = parser(__doc__.splitlines()[0], seed=None, threads=1)
    ap.add_argument("--samples", default=None, help="a run of policy samples for the rank agreement")
    args = start(ap.parse_args(argv))
    t0 = time.time()
    judges = ensure_judges(JUDGE_DIR, SHARED_DATA)
    models = {"helpful": BradleyTerryObjective.load(_shipped("helpful")),
              "harmless": BradleyTerryObjective.load(_shipped("harmless"))}  # fmt: skip
    models.update({n: BradleyTerryObjective.load(p) for n, p in judges.items()})
    assert all(o.config["backbone"] == "minilm" for o in models.values()), "features are shared: MiniLM only"
    res: dict = {"cross": cross_table(models), "judges": {n: str(p) for n, p in judges.items()}}
    if args.samples:
        res["agreement"] = agreement(models, Path(args.samples), judges)
    res["seconds"] = round(time.time() - t0, 1)
    (RESULTS / "judges.md").write_text(markdown(res))
    acc = res["cross"]["accuracy"]
    summary = (
        f"judges: judge_helpful {acc['judge_helpful']['UltraFeedback'][0]:.3f} on UltraFeedback held-out, "
        f"{acc['judge_helpful']['HH helpful'][0]:.3f} on HH helpful, {acc['judge_helpful']['HH harmless'][0]:.3f} "
        f"on HH harmless; judge_harmless {acc['judge_harmless']['PKU-SafeRLHF'][0]:.3f} on PKU held-out, "
        f"{acc['judge_harmless']['HH harmless'][0]:.3f} on HH harmless, {acc['judge_harmless']['HH helpful'][0]:.3f} "
        "on HH helpful"
    )
    if res.get("agreement"):
        w = res["agreement"]["pairs"]["worst case: proxy ~ judge"]
        summary += f"; worst-case proxy~judge Spearman {w['spearman']:+.3f} (within prompt {w['within_group_spearman_mean']:+.3f})"
    write_result("judges", res, summary)
    return 0


def _shipped(name: str) -> Path:
    from moalign.objectives.base import get_objective

    return Path(get_objective(name).path)


if __name__ == "__main__":
    sys.exit(main())
