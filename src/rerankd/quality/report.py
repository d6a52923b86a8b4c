"""`rerankd eval`'s report: aligned Markdown tables (readable on a terminal, pasteable as is), JSON, and a
PNG of the score drift and the per-query nDCG@10 (with matplotlib, an optional dependency)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from rerankd.quality.eval import MEASURES, EvalReport, paired_scores


def render_tables(report: EvalReport) -> str:
    """The quality table (BM25 and each reranker) and, with two rerankers or more, the drift table."""
    count = len(report.queries)
    lines = [
        f"{report.dataset} ({report.split}): {count} judged queries, each reranking BM25's top {report.k}",
        *(f"note: {note}" for note in report.notes),
        "",
        *_table(
            ["system", *MEASURES],
            [[s.label, *(f"{s.mean(name):.4f}" for name in MEASURES)] for s in report.systems],
        ),
    ]
    if report.k < 100:
        lines.append(f"(with k = {report.k}, Recall@100 counts only the {report.k} candidates)")
    if report.drift:
        lines += ["", f"drift against {report.systems[1].label}:", ""]
        lines += _table(
            [
                "variant",
                "mean abs Δscore",
                "max abs Δscore",
                "Kendall τ",
                "top-1 agreement",
                "nDCG@10 changed",
            ],
            [
                [
                    d.variant,
                    f"{d.mean_abs_delta:.5f}",
                    f"{d.max_abs_delta:.5f}",
                    "n/a" if math.isnan(d.kendall_tau) else f"{d.kendall_tau:.4f}",
                    f"{d.top1_agreement}/{d.queries}",
                    f"{d.ndcg_changed}/{d.queries} ({d.ndcg_changed / d.queries:.0%})",
                ]
                for d in report.drift
            ],
        )
    return "\n".join(lines)


def render_markdown(report: EvalReport, command: str) -> str:
    return f"# rerankd eval: {report.dataset}\n\n`{command}`\n\n{render_tables(report)}\n"


def report_json(report: EvalReport) -> str:
    """Means and per-query values of every system, and the drift of each variant; no scores (the plot and
    the drift numbers summarize them)."""
    body = {
        "dataset": report.dataset,
        "split": report.split,
        "first_stage": "bm25",
        "k": report.k,
        "queries": report.queries,
        "notes": report.notes,
        "systems": [
            {
                "label": system.label,
                "metrics": {name: system.mean(name) for name in MEASURES},
                "per_query": system.per_query,
            }
            for system in report.systems
        ],
        "drift": [
            {
                "base": report.systems[1].label,
                "variant": d.variant,
                "mean_abs_delta": d.mean_abs_delta,
                "max_abs_delta": d.max_abs_delta,
                "kendall_tau": None if math.isnan(d.kendall_tau) else d.kendall_tau,
                "top1_agreement": d.top1_agreement / d.queries,
                "ndcg10_changed": d.ndcg_changed / d.queries,
            }
            for d in report.drift
        ],
    }
    return json.dumps(body, indent=2, ensure_ascii=False)


def write_plot(report: EvalReport, path: Path) -> None:
    """One scatter of variant against base score per variant, then nDCG@10 per query for every system."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    variants = report.systems[2:]
    figure, axes = plt.subplots(1, len(variants) + 1, figsize=(5.5 * (len(variants) + 1), 4.5), squeeze=False)
    for axis, variant in zip(axes[0], variants, strict=False):
        base = report.systems[1]
        first, second = paired_scores(base, variant)
        low, high = min(first + second), max(first + second)
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axis.scatter(first, second, s=6, alpha=0.5)
        axis.set(xlabel=f"{_short(base.label)} score", ylabel=f"{_short(variant.label)} score")
        axis.set_title("score drift, one point per (query, candidate)")
    axis = axes[0][-1]
    order = sorted(report.queries, key=lambda qid: report.systems[0].per_query[qid]["nDCG@10"])
    for system in report.systems:
        values = [system.per_query[qid]["nDCG@10"] for qid in order]
        axis.plot(
            range(len(order)), values, marker="o", markersize=3, linestyle="", label=_short(system.label)
        )
    axis.set(
        xlabel="query (by BM25 nDCG@10)", ylabel="nDCG@10", ylim=(-0.02, 1.02), title="nDCG@10 per query"
    )
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1) :]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table padded to aligned columns: the label left, numbers right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cells[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)),
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2), *("-" * (w + 1) + ":" for w in widths[1:])]) + "|"
    return [line(header), rule, *(line(row) for row in rows)]
