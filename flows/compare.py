"""`rl4llm compare`: the key metrics of each stage across runs, as a table a person reads (or markdown, CSV,
JSON), and a chart of those metrics side by side plus the training curves of RL stages overlaid across runs and the
accuracy-vs-N curves of best-of-N stages."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable

from stages.kinds import key_metrics

WIDTH = 100  # the table fits a terminal this wide
CURVES = ("reward", "kl", "response_length")  # per-step curves of RL stages, overlaid across runs
RL_KINDS = ("ppo", "grpo")
BEST_OF_N_KINDS = ("best_of_n",)  # stages whose final metrics `<scorer>_n<N>` are accuracy-vs-N curves
CURVE_POINT = re.compile(r"(?P<scorer>.+)_n(?P<n>[0-9]+)")  # a best-of-N metric name: scorer and N
BestOfNPanel = tuple[str, str, list[str], dict[str, dict[int, tuple[float, float]]]]  # see best_of_n_curves


def shown_metrics(row: dict[str, Any], chosen: list[str] | None) -> list[str]:
    """The metrics of a stage row to show: `chosen`, else its kind's key metrics; only those it logged."""
    wanted = chosen if chosen else key_metrics(row["kind"])
    return [m for m in wanted if m in row["metrics"]]


def newest_per_seed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a pipeline has runs of seed variants (`rl4llm run --seeds`): the newest run of each seed only, named
    `seed N`, in seed order. Other pipelines' rows are left as they are."""
    newest: dict[tuple[str, Any], int] = {}
    for row in rows:
        key = (row["pipeline"], row.get("seed"))
        newest[key] = max(newest.get(key, row["started"]), row["started"])
    out = []
    for pipeline in dict.fromkeys(row["pipeline"] for row in rows):
        mine = [row for row in rows if row["pipeline"] == pipeline]
        if not any(row.get("seed_of") for row in mine):  # no seed variants: plain runs, newest first
            out += mine
            continue
        out += sorted((row | {"run": f"seed {row['seed']}"} for row in mine
                       if row.get("seed") is not None and row["started"] == newest[(pipeline, row["seed"])]),
                      key=lambda r: int(r["seed"]))
    return out


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` (sample standard deviation) of a metric over seeds."""
    mean = statistics.fmean(values)
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.3g}"


def lines_by_pipeline(rows: list[dict[str, Any]], chosen: list[str] | None) -> dict[str, dict[str, Any]]:
    """{pipeline: {"runs": [run ids, newest first, or seeds], "lines": [(stage, metric, {run: value})],
    "seeds": whether the runs are seeds (then the report adds their mean ± sd)}}."""
    rows = newest_per_seed(rows)
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        pipeline = out.setdefault(row["pipeline"], {"runs": [], "lines": {}})
        if row["run"] not in pipeline["runs"]:
            pipeline["runs"].append(row["run"])
        for metric in shown_metrics(row, chosen):
            pipeline["lines"].setdefault((row["stage"], metric), {})[row["run"]] = row["metrics"][metric]
    return {p: {"runs": v["runs"], "lines": [(s, m, values) for (s, m), values in v["lines"].items()],
                "seeds": len(v["runs"]) > 1 and all(r.startswith("seed ") for r in v["runs"])} for p, v in out.items()}


def curve_points(metrics: dict[str, float]) -> dict[str, dict[int, float]]:
    """{scorer: {N: accuracy}} from a best-of-N stage's final metrics named `<scorer>_n<N>`."""
    points: dict[str, dict[int, float]] = {}
    for name, value in metrics.items():
        match = CURVE_POINT.fullmatch(name)
        if match:
            points.setdefault(match["scorer"], {})[int(match["n"])] = value
    return points


def best_of_n_curves(rows: list[dict[str, Any]]) -> list[BestOfNPanel]:
    """[(pipeline, stage, runs, {scorer: {N: (mean, sd)}})] for each best-of-N stage: over the newest run of each
    seed when the pipeline ran several (`rl4llm run --seeds`; sd: the sample standard deviation), else of its
    newest run alone (sd 0)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in newest_per_seed(rows):
        if row["kind"] in BEST_OF_N_KINDS and curve_points(row["metrics"]):
            groups.setdefault((row["pipeline"], row["stage"]), []).append(row)
    out = []
    for (pipeline, stage), group in groups.items():
        seeds = len(group) > 1 and all(row["run"].startswith("seed ") for row in group)
        group = group if seeds else group[:1]
        parsed = [curve_points(row["metrics"]) for row in group]
        order = key_metrics(group[0]["kind"])  # the kind's scorers in its order, then any others
        scorers = sorted({s for points in parsed for s in points},
                         key=lambda s: (order.index(s) if s in order else len(order), s))
        curves = {}
        for scorer in scorers:
            sizes = sorted({n for points in parsed for n in points.get(scorer, {})})
            values = {n: [points[scorer][n] for points in parsed if n in points.get(scorer, {})] for n in sizes}
            curves[scorer] = {n: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                              for n, v in values.items()}
        out.append((pipeline, stage, [row["run"] for row in group], curves))
    return out


def _value(values: dict[str, float], run: str) -> str:
    return f"{values[run]:.4g}" if run in values else "-"


def as_table(rows: list[dict[str, Any]], chosen: list[str] | None) -> str:
    """One block per pipeline: a line per (stage, metric), a column per run (newest first), within WIDTH."""
    blocks = []
    for pipeline, block in lines_by_pipeline(rows, chosen).items():
        stage_w = min(22, max([len(s) for s, _, _ in block["lines"]] + [5]))
        metric_w = min(24, max([len(m) for _, m, _ in block["lines"]] + [6]))
        spread = f"  {'mean ± sd':>16}" if block["seeds"] else ""
        fits = max(1, (WIDTH - 2 - stage_w - metric_w - len(spread)) // 11)
        runs = block["runs"][:fits]
        header = (f"{pipeline[:stage_w]:<{stage_w}}  {'metric':<{metric_w}}{spread}"
                  + "".join(f"  {r:>9}" for r in runs))
        lines = [header, "-" * len(header)]
        for stage, metric, values in block["lines"]:
            lines.append(f"{stage[:stage_w]:<{stage_w}}  {metric[:metric_w]:<{metric_w}}"
                         + (f"  {mean_sd(list(values.values())):>16}" if spread else "")
                         + "".join(f"  {_value(values, r):>9}" for r in runs))
        if len(block["runs"]) > len(runs):
            lines.append(f"({len(block['runs']) - len(runs)} older run(s) not shown; --format csv has them all)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\nruns: newest first; with several seeds, the newest run of each"


def as_markdown(rows: list[dict[str, Any]], chosen: list[str] | None) -> str:
    blocks = []
    for pipeline, block in lines_by_pipeline(rows, chosen).items():
        spread = ["mean ± sd"] if block["seeds"] else []
        lines = [f"| {pipeline} | metric | " + " | ".join(spread + block["runs"]) + " |",
                 "|---|---|" + "---:|" * (len(spread) + len(block["runs"]))]
        lines += [f"| {stage} | {metric} | " + " | ".join([mean_sd(list(values.values()))] * len(spread)
                                                          + [_value(values, r) for r in block["runs"]]) + " |"
                  for stage, metric, values in block["lines"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def as_csv(rows: list[dict[str, Any]], chosen: list[str] | None) -> str:
    """Long format: one line per (pipeline, run, stage, metric)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["pipeline", "run", "seed", "started", "stage", "kind", "skipped", "metric", "value"])
    for row in rows:
        for metric in shown_metrics(row, chosen):
            writer.writerow([row["pipeline"], row["run"], row.get("seed"), row["started"], row["stage"], row["kind"],
                             row["skipped"], metric, row["metrics"][metric]])
    return out.getvalue().rstrip("\n")


def as_json(rows: list[dict[str, Any]], chosen: list[str] | None) -> str:
    return json.dumps([{**{k: row.get(k) for k in ("pipeline", "run", "seed", "started", "stage", "kind", "skipped")},
                        "metrics": {m: row["metrics"][m] for m in shown_metrics(row, chosen)}} for row in rows],
                      indent=2)


FORMATTERS: dict[str, Callable[[list[dict[str, Any]], list[str] | None], str]] = {
    "table": as_table, "markdown": as_markdown, "csv": as_csv, "json": as_json}


def plot(rows: list[dict[str, Any]], chosen: list[str] | None, curves: dict[str, dict[str, list[float]]],
         path: Path) -> bool:
    """Top: a panel per (pipeline, stage) with its key metrics side by side, a bar per run (each metric scaled to
    its own largest value; the labels are the values). Below: for each RL stage, its reward, KL and response
    length per step, a line per run; then a panel per best-of-N stage, its accuracy vs N per scorer
    (`best_of_n_curves`). `curves`: {stage run id: {metric: values}}. False (and no chart) when none of the
    metrics shown was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = lines_by_pipeline(rows, chosen)
    stages = [(p, s, [(m, v) for s2, m, v in b["lines"] if s2 == s], b["runs"])
              for p, b in blocks.items() for s in dict.fromkeys(s for s, _, _ in b["lines"])]
    if not stages:
        return False
    rl = [row for row in newest_per_seed(rows) if row["kind"] in RL_KINDS and row["run_id"] in curves
          and row["pipeline"] in blocks]
    rl_stages = list(dict.fromkeys((r["pipeline"], r["stage"]) for r in rl))
    best_of_n = [panel for panel in best_of_n_curves(rows) if panel[0] in blocks]
    columns = 3
    stage_rows, best_of_n_rows = -(-len(stages) // columns), -(-len(best_of_n) // columns)
    fig, axes = plt.subplots(stage_rows + len(rl_stages) + best_of_n_rows, columns, squeeze=False,
                             figsize=(4.2 * columns, 2.8 * (stage_rows + len(rl_stages) + best_of_n_rows)))
    colors = plt.get_cmap("tab10")
    for ax, (pipeline, stage, metrics, runs) in zip(axes[:stage_rows].flat, stages):
        width = 0.8 / max(len(runs), 1)
        scales = [max((abs(x) for x in v.values()), default=0.0) or 1.0 for _, v in metrics]
        for i, run in enumerate(runs):  # each metric on its own scale (its largest |value| = 1), labelled
            values = [v.get(run, float("nan")) for _, v in metrics]
            bars = ax.barh([j + i * width for j in range(len(metrics))],
                           [x / scale for x, scale in zip(values, scales)], height=width, color=colors(i % 10),
                           label=run)
            ax.bar_label(bars, labels=[f"{x:.3g}" for x in values], fontsize=6, padding=2)
        ax.set_yticks([j + width * (len(runs) - 1) / 2 for j in range(len(metrics))], [m for m, _ in metrics],
                      fontsize=7)
        ax.invert_yaxis()
        lowest = min([0.0] + [x / scale for (_, v), scale in zip(metrics, scales) for x in v.values()])
        ax.set_xlim(lowest * 1.3, 1.3)
        ax.set_xticks([])
        ax.set_title(f"{pipeline}/{stage}", fontsize=9)
    for ax in list(axes[:stage_rows].flat)[len(stages):]:
        ax.axis("off")
    if stages:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=7,
                   title="seeds" if all(label.startswith("seed ") for label in labels) else "runs, newest first",
                   title_fontsize=7)
    for row_axes, (pipeline, stage) in zip(axes[stage_rows:], rl_stages):
        for ax, metric in zip(row_axes, CURVES):
            for row in (r for r in rl if (r["pipeline"], r["stage"]) == (pipeline, stage)):
                values = curves[row["run_id"]].get(metric, [])
                color = colors(blocks[pipeline]["runs"].index(row["run"]) % 10)  # as in the bars above
                ax.plot(range(1, len(values) + 1), values, color=color, label=row["run"])
            ax.set_title(f"{pipeline}/{stage}\n{metric} per step", fontsize=9)
            ax.tick_params(labelsize=7)
        row_axes[0].legend(fontsize=6)
    draw_best_of_n(list(axes[stage_rows + len(rl_stages):].flat), best_of_n, colors)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_size_inches()[1]))  # room for the legend above
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_best_of_n(axes: list[Any], panels: list[BestOfNPanel], colors: Any) -> None:
    """A panel per best-of-N stage (Lightman et al.'s Figure 3): accuracy vs N on a log2 axis, a line per scorer
    (each scorer one colour in every panel; pass@N dashed), with a band of ± one sd when over several seeds."""
    scorers = list(dict.fromkeys(scorer for *_, curves in panels for scorer in curves))
    for ax, (pipeline, stage, runs, curves) in zip(axes, panels):
        for scorer, curve in curves.items():
            sizes, color = list(curve), colors(scorers.index(scorer) % 10)
            means = [mean for mean, _ in curve.values()]
            ax.plot(sizes, means, marker="o", markersize=3, color=color, label=scorer,
                    linestyle="--" if scorer == "oracle" else "-")
            if len(runs) > 1:
                ax.fill_between(sizes, [m - sd for m, sd in curve.values()], [m + sd for m, sd in curve.values()],
                                color=color, alpha=0.15, linewidth=0)
        sizes = sorted({n for curve in curves.values() for n in curve})
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("N (samples per problem)", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        over = f"mean ± sd over {len(runs)} seeds" if len(runs) > 1 else runs[0]
        ax.set_title(f"{pipeline}/{stage}\nbest-of-N accuracy ({over})", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[len(panels):]:
        ax.axis("off")
