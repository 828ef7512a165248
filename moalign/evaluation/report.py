"""Plots of evaluation results (PNG files).

Figures are drawn with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``), so no
global pyplot state or display is touched: safe in scripts, servers and tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moalign.errors import MoalignError
from moalign.evaluation.metrics import EvaluationResult, Interval

__all__ = ["plot_comparison", "plot_tradeoff", "plot_weight_trajectory", "tradeoff_points"]


def _png_path(path: str | Path) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise MoalignError(f"plot path must end in .png, got {str(p)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=110)
    return path


def _yerr(ivs: Sequence[Interval], scale: float = 1.0) -> np.ndarray:
    """Asymmetric error bars ``[2, k]`` (percentile intervals need not be symmetric)."""
    lo = [max(iv.estimate - iv.low, 0.0) * scale for iv in ivs]
    hi = [max(iv.high - iv.estimate, 0.0) * scale for iv in ivs]
    return np.array([lo, hi])


def read_out(result: EvaluationResult) -> str:
    """A few sentences that read a comparison out: which method led the PROXY worst case and whether its
    paired gain over the reference is told apart from zero by its interval, whether the judges (signals the
    methods did not decode with) agree, and what response lengths and compute came with it."""
    ref = result.reference
    others = [m for m in result.methods if m != ref]
    if ref is None or not others:
        return ""
    sm = result.methods
    conf = round(100 * (1 - result.alpha))

    def verdict(g: Interval) -> str:
        if g.low > 0:
            return f"its {conf}% interval is above zero"
        if g.high < 0:
            return f"its {conf}% interval is below zero"
        return f"its {conf}% interval includes zero, so these prompts do not tell it from {ref}"

    lead = max(others, key=lambda m: sm[m].worst_case.estimate)
    g = sm[lead].gain
    out = [
        f"PROXY ({', '.join(result.objectives)}, what the methods decoded with): {lead} had the highest worst case, "
        f"{g.estimate:+.2f} [{g.low:+.2f}, {g.high:+.2f}] over {ref} on {sm[lead].n_paired} prompts; {verdict(g)}."
    ]
    for m in others:
        if m != lead:
            gm = sm[m].gain
            out.append(f"{m}: {gm.estimate:+.2f} [{gm.low:+.2f}, {gm.high:+.2f}].")
    if result.judges:
        js = {m: sm[m].judge for m in result.methods}
        jg = js[lead].gain
        if jg.low > 0:
            agree = f"agree: {lead} gains {jg.estimate:+.2f} [{jg.low:+.2f}, {jg.high:+.2f}] on their worst case too"
        elif jg.high < 0:
            agree = (f"disagree: by their worst case {lead} is behind {ref}, {jg.estimate:+.2f} "
                     f"[{jg.low:+.2f}, {jg.high:+.2f}]")  # fmt: skip
        else:
            agree = (f"neither confirm nor contradict it: {lead}'s gain by their worst case is {jg.estimate:+.2f} "
                     f"[{jg.low:+.2f}, {jg.high:+.2f}]")  # fmt: skip
        marked = sorted({j for m in result.methods for j in js[m].optimised})
        who = f" ({', '.join(marked)} optimised by some runs)" if marked else ", which no method decoded with"
        jlead = max(others, key=lambda m: js[m].worst_case.estimate)
        lead_note = "" if jlead == lead else f" The judges' own leader is {jlead}."
        out.append(f"JUDGES ({', '.join(result.judges)}{who}) {agree}.{lead_note}")
        words = [round(js[m].length_words.estimate) for m in result.methods]
        span = f"{min(words)}" if min(words) == max(words) else f"{min(words)}-{max(words)}"
        out.append(f"Responses averaged {span} words across methods.")
    costs = {m: sm[m].compute for m in result.methods if sm[m].compute is not None}
    if lead in costs and ref in costs:
        c, r = costs[lead], costs[ref]
        out.append(f"{lead} read {c['total_tokens']:.0f} tokens per response (policy {c['policy_tokens']:.0f} + "
                   f"scorers {c['scorer_tokens']:.0f}) against {ref}'s {r['total_tokens']:.0f}")  # fmt: skip
        if "total_flops" in c and "total_flops" in r:
            out[-1] += (f"; in FLOPs {c['total_flops'] / 1e9:.2f} GFLOP (policy {c['policy_flops'] / 1e9:.2f} + scorers "
                        f"{c['scorer_flops'] / 1e9:.2f}) against {r['total_flops'] / 1e9:.2f} "
                        f"({c['total_flops'] / r['total_flops']:.1f}x)")  # fmt: skip
        out[-1] += "."
    return " ".join(out)


def plot_comparison(result: EvaluationResult, path: str | Path) -> Path:
    """Bar charts comparing methods: per-objective means (raw) grouped by method, the mean worst case (in the
    result's score space) and, when a reference was given, the worst-case win rate vs the reference.
    Error bars are the bootstrap confidence intervals. Returns the PNG path.

    A result with judges gets two rows: PROXY (top) and JUDGES (bottom) with the same panels, plus the proxy
    and judge worst case side by side per method (top right) and the mean response length in words (bottom
    right); bars of a judge that the method decoded with are hatched (not an independent judge)."""
    if not result.methods:
        raise MoalignError("nothing to plot: the evaluation result has no methods")
    p = _png_path(path)
    if result.judges:
        return _save(_judged_comparison(result), p)
    methods = list(result.methods)
    summaries = [result.methods[m] for m in methods]
    conf = round(100 * (1 - result.alpha))
    win_methods = [m for m in methods if result.methods[m].win_rate is not None]
    n_panels = 3 if win_methods else 2
    width_per = max(4.0, 0.9 * len(methods) + 1.5)
    fig = Figure(figsize=(width_per * n_panels + 1.0, 4.8), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    x = np.arange(len(methods))

    # 1) per-objective means, one bar per objective within each method group
    ax = axes[0]
    g = len(result.objectives)
    bw = 0.8 / g
    for j, obj in enumerate(result.objectives):
        ivs = [s.objective_means[obj] for s in summaries]
        ax.bar(x - 0.4 + bw * (j + 0.5), [iv.estimate for iv in ivs], bw, yerr=_yerr(ivs), capsize=3,
               label=obj, color=f"C{j}")  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(
        x, methods, rotation=30 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center"
    )
    ax.set_ylabel("mean score (raw)")
    ax.set_title("Per-objective mean (raw scores)")
    ax.legend(fontsize="small", title="objective", title_fontsize="small")

    # 2) worst case
    ax = axes[1]
    ivs = [s.worst_case for s in summaries]
    ax.bar(x, [iv.estimate for iv in ivs], 0.6, yerr=_yerr(ivs), capsize=4, color="C7")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(
        x, methods, rotation=30 if len(methods) > 3 else 0, ha="right" if len(methods) > 3 else "center"
    )
    ax.set_ylabel("mean over prompts of min over objectives")
    ax.set_title(f"Worst case\n({result.score_space})", fontsize="medium")

    # 3) win rate vs the reference
    if win_methods:
        ax = axes[2]
        ivs = [result.methods[m].win_rate for m in win_methods]
        xw = np.arange(len(win_methods))
        ax.bar(xw, [100 * iv.estimate for iv in ivs], 0.6, yerr=_yerr(ivs, 100.0), capsize=4, color="C2")
        ax.axhline(50, color="black", linestyle="--", linewidth=0.8, label="parity (50%)")
        ax.set_ylim(0, 100)
        rot = 30 if len(win_methods) > 3 else 0
        ax.set_xticks(xw, win_methods, rotation=rot, ha="right" if rot else "center")
        ax.set_ylabel("worst-case win rate (%)")
        ax.set_title(f"Worst-case win rate vs {result.reference}")
        ax.legend(fontsize="small", loc="lower right")

    fig.suptitle(
        f"Method comparison: worst case on {result.score_space} scores; "
        f"error bars = {conf}% bootstrap CI ({result.n_boot} resamples)",
        fontsize="medium",
    )
    return _save(fig, p)


def _xticks(ax, x, labels) -> None:
    rot = 30 if len(labels) > 3 else 0
    ax.set_xticks(x, labels, rotation=rot, ha="right" if rot else "center")


def _grouped_means(ax, methods, names, summaries_means, hatched, title, ylabel) -> None:
    """One bar per name within each method group; ``hatched[m]`` names the bars to hatch for method ``m``."""
    x = np.arange(len(methods))
    bw = 0.8 / len(names)
    for j, g in enumerate(names):
        ivs = [summaries_means[m][g] for m in methods]
        bars = ax.bar(x - 0.4 + bw * (j + 0.5), [iv.estimate for iv in ivs], bw, yerr=_yerr(ivs), capsize=3,
                      label=g, color=f"C{j}")  # fmt: skip
        for bar, m in zip(bars, methods):
            if g in hatched.get(m, ()):
                bar.set_hatch("//")
                bar.set_edgecolor("black")
    ax.axhline(0, color="black", linewidth=0.6)
    _xticks(ax, x, methods)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", title_fontsize="small")


def _single_bars(ax, labels, ivs, color, title, ylabel, hatched=(), scale=1.0) -> None:
    x = np.arange(len(labels))
    bars = ax.bar(x, [scale * iv.estimate for iv in ivs], 0.6, yerr=_yerr(ivs, scale), capsize=4, color=color)
    for bar, lab in zip(bars, labels):
        if lab in hatched:
            bar.set_hatch("//")
            bar.set_edgecolor("black")
    _xticks(ax, x, labels)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")


def _objective_space(ax, methods, names, means, title: str) -> None:
    """Each method at (mean of ``names[0]``, mean of ``names[1]``) with its intervals as error bars; the
    non-dominated methods joined (higher is better on both)."""
    pts = np.array([[means[m][names[0]].estimate, means[m][names[1]].estimate] for m in methods], dtype=float)
    front = _pareto_mask(pts)
    if front.sum() > 1:
        fp = pts[front][np.argsort(pts[front][:, 0])]
        ax.plot(fp[:, 0], fp[:, 1], linestyle="--", color="gray", linewidth=1, label="non-dominated", zorder=1)
        ax.legend(fontsize="small")
    for j, m in enumerate(methods):
        ix, iy = means[m][names[0]], means[m][names[1]]
        ax.errorbar([ix.estimate], [iy.estimate], xerr=_yerr([ix]), yerr=_yerr([iy]), fmt="o", color=f"C{j % 10}",
                    capsize=3, zorder=2)  # fmt: skip
        ax.annotate(m, (ix.estimate, iy.estimate), textcoords="offset points", xytext=(5, 5), fontsize="small")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize="medium")


def _judged_comparison(result: EvaluationResult) -> Figure:
    """PROXY row and JUDGES row of :func:`plot_comparison` (a result with judges)."""
    methods = list(result.methods)
    sm = result.methods
    conf = round(100 * (1 - result.alpha))
    win_methods = [m for m in methods if sm[m].win_rate is not None]
    space_col = len(result.objectives) >= 2 and len(result.judges) >= 2  # the objective-space panels
    n_cols = (3 if win_methods else 2) + 1 + int(space_col)
    width_per = max(4.0, 0.9 * len(methods) + 1.5)
    fig = Figure(figsize=(width_per * n_cols + 1.0, 9.6), layout="constrained")
    axes = fig.subplots(2, n_cols, squeeze=False)
    opt = {m: list(sm[m].judge.optimised) for m in methods}
    opt_methods = [m for m in methods if opt[m]]

    for row, (group, names, space) in enumerate(
        [
            ("PROXY", result.objectives, result.score_space),
            ("JUDGES", result.judges, result.judge_score_space),
        ]
    ):
        means = {m: (sm[m].objective_means if row == 0 else sm[m].judge.objective_means) for m in methods}
        _grouped_means(axes[row][0], methods, names, means, opt if row == 1 else {},
                       f"{group}: per-objective mean (raw)", "mean score (raw)")  # fmt: skip
        wcs = [sm[m].worst_case if row == 0 else sm[m].judge.worst_case for m in methods]
        _single_bars(axes[row][1], methods, wcs, "C7" if row == 0 else "C9", f"{group}: worst case\n({space})",
                     "mean over prompts of min over objectives", hatched=opt_methods if row == 1 else ())  # fmt: skip
        axes[row][1].axhline(0, color="black", linewidth=0.6)
        if win_methods:
            ax = axes[row][2]
            ivs = [sm[m].win_rate if row == 0 else sm[m].judge.win_rate for m in win_methods]
            _single_bars(ax, win_methods, ivs, "C2" if row == 0 else "C4", f"{group}: worst-case win rate vs "
                         f"{result.reference}", "worst-case win rate (%)", hatched=opt_methods if row == 1 else (),
                         scale=100.0)  # fmt: skip
            ax.axhline(50, color="black", linestyle="--", linewidth=0.8, label="parity (50%)")
            ax.set_ylim(0, 100)
            ax.legend(fontsize="small", loc="lower right")

    if space_col:  # each method as a point in the plane of the first two objectives (proxy) and judges
        for row, (group, names) in enumerate([("PROXY", result.objectives), ("JUDGES", result.judges)]):
            means = {m: (sm[m].objective_means if row == 0 else sm[m].judge.objective_means) for m in methods}
            _objective_space(axes[row][n_cols - 2], methods, names[:2], means, f"{group}: objective space (raw means)")

    # proxy vs judge worst case, side by side per method (each in its own score space)
    ax = axes[0][n_cols - 1]
    x = np.arange(len(methods))
    for j, (lab, ivs, color) in enumerate(
        [
            ("proxy", [sm[m].worst_case for m in methods], "C7"),
            ("judges", [sm[m].judge.worst_case for m in methods], "C9"),
        ]
    ):
        ax.bar(x - 0.2 + 0.4 * j, [iv.estimate for iv in ivs], 0.4, yerr=_yerr(ivs), capsize=3, color=color,
               label=lab)  # fmt: skip
    ax.axhline(0, color="black", linewidth=0.6)
    _xticks(ax, x, [f"{m}\ngap {sm[m].judge.gap.estimate:+.2f}" for m in methods])
    ax.set_ylabel("worst case (own score space)")
    ax.set_title("Worst case: proxy vs judges\n(gap = proxy - judge)", fontsize="medium")
    ax.legend(fontsize="small")

    _single_bars(axes[1][n_cols - 1], methods, [sm[m].judge.length_words for m in methods], "C5",
                 "Mean response length (words)", "words")  # fmt: skip

    note = "; hatched = optimised by this run (not an independent judge)" if opt_methods else ""
    fig.suptitle(
        f"Method comparison, PROXY (top) vs JUDGES (bottom); error bars = {conf}% bootstrap CI "
        f"({result.n_boot} resamples){note}",
        fontsize="medium",
    )
    return fig


def plot_weight_trajectory(
    weights: Sequence[Sequence[float]] | np.ndarray,
    objective_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Per-block objective weights of one response (``weights[t][g]``, block ``t``, objective ``g``).

    Block ``t`` covers ``[t, t+1)`` on the x axis. Rows on the simplex (non-negative, summing to 1, as RMOD's
    worst-case weights are) are drawn as a stacked area; other weights as step lines. Returns the PNG path.
    """
    names = [str(n) for n in objective_names]
    if hasattr(weights, "detach"):
        weights = weights.detach().cpu().double().numpy()
    try:
        w = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MoalignError(f"weights must be a [blocks, objectives] table of numbers ({e})") from None
    if w.ndim != 2 or w.shape[0] == 0:
        raise MoalignError(f"weights must be a non-empty [blocks, objectives] table, got shape {w.shape}")
    if w.shape[1] != len(names):
        raise MoalignError(f"weights have {w.shape[1]} objectives but {len(names)} names were given: {names}")
    if not np.isfinite(w).all():
        raise MoalignError("weights contain NaN/inf")
    p = _png_path(path)
    t = w.shape[0]
    xs = np.arange(t + 1)
    ys = np.vstack([w, w[-1:]])  # repeat the last row so the last block is drawn over [t-1, t)
    on_simplex = bool((w >= -1e-9).all() and np.allclose(w.sum(axis=1), 1.0, atol=1e-6))

    fig = Figure(figsize=(max(6.0, min(14.0, 0.25 * t + 4)), 4.2), layout="constrained")
    ax = fig.subplots()
    colors = [f"C{j}" for j in range(len(names))]
    if on_simplex:
        ax.stackplot(xs, np.clip(ys, 0, None).T, labels=names, colors=colors, step="post", alpha=0.85)
        ax.set_ylim(0, 1)
        ax.set_ylabel("weight (stacked, sums to 1)")
    else:
        for j, name in enumerate(names):
            ax.step(xs, ys[:, j], where="post", label=name, color=colors[j], linewidth=1.8)
        ax.set_ylabel("weight")
    ax.set_xlim(0, t)
    ax.set_xlabel("block index")
    if t <= 30:
        ax.set_xticks(np.arange(t) + 0.5, [str(i) for i in range(t)])
    ax.set_title(title or f"Objective weights per block ({t} blocks)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="objective")
    return _save(fig, p)


def tradeoff_points(result: EvaluationResult, x: str, y: str) -> dict[str, tuple[float, float]]:
    """``{method: (mean of objective x, mean of objective y)}`` (raw means) for :func:`plot_tradeoff`."""
    for g in (x, y):
        if g not in result.objectives:
            raise MoalignError(f"objective {g!r} is not in the evaluation ({result.objectives})")
    return {
        m: (s.objective_means[x].estimate, s.objective_means[y].estimate) for m, s in result.methods.items()
    }


def _pareto_mask(pts: np.ndarray) -> np.ndarray:
    """True for points not dominated by another (>= on both coordinates, > on one); higher is better."""
    keep = np.ones(len(pts), dtype=bool)
    for i, p in enumerate(pts):
        dominated = ((pts >= p).all(axis=1) & (pts > p).any(axis=1)).any()
        keep[i] = not dominated
    return keep


def plot_tradeoff(
    points: Mapping[str, tuple[float, float]],
    names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Scatter of two objectives per method (the trade-off picture): ``points[method] = (x, y)``, axes named by
    ``names = (x objective, y objective)``. Methods on the Pareto front (higher is better on both) are joined
    by a dashed line. Returns the PNG path."""
    if not points:
        raise MoalignError("nothing to plot: no points")
    names = [str(n) for n in names]
    if len(names) != 2:
        raise MoalignError(f"a trade-off plot needs exactly two objective names, got {names}")
    labels = [str(k) for k in points]
    try:
        pts = np.array([[float(v[0]), float(v[1])] for v in points.values()], dtype=np.float64)
    except (TypeError, ValueError, IndexError) as e:
        raise MoalignError(f"each point must be an (x, y) pair of numbers ({e})") from None
    if any(len(v) != 2 for v in points.values()):
        raise MoalignError("each point must be an (x, y) pair of numbers")
    if not np.isfinite(pts).all():
        raise MoalignError("trade-off points contain NaN/inf")
    p = _png_path(path)

    fig = Figure(figsize=(6.4, 5.2), layout="constrained")
    ax = fig.subplots()
    front = _pareto_mask(pts)
    if front.sum() > 1:
        fp = pts[front]
        fp = fp[np.argsort(fp[:, 0])]
        ax.plot(fp[:, 0], fp[:, 1], linestyle="--", color="gray", linewidth=1, label="Pareto front", zorder=1)
    for j, (label, (px, py)) in enumerate(zip(labels, pts)):
        ax.scatter([px], [py], s=70, color=f"C{j % 10}", zorder=2, edgecolors="black", linewidths=0.5)
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(6, 6), fontsize="small")
    # pad the limits so annotations and single points stay visible
    for lo, hi, setter in ((pts[:, 0].min(), pts[:, 0].max(), ax.set_xlim), (pts[:, 1].min(), pts[:, 1].max(), ax.set_ylim)):  # fmt: skip
        span = hi - lo
        pad = 0.15 * span if span > 0 else max(0.5, 0.1 * abs(hi))
        if math.isfinite(pad):
            setter(lo - pad, hi + pad)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(alpha=0.3)
    if front.sum() > 1:
        ax.legend(fontsize="small")
    ax.set_title(title or f"Trade-off: {names[0]} vs {names[1]} (higher is better)")
    return _save(fig, p)
