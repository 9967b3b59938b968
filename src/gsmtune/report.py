"""Tables, error analysis and plots as markdown, CSV and one self-contained HTML file (plots embedded as PNG)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from gsmtune.analysis import (
    CATEGORIES,
    CATEGORY_RULES,
    all_pairs,
    changed_problems,
    contamination,
    error_report,
    summary_rows,
    training_rows,
    with_votes,
)
from gsmtune.runs import Run
from gsmtune.stats import holm


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(runs: list[Run]) -> str:
    summary = summary_rows(runs)
    rows = [[r["run"], r["dataset"], r["method"], _pct(r["em"]), f"{_pct(r['ci_low'])}-{_pct(r['ci_high'])}", r["n"],
             _pct(r["flexible"]) if r["flexible"] is not None else ""] for r in summary]
    headers = ["run", "dataset", "method", "EM %", "95% CI", "n", "flexible EM %"]
    sources = list(dict.fromkeys(r["reference_source"] or "" for r in summary if r["reference_em"] is not None))
    if not sources:
        return table(headers, rows)
    for cells, r in zip(rows, summary, strict=True):  # each reference marked with its source's footnote number
        cells.append(f"{_pct(r['reference_em'])} [{sources.index(r['reference_source'] or '') + 1}]"
                     if r["reference_em"] is not None else "")
    notes = "\n".join(f"[{i}] {s or 'no source given'}" for i, s in enumerate(sources, 1))
    return f"{table([*headers, 'reference EM %'], rows)}\n\nReference results (config `reference`):\n\n{notes}"


def _num(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else ""


def training_table(runs: list[Run]) -> str | None:
    """The cost of each trained run beside its accuracy; None when no run trained."""
    rows = [[r["run"], r["method"] or "", _num(r["examples"], ","), _num(r["epochs"], ".2f"), _num(r["tokens"], ","),
             _num(r["hours"], ".2f"), _num(r["tokens_per_second"], ".0f"),
             f"{r['peak_gib']:.1f} ({r['peak_kind']})" if r["peak_gib"] is not None else "",
             ", ".join(x for x in (r["device"], r["precision"]) if x)]
            for r in training_rows(runs)]
    if not rows:
        return None
    return table(["run", "method", "examples", "epochs", "tokens trained", "hours", "tokens/s", "peak GiB",
                  "device, precision"], rows)


def pairs_table(runs: list[Run]) -> str:
    pairs = all_pairs(runs)
    rows = []
    for c, adjusted in zip(pairs, holm([c.p_value for c in pairs]), strict=True):
        note = f"{c.n} shared problems" if c.partial else ""
        rows.append([c.a, c.b, c.n, f"{100 * c.diff:+.1f}", f"{100 * c.diff_ci[0]:+.1f} to {100 * c.diff_ci[1]:+.1f}",
                     c.only_b, c.only_a, f"{c.p_value:.3g}", f"{adjusted:.3g}", note])
    if not rows:
        return "No two runs share a problem."
    return table(["A", "B", "n", "B-A (pts)", "bootstrap 95% CI", "only B right", "only A right", "McNemar p",
                  f"Holm p (of {len(rows)})", "note"], rows)


def comparison_markdown(runs: list[Run]) -> str:
    runs = with_votes(runs)
    training = training_table(runs)
    return (f"{summary_table(runs)}\n\nPaired differences (each pair on the problems both runs answered; exact McNemar "
            "test, bootstrap CI over problems; Holm's p adjusts McNemar's for the number of pairs in the table, the "
            f"one to read where no single pair was chosen in advance):\n\n{pairs_table(runs)}\n"
            + (f"\nTraining (hours and tokens/s over all resumed pieces):\n\n{training}\n" if training else ""))


def write_comparison_csv(runs: list[Run], path: Path) -> None:
    with path.open("w", newline="") as f:
        rows = summary_rows(with_votes(runs))
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _quote(text: str, limit: int = 400, max_lines: int = 12) -> str:
    """Model text as an indented code block: verbatim in a terminal, and markdown renderers escape its `<<a*b=c>>`."""
    lines = text.strip().splitlines()
    clipped = "\n".join(lines[:max_lines])
    clipped = clipped if len(clipped) <= limit else clipped[:limit]
    if clipped != text.strip():
        clipped += " [...]"
    return "\n".join("    " + line for line in clipped.splitlines()) or "    (empty)"


def analysis_markdown(run: Run, baseline: Run | None = None, examples: int = 2) -> str:
    rep = error_report(run, examples)
    wrong = sum(rep.counts.values())
    out = [f"### Errors of `{run.name}` ({wrong} wrong of {rep.total})", "",
           table(["category", "count", "% of problems", "rule"],
                 [[c, rep.counts[c], _pct(rep.rate(c)), CATEGORY_RULES[c]] for c in CATEGORIES])]
    leak = contamination(run)
    if leak and (leak[0] or leak[1]):
        out += ["", f"**Contamination warning**: {len(leak[0])} eval questions appear verbatim in this run's training "
                f"data and {len(leak[1])} more as near-duplicates (same text once numbers and spacing are normalised)."]
    for c in CATEGORIES:
        for row in rep.examples[c]:
            out += ["", f"*{c}*, problem {row['index']} (gold {row['gold']}, strict answer {row['extracted_strict']}):",
                    "", _quote(row["completion"])]
    if baseline is not None:
        out += ["", side_by_side_markdown(baseline, run, examples)]
    return "\n".join(out) + "\n"


def side_by_side_markdown(base: Run, tuned: Run, examples: int = 2) -> str:
    changes = changed_problems(base, tuned)
    out = [f"### `{base.name}` vs `{tuned.name}`", "",
           table(["fixed", "broken", "both right", "both wrong"], [[len(changes[k]) for k in changes]])]
    for kind in ("fixed", "broken"):
        for i in changes[kind][:examples]:
            b, t = base.predictions[i], tuned.predictions[i]
            out += ["", f"**{kind}**: problem {i} (gold {b['gold']}):", "", _quote(b["question"], limit=2000), "",
                    f"`{base.name}` (answer {b['extracted_strict']}):", "", _quote(b["completion"]), "",
                    f"`{tuned.name}` (answer {t['extracted_strict']}):", "", _quote(t["completion"])]
    return "\n".join(out)


# --- plots ------------------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def accuracy_plot(runs: list[Run]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(with_votes(runs))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.6))
    em = [100 * r["em"] for r in rows]
    err = [[100 * (r["em"] - r["ci_low"]) for r in rows], [100 * (r["ci_high"] - r["em"]) for r in rows]]
    ax.bar(range(len(rows)), em, yerr=err, capsize=4, color="#4C72B0")
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact match % (95% Wilson CI)")
    ax.set_title("GSM8K accuracy per run")
    return _png(fig)


def loss_plot(runs: list[Run]) -> bytes | None:
    import matplotlib.pyplot as plt

    trained = [r for r in runs if r.train_metrics and r.train_metrics.get("loss_curve")]
    if not trained:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in trained:
        curve = r.train_metrics["loss_curve"]
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=r.name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Training loss")
    ax.legend(fontsize=8)
    return _png(fig)


def categories_plot(runs: list[Run]) -> bytes:
    import matplotlib.pyplot as plt

    reports = [error_report(r, 0) for r in runs]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(runs)), 3.6))
    bottom = [0.0] * len(runs)
    for c in CATEGORIES:
        values = [100 * rep.rate(c) for rep in reports]
        ax.bar(range(len(runs)), values, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(runs)), [r.name for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of problems")
    ax.set_title("Error categories")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    return _png(fig)


# --- the report -------------------------------------------------------------------------------------------------


def baseline_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """(baseline, tuned) pairs: runs whose config names a `baseline_run` that is among the runs."""
    by_path = {r.path.resolve(): r for r in runs}
    pairs = []
    for r in runs:
        base = r.config.get("baseline_run")
        if base and Path(base).resolve() in by_path:
            pairs.append((by_path[Path(base).resolve()], r))
    return pairs


def report_markdown(runs: list[Run], images: dict[str, str]) -> str:
    """The report as markdown; `images` maps plot names to the links to put in the text."""
    parts = ["# gsmtune report", "", "## Accuracy", "", comparison_markdown(runs), f"![accuracy]({images['accuracy']})"]
    if "loss" in images:
        parts += ["", "## Training", "", f"![training loss]({images['loss']})"]
    parts += ["", "## Error categories", "", f"![error categories]({images['categories']})", ""]
    pairs = baseline_pairs(runs)
    paired = {t.name: b for b, t in pairs}
    for r in runs:
        parts.append(analysis_markdown(r, paired.get(r.name)))
    return "\n".join(parts)


def build_report(runs: list[Run], html_path: Path, markdown_path: Path | None = None) -> None:
    plots = {"accuracy": accuracy_plot(runs), "categories": categories_plot(runs)}
    if (loss := loss_plot(runs)) is not None:
        plots["loss"] = loss
    if markdown_path is not None:
        assets = markdown_path.with_suffix("")
        assets = assets.parent / (assets.name + "_files")
        assets.mkdir(parents=True, exist_ok=True)
        for name, png in plots.items():
            (assets / f"{name}.png").write_bytes(png)
        markdown_path.write_text(report_markdown(runs, {n: f"{assets.name}/{n}.png" for n in plots}))
    inline = {n: "data:image/png;base64," + base64.b64encode(png).decode() for n, png in plots.items()}
    html_path.write_text(markdown_to_html(report_markdown(runs, inline)))


def markdown_to_html(md: str) -> str:
    import markdown

    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f0f0f0}"
             "pre{background:#f7f7f7;margin:0.5em 0;padding:4px 10px;font-size:12px;white-space:pre-wrap}"
             "img{max-width:100%}")
    body = markdown.markdown(md, extensions=["tables"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gsmtune report</title><style>{style}</style>"
            f"</head><body>{body}</body></html>\n")
