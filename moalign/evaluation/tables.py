"""Text rendering of an evaluation: the aligned table ``moalign evaluate``/``compare`` print."""

from __future__ import annotations

from moalign.errors import MoalignError
from moalign.evaluation.results import EvaluationResult
from moalign.evaluation.statistics import Interval


def render_table(r: EvaluationResult) -> str:
    """A plain-text aligned table: one row per method; ``±`` is the half-width of the CI.

    With judges, the PROXY columns (objectives) and the JUDGES columns (judge means, response length,
    judge worst case and win rate) stand side by side under a group row, followed by the gap
    ``proxy - judge`` of the worst case; a judge that a method decoded with is marked ``*``.
    """
    conf = round(100 * (1 - r.alpha))
    multi = any(m.samples_per_prompt != 1 for m in r.methods.values())
    judged = bool(r.judges)
    head = ["method", "n", *(["responses"] if multi else []), *[f"{g} (raw)" for g in r.objectives]]
    proxy_cols = (len(head) - len(r.objectives), None)
    head.append("worst case")
    if r.reference is not None:
        head += [f"gain vs {r.reference}", f"win vs {r.reference} (%)"]
    proxy_cols = (proxy_cols[0], len(head))
    costed = any(m.compute is not None for m in r.methods.values())
    if costed:
        head += ["policy tok", "scorer tok", "GFLOP"]
    any_mark = judged and any(m.judge is not None and m.judge.optimised for m in r.methods.values())
    if judged:
        judge_cols = (len(head), None)
        head += [f"{j} (raw)" for j in r.judges]
        head += ["length (words)", "worst case"]
        if r.reference is not None:
            head += [f"gain vs {r.reference}", f"win vs {r.reference} (%)"]
        judge_cols = (judge_cols[0], len(head))
        head.append("proxy - judge")
    rows = []
    for name, m in r.methods.items():
        row = [name, str(m.n), *([str(m.n_responses or m.n)] if multi else [])]
        row += [_pm(m.objective_means[g]) for g in r.objectives]
        row.append(_pm(m.worst_case))
        if r.reference is not None:
            row += [_gain_cell(r, name, m.gain), _win_cell(r, name, m.win_rate)]
        if costed:
            c = m.compute
            row += [f"{c['policy_tokens']:.0f}", f"{c['scorer_tokens']:.0f}", gflop(c.get("total_flops"))] \
                if c else ["-", "-", "-"]  # fmt: skip
        if judged:
            js = m.judge
            if js is None:
                raise MoalignError(f"method {name!r} has no judge scores but the result has judges")

            def mark(flag: bool) -> str:
                return "*" if flag else (" " if any_mark else "")

            row += [_pm(js.objective_means[j]) + mark(j in js.optimised) for j in r.judges]
            row.append(_pm(js.length_words, 1) + mark(False))
            row.append(_pm(js.worst_case) + mark(bool(js.optimised)))
            if r.reference is not None:
                row.append(_gain_cell(r, name, js.gain) + mark(bool(js.optimised)))
                row.append(_win_cell(r, name, js.win_rate) + mark(bool(js.optimised)))
            row.append(_pm(js.gap, signed=True) + mark(bool(js.optimised)))
        rows.append(row)
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]

    groups: list[tuple[str, tuple[int, int]]] = []
    if judged:
        groups = [("PROXY (decoding objectives)", proxy_cols), ("JUDGES (other signals)", judge_cols)]
        for label, (a, b) in groups:  # widen the group's last column until its label fits
            span = sum(widths[a:b]) + 2 * (b - a - 1)
            widths[b - 1] += max(0, len(label) - span)

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
    if groups:
        cells, j = [], 0
        for label, (a, b) in groups:
            cells += [" " * widths[k] for k in range(j, a)]
            span = sum(widths[a:b]) + 2 * (b - a - 1)
            cells.append(label.center(span, "-") if len(label) + 2 <= span else label.ljust(span))
            j = b
        cells += [" " * widths[k] for k in range(j, len(widths))]
        lines.insert(0, "  ".join(cells).rstrip())
    per = "mean over prompts of min over objectives"
    if multi:
        per = "mean over prompts of (mean over a prompt's samples of) min over objectives; n = prompts"
    notes = [
        f"{'PROXY ' if judged else ''}worst case = {per}, on {r.score_space} scores",
        f"± = half-width of the {conf}% paired bootstrap CI ({r.n_boot} resamples)",
    ]
    if r.reference is not None:
        notes.append(
            f"gain = mean over prompts of (worst case - {r.reference}'s) [{conf}% paired bootstrap CI]; win "
            f"rate = P[worst case > {r.reference}'s] + 0.5 P[tie]; same score space, paired by prompt_id"
        )
    if costed:
        notes.append(
            "policy tok / scorer tok = mean tokens per response read by the policy (prompts, generated and "
            "re-read tokens) and by the scorers' models (what they actually read: a cache hit reads nothing); "
            "GFLOP = policy + scorers, 2 x non-embedding parameters x tokens read, per model; matched compute "
            "= equal total FLOPs"
        )
    if judged:
        notes += [
            f"JUDGES worst case{' and win rate' if r.reference is not None else ''}: the same over the "
            f"judges, on {r.judge_score_space} scores",
            "length = mean response length in words (whitespace-separated; a prompt's samples averaged)",
            "proxy - judge = mean over prompts of (proxy worst case - judge worst case), each in its own "
            "score space",
        ]
        if any_mark:
            notes.append(
                "* optimised by this run: not an independent judge (the judge worst case, win rate and gap "
                "include it)"
            )
    return "\n".join([*lines, *notes])

def _gain_cell(r: EvaluationResult, name: str, gain: Interval | None) -> str:
    if gain is None:
        return "(reference)" if name == r.reference else "-"
    return f"{gain.estimate:+.3f} [{gain.low:+.2f}, {gain.high:+.2f}]"

def _win_cell(r: EvaluationResult, name: str, wr: Interval | None) -> str:
    if wr is None:
        return "(reference)" if name == r.reference else "-"
    return f"{100 * wr.estimate:.1f} ± {100 * wr.half_width:.1f}"


def _pm(iv: Interval, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{iv.estimate:{sign}.{digits}f} ± {iv.half_width:.{digits}f}"


def gflop(x: float | None) -> str:
    """FLOPs as GFLOP in a table cell (``-`` when unknown)."""
    return "-" if x is None else f"{x / 1e9:.2f}"
