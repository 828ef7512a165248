"""Experiment: multi-objective DPO on Anthropic HH helpful + harmless with each gradient combiner (real data, CPU).

Policy: the bundled SmolLM2-135M-Instruct with a LoRA adapter; objectives: ``helpful`` = HH helpful-base,
``harmless`` = HH harmless-base (files in ``../shared/data``), each split with moalign's stable prompt-hash
split (``split_pairs`` defaults: the held-out prompts are the ones the shipped reward models never saw). Every
combiner trains the same number of steps on the same pairs in the same order (same seed); reference
log-probs are precomputed once and shared.

Per combiner and objective:
- implicit-reward accuracy on held-out pairs: share of pairs with
  ``(log pi - log ref)(chosen) > (log pi - log ref)(rejected)`` (ties count 1/2);
- win rate vs the dataset's chosen response on held-out prompts, judged by that objective's reward model
  (``moalign.objectives.get_objective(name)``): the trained policy's sampled response beats the chosen one
  when its score is higher (ties 1/2);
- the worst objective's figure; 95% bootstrap CIs; and the paired bootstrap difference of every combiner's
  worst-objective figure against ``linear``.

Resumable: each combiner's folder keeps its adapter, summary and generations; rerunning skips finished work
(win rates are filled in once the reward models are available: rerun with ``--report-only`` and the same
settings).

    nohup python benchmarks/modpo_hh.py --steps 50 > benchmarks/results/modpo_hh.log 2>&1 &
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from harness import ROOT, SHARED_DATA, ci, environment, parser, start, worst_of_means

from moalign.data.pairs import load_pairs, split_pairs
from moalign.training.dpo import (
    MultiObjectiveDPOConfig,
    build_trainer,
    implicit_reward_margins,
    policy_logps,
    precompute_reference,
)
from moalign.training.mo_data import tokenize_pair

DATA = SHARED_DATA
FILES = {"helpful": "hh-helpful-base-test.jsonl.gz", "harmless": "hh-harmless-base-test-2000.jsonl.gz"}
ALL = ["linear", "mgda-decoupled", "mgda", "mgda-normalized", "groupdro", "pcgrad"]


def _ci(fn, *arrays, seed=0):
    return dict(zip(("estimate", "low", "high"), ci(fn, *arrays, seed=seed)))


def _mean(a):
    return float(np.mean(a))


def generate(model, tok, prompts, max_new_tokens, seed, batch=8):
    from moalign.decoding.backend import SamplingConfig
    from moalign.decoding.in_process import TransformersBackend
    from moalign.policies import Policy

    eng = TransformersBackend(Policy(model, tok, "trained", "memory"), SamplingConfig(temperature=0.7, top_p=0.9))
    out = []
    was = model.training
    model.eval()
    for i in range(0, len(prompts), batch):
        res = eng.decode(
            prompts[i : i + batch],
            k=1,
            block_size=max_new_tokens,
            max_new_tokens=max_new_tokens,
            seed=seed + i,
        )
        out.extend(r.response for r in res)
    model.train(was)
    return out


def main() -> None:
    ap = parser(__doc__.split("\n")[0], out_dir=ROOT / "benchmarks" / "results" / "modpo_hh", out_alias="--out",
                analyse_only=False, seed=0, threads=1)  # fmt: skip
    ap.add_argument("--combiners", nargs="+", default=ALL)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2, help="pairs per objective per step")
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--max-prompt-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-last-layers", type=int, default=8)
    ap.add_argument("--heldout-pairs", type=int, default=100)
    ap.add_argument("--winrate-prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--report-only", action="store_true", help="only (re)score saved generations and write tables"
    )
    args = start(ap.parse_args())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    from moalign.policies import load_policy

    pol = load_policy("smollm2-135m-instruct")
    tok = pol.tokenizer
    n_train = args.steps * args.batch  # every training pair is used exactly once
    data, held = {}, {}
    for name, f in FILES.items():
        train, ho = split_pairs(load_pairs(str(DATA / f)))
        data[name] = (train[:n_train], [])
        seen, uniq = set(), []
        for p in ho:  # one pair per held-out prompt
            if p.prompt.text not in seen:
                seen.add(p.prompt.text)
                uniq.append(p)
        held[name] = uniq
    ml, mpl = args.max_length, args.max_prompt_length
    wr_prompts = {n: [p.prompt for p in held[n][: args.winrate_prompts]] for n in FILES}
    if args.report_only:
        report(args, out, data, held, wr_prompts)
        return

    # shared: tokenised training pairs with reference log-probs, base log-probs of held-out pairs
    t0 = time.time()
    base_model = pol.model
    toks = {n: [tokenize_pair(tok, p, ml, mpl) for p in tr] for n, (tr, _) in data.items()}
    precompute_reference(base_model, None, toks, tok.pad_token_id)
    base_ref = {
        n: policy_logps(base_model, tok, held[n][: args.heldout_pairs], max_length=ml, max_prompt_length=mpl)
        for n in FILES
    }
    print(f"reference log-probs: {time.time() - t0:.0f}s", flush=True)

    base_gen_file = out / "base" / "generations.json"
    if not base_gen_file.exists():
        base_gen_file.parent.mkdir(parents=True, exist_ok=True)
        gens = {n: generate(base_model, tok, wr_prompts[n], args.max_new_tokens, args.seed) for n in FILES}
        base_gen_file.write_text(json.dumps(gens))

    for c in args.combiners:
        d = out / c
        if (d / "summary.json").exists() and (d / "generations.json").exists():
            print(f"{c}: done already", flush=True)
            continue
        cfg = MultiObjectiveDPOConfig(
            objective=[f"{n}={DATA / f}" for n, f in FILES.items()], combiner=c, output_dir=str(d),
            max_steps=args.steps, per_device_train_batch_size=args.batch, max_length=ml, max_prompt_length=mpl,
            learning_rate=args.lr, beta=args.beta, lora_last_layers=args.lora_last_layers, seed=args.seed,
            precompute_ref_log_probs=True, logging_steps=10, use_cpu=True,
        )  # fmt: skip
        for ps in toks.values():
            for p in ps:
                assert p.ref is not None
        pol = load_policy("smollm2-135m-instruct")
        t0 = time.time()
        run = build_trainer(cfg, model=pol.model, tokenizer=tok, data=data, tokenized=toks)
        if (d / "combiner_log.jsonl").exists():
            (d / "combiner_log.jsonl").unlink()
        run.trainer.train()
        train_s = time.time() - t0
        run.trainer.save_model(str(d))
        heldout = {}
        for n in FILES:
            m = implicit_reward_margins(
                run.model, tok, held[n][: args.heldout_pairs], args.beta, max_length=ml, max_prompt_length=mpl,
                ref_logps=base_ref[n],
            )  # fmt: skip
            heldout[n] = ((m > 0).double() + 0.5 * (m == 0).double()).tolist()
        gens = {n: generate(run.model, tok, wr_prompts[n], args.max_new_tokens, args.seed) for n in FILES}
        (d / "generations.json").write_text(json.dumps(gens))
        rows = [json.loads(r) for r in (d / "combiner_log.jsonl").read_text().splitlines()]
        summary = {
            "combiner": c,
            "train_seconds": train_s,
            "steps": args.steps,
            "heldout_correct": heldout,
            "mean_alpha": np.mean([r["alpha"] for r in rows], axis=0).tolist(),
            "common_descent_rate": float(np.mean([r.get("common_descent", np.nan) for r in rows])),
            "mean_cos": float(np.mean([r["cosines"][0][1] for r in rows if "cosines" in r])),
            "final_train_losses": np.mean([r["losses"] for r in rows[-10:]], axis=0).tolist(),
        }
        (d / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{c}: trained {train_s:.0f}s, held-out acc "
              + ", ".join(f"{n} {np.mean(v):.3f}" for n, v in heldout.items()), flush=True)  # fmt: skip
        del run
        report(args, out, data, held, wr_prompts)  # partial tables after every combiner
    report(args, out, data, held, wr_prompts)


def report(args, out: Path, data, held, wr_prompts) -> None:
    """Score generations (if the reward models are available) and write JSON + markdown tables."""
    names = list(FILES)
    judges = {}
    try:
        from moalign.objectives import get_objective

        judges = {n: get_objective(n) for n in names}
    except Exception as e:  # noqa: BLE001 - reward models not shipped yet: report what we have
        print(f"win rates pending: {e}", flush=True)
    chosen_scores = {}
    if judges:
        for n in names:
            ps = held[n][: args.winrate_prompts]
            chosen_scores[n] = judges[n].score([p.prompt.text for p in ps], [p.chosen for p in ps]).numpy()
    results = {"config": vars(args), "environment": environment(), "combiners": {}}
    wins, accs = {}, {}
    for c in ["base", *ALL]:  # every finished combiner in this folder, not only this invocation's
        d = out / c
        if not (d / "generations.json").exists():
            continue
        r: dict = {}
        if (d / "summary.json").exists():
            s = json.loads((d / "summary.json").read_text())
            accs[c] = {n: np.array(s["heldout_correct"][n]) for n in names}
            r.update(
                {
                    k: s[k]
                    for k in (
                        "train_seconds",
                        "mean_alpha",
                        "common_descent_rate",
                        "mean_cos",
                        "final_train_losses",
                    )
                }
            )
            r["heldout_accuracy"] = {n: _ci(_mean, accs[c][n]) for n in names}
            r["heldout_accuracy_worst"] = _ci(worst_of_means, *[accs[c][n] for n in names])
        if judges:
            gens = json.loads((d / "generations.json").read_text())
            wins[c] = {}
            for n in names:
                ps = held[n][: args.winrate_prompts]
                s_gen = judges[n].score([p.prompt.text for p in ps], gens[n]).numpy()
                wins[c][n] = (s_gen > chosen_scores[n]).astype(float) + 0.5 * (s_gen == chosen_scores[n])
            r["winrate"] = {n: _ci(_mean, wins[c][n]) for n in names}
            r["winrate_worst"] = _ci(worst_of_means, *[wins[c][n] for n in names])
        results["combiners"][c] = r
    # paired differences vs linear (same held-out pairs / prompts for every combiner)
    for c in results["combiners"]:
        if c in ("linear", "base"):
            continue
        r = results["combiners"][c]
        if c in accs and "linear" in accs:
            arr = [accs[c][n] for n in names] + [accs["linear"][n] for n in names]
            r["heldout_worst_minus_linear"] = _ci(lambda *a: worst_of_means(*a[:2]) - worst_of_means(*a[2:]), *arr)
        if c in wins and "linear" in wins:
            arr = [wins[c][n] for n in names] + [wins["linear"][n] for n in names]
            r["winrate_worst_minus_linear"] = _ci(lambda *a: worst_of_means(*a[:2]) - worst_of_means(*a[2:]), *arr)
    (out.parent / f"{out.name}.json").write_text(json.dumps(results, indent=2))

    def f(ci):
        return f"{ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "-"

    lines = [
        f"Multi-objective DPO, SmolLM2-135M-Instruct + LoRA (last {args.lora_last_layers} layers, r=8), "
        f"{args.steps} steps x {args.batch} pairs/objective, beta {args.beta}, lr {args.lr}, max_length "
        f"{args.max_length}, seed {args.seed}, CPU. Held-out implicit-reward accuracy on {args.heldout_pairs} "
        f"pairs/objective; win rate vs dataset chosen on {args.winrate_prompts} held-out prompts/objective "
        "(judge: that objective's reward model). 95% bootstrap CIs.",
        "",
        "| combiner | acc helpful | acc harmless | acc worst | win helpful | win harmless | win worst | "
        "mean alpha (helpful, harmless) | common-descent rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, r in results["combiners"].items():
        acc = r.get("heldout_accuracy", {})
        wr = r.get("winrate", {})
        alpha = ", ".join(f"{a:.2f}" for a in r.get("mean_alpha", [])) or "-"
        cd = f"{r['common_descent_rate']:.2f}" if "common_descent_rate" in r else "-"
        lines.append(
            f"| {c} | {f(acc.get('helpful'))} | {f(acc.get('harmless'))} | {f(r.get('heldout_accuracy_worst'))} | "
            f"{f(wr.get('helpful'))} | {f(wr.get('harmless'))} | {f(r.get('winrate_worst'))} | {alpha} | {cd} |"
        )
    lines += ["", "Worst-objective difference vs linear (paired bootstrap):", "",
              "| combiner | acc worst - linear | win worst - linear |", "|---|---|---|"]  # fmt: skip
    for c, r in results["combiners"].items():
        if "heldout_worst_minus_linear" in r or "winrate_worst_minus_linear" in r:
            lines.append(
                f"| {c} | {f(r.get('heldout_worst_minus_linear'))} | {f(r.get('winrate_worst_minus_linear'))} |"
            )
    (out.parent / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    md = results["combiners"].get("mgda-decoupled", {})
    if "heldout_worst_minus_linear" in md:
        dd = md["heldout_worst_minus_linear"]
        print(f"SUMMARY: mgda-decoupled worst-objective held-out accuracy minus linear = {dd['estimate']:+.3f} "
              f"[{dd['low']:+.3f}, {dd['high']:+.3f}]" + (f"; win-rate worst diff {f(md.get('winrate_worst_minus_linear'))}" if judges else ""))  # fmt: skip


if __name__ == "__main__":
    main()
