"""Evaluation report: report.md, metrics.json, PNG plots (matplotlib Agg) and the printed summary."""

from __future__ import annotations

import json
import sys
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _label(key: str) -> str:
    """``recall@20`` -> ``Recall@20``, ``ndcg@10`` -> ``NDCG@10``, ``cold_recall@20`` -> ``cold Recall@20``."""
    return key.replace("_", " ").replace("recall@", "Recall@").replace("ndcg@", "NDCG@")


def _agg():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> str:
    """Recall@K for K = 1..len(curve), overall (left) and cold queries (right), one line per method."""
    plt = _agg()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for ax, part, title in ((axes[0], "overall", "all queries"), (axes[1], "cold", "cold queries")):
        for name, c in curves.items():
            ys = c.get(part)
            if ys is None or not len(ys):
                continue
            ax.plot(np.arange(1, len(ys) + 1), ys, label=name, linewidth=1.6)
        ax.set_title(f"Recall@K, {title}")
        ax.set_xlabel("K")
        ax.set_ylabel("Recall@K")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("Recall@K = hits / min(K, |targets|) (so it can dip while K < |targets|); lines that coincide share a ranking", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_projection(xy: np.ndarray, labels: Sequence[str], title: str, path: str | Path, max_legend: int = 12) -> str:
    """2-D scatter coloured by label (the most frequent ``max_legend`` labels; the rest grey)."""
    plt = _agg()
    labels = np.asarray(labels, dtype=object)
    values, counts = np.unique(labels.astype(str), return_counts=True)
    top = values[np.argsort(-counts, kind="stable")][:max_legend]
    fig, ax = plt.subplots(figsize=(8, 7))
    other = ~np.isin(labels.astype(str), top)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="lightgrey", label="other", alpha=0.6)
    cmap = plt.get_cmap("tab20")
    for i, v in enumerate(top):
        m = labels.astype(str) == v
        ax.scatter(xy[m, 0], xy[m, 1], s=5, color=cmap(i % 20), label=str(v)[:40], alpha=0.8)
    ax.set_title(title)
    ax.legend(fontsize=7, markerscale=3, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def basket_rows(results: Mapping[str, Any], details: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method, best Recall@20 first (with the cold NDCG/Recall@10 from details)."""
    bc = results["basket_completion"]
    extra = details.get("basket_completion", {})
    rows = []
    for name, m in bc.items():
        rows.append({"method": name, **m, **extra.get(name, {})})
    key = headline(rows, "recall@")
    if key:
        rows.sort(key=lambda r: -(r.get(key) or 0.0))
    return rows


# Report order of the metric families and their column labels; K comes from the keys themselves, so
# any ``ks`` / ``ndcg_k`` the evaluation ran with is reported (not only 10 and 20).
_FAMILIES = (("recall@", "R@"), ("ndcg@", "NDCG@"), ("warm_recall@", "warm R@"), ("cold_recall@", "cold R@"), ("cold_ndcg@", "cold NDCG@"))


def _cutoffs(rows: Sequence[Mapping[str, Any]], prefix: str) -> list[int]:
    keys = {k for r in rows for k in r if k.startswith(prefix) and k[len(prefix):].isdigit()}
    return sorted(int(k[len(prefix):]) for k in keys)


def headline(rows: Sequence[Mapping[str, Any]], prefix: str) -> str | None:
    """The key of the largest cut-off of one metric family (``recall@`` -> ``recall@20``), None if absent."""
    ks = _cutoffs(rows, prefix)
    return f"{prefix}{ks[-1]}" if ks else None


def metric_columns(rows: Sequence[Mapping[str, Any]], families: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(key, label) of every metric the rows carry, family by family, cut-offs ascending."""
    return [(f"{p}{k}", f"{label}{k}") for p, label in _FAMILIES if families is None or p in families for k in _cutoffs(rows, p)]


def reading(results: Mapping[str, Any], details: Mapping[str, Any]) -> list[str]:
    """A few sentences that read the numbers (generated, so they stay true for any dataset)."""
    rows = basket_rows(results, details)
    out: list[str] = []
    if not rows:
        return ["No method was evaluated."]
    ds = results["dataset"]
    best = rows[0]
    rk, ck, nk = headline(rows, "recall@"), headline(rows, "cold_recall@"), headline(rows, "ndcg@")
    if rk:
        out.append(
            f"Best overall {_label(rk)}: **{best['method']}** ({_fmt(best.get(rk))}) on {ds.get('queries')} queries "
            f"from {ds.get('query_sessions')} test sessions; {_fmt(100 * ds.get('cold_query_share', 0.0), 1)}% of the "
            f"queries and {_fmt(100 * ds.get('cold_target_share', 0.0), 1)}% of the targets are cold (never in a train session)."
        )
        pop = results["basket_completion"].get("popularity")
        if pop and pop.get(rk):
            out.append(f"That is {best[rk] / pop[rk]:.1f}x the popularity baseline ({_fmt(pop[rk])}).")
    cold = [r for r in rows if ck and r.get(ck) is not None]
    if cold and ds.get("cold_queries"):
        bc = max(cold, key=lambda r: r[ck])
        behav = [r for r in cold if r["method"] in ("popularity", "cooc_count", "cooc_cosine", "item2vec_default", "item2vec_tuned")]
        txt = f"On cold queries the best is **{bc['method']}** ({_fmt(bc[ck])})"
        if behav:
            bb = max(behav, key=lambda r: r[ck])
            txt += (
                f"; behaviour-only methods cannot place a cold query and fall back to popularity order "
                f"(best of them {_fmt(bb[ck])})"
            )
        out.append(txt + ".")
    if nk:
        nd = max(rows, key=lambda r: r.get(nk) or 0.0)
        out.append(f"Best {_label(nk)}: **{nd['method']}** ({_fmt(nd[nk])}).")
    tuned = details.get("item2vec", {}).get("chosen")
    if tuned:
        out.append(f"item2vec_tuned uses {tuned} (chosen on {details['item2vec'].get('val_source')}).")
    return out


def render_markdown(results: Mapping[str, Any], details: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """The report.md text: dataset, basket completion, probe, perplexity, notes, plots."""
    ds = results["dataset"]
    lines = ["# prodrep evaluation report", ""]
    if details.get("lake"):
        lines += [f"Lake: `{details['lake']}` (sessions v{ds.get('sessions_version')}, catalog v{ds.get('catalog_version')})", ""]
    lines += ["## Dataset", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in ds.items()]
    lines += ["", "## Basket completion (item-to-item retrieval)", ""]
    lines.append(
        "Protocol: test sessions with 2..50 distinct items, up to 5 query items each (numpy default_rng(0)), "
        "at most the configured number of queries; targets = the other items of the session; candidates = "
        "train items + test items with text; ties broken by train popularity, then item id."
    )
    rows = basket_rows(results, details)
    cols = metric_columns(rows)
    lines += ["", "| method | " + " | ".join(label for _, label in cols) + " | queries | cold |", "|---" * (len(cols) + 3) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + f" | {r.get('queries')} | {r.get('cold_queries')} |")
    lines += ["", "### Reading", ""] + [f"- {s}" for s in reading(results, details)]
    tuned = {"item2vec": details.get("item2vec", {}), **details.get("tuning", {})}
    for name, t in tuned.items():
        if t.get("grid"):
            lines += ["", f"### {name} grid (val: {t.get('val_source')})", ""]
            cols = list(t["grid"][0].keys())
            lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_fmt(r[c], 4) for c in cols) + " |" for r in t["grid"]]
    lines += ["", "## Category probe", ""]
    if results.get("probe"):
        lines += ["| method | accuracy | macro-F1 | items | classes |", "|---|---|---|---|---|"]
        for name, p in results["probe"].items():
            lines.append(f"| {name} | {_fmt(p['accuracy'])} | {_fmt(p['macro_f1'])} | {p['items']} | {p['classes']} |")
    else:
        lines.append(details.get("probe_note", "Not run."))
    lines += ["", "## Held-out masked-token perplexity", ""]
    if results.get("perplexity"):
        lines += ["| model | perplexity |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v, 2)} |" for k, v in results["perplexity"].items()]
    else:
        lines.append(details.get("perplexity_note", "No MLM model in the lake."))
    if details.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in details["notes"]]
    if details.get("timings_s"):
        lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in details["timings_s"].items()]
    if plots:
        lines += ["", "## Plots", ""]
        for title, p in plots.items():
            lines.append(f"![{title}]({Path(p).name})")
            if title == "projection" and (details.get("projection") or {}).get("caption"):
                lines += ["", f"*{details['projection']['caption']}*", ""]
    return "\n".join(lines) + "\n"


def write_report(
    report_dir: str | Path,
    results: Mapping[str, Any],
    details: Mapping[str, Any],
    plots: Mapping[str, str],
) -> dict[str, str]:
    """Write report.md and metrics.json (results + details) into ``report_dir``; return their paths."""
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    md = d / "report.md"
    md.write_text(render_markdown(results, details, plots))
    mj = d / "metrics.json"
    mj.write_text(json.dumps({**results, "details": details}, indent=2, default=str))
    return {"report": str(md), "metrics": str(mj), **{k: str(v) for k, v in plots.items()}}


def print_summary(results: Mapping[str, Any], details: Mapping[str, Any], paths: Mapping[str, str] | None = None) -> None:
    """The table printed at the end of ``prodrep evaluate`` (rich when available)."""
    rows = basket_rows(results, details)
    # the printed table keeps to the headline columns (every cold cut-off is in report.md)
    cols = metric_columns(rows, ("recall@", "ndcg@", "warm_recall@")) + metric_columns(rows, ("cold_recall@",))[-1:]
    head = ["method", *(label for _, label in cols), "queries", "cold"]
    body = [[r["method"], *(_fmt(r.get(k)) for k, _ in cols), str(r.get("queries")), str(r.get("cold_queries"))] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="basket completion (test split)")
        for h in head:
            if h == "method":  # method names are the point of the table: never elided
                t.add_column(h, justify="left", no_wrap=True, min_width=max([len(b[0]) for b in body] + [6]))
            else:
                t.add_column(h, justify="right")
        for b in body:
            t.add_row(*b)
        Console(width=None if sys.stdout.isatty() else 160).print(t)  # logs: no 80-column squeeze
    except ImportError:  # pragma: no cover - rich is a dependency, plain text is the fallback
        w = [max(len(x) for x in col) for col in zip(head, *body)]
        for r in [head, *body]:
            print("  ".join(x.ljust(n) for x, n in zip(r, w)))
    if results.get("perplexity"):
        print("perplexity: " + ", ".join(f"{k}={v:.2f}" for k, v in results["perplexity"].items()))
    for name, p in (results.get("probe") or {}).items():
        print(f"probe {name}: accuracy {_fmt(p['accuracy'])} macro-F1 {_fmt(p['macro_f1'])}")
    for k, v in (paths or {}).items():
        print(f"{k}: {v}")
