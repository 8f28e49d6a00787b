"""`rl4llm compare` output: each kind's key metrics by default, a table within 100 columns, markdown, CSV and JSON,
and a chart with the RL curves."""

from __future__ import annotations

import csv
import io
import json

import pytest

from flows.compare import CURVES, FORMATTERS, WIDTH, as_table, best_of_n_curves, draw_best_of_n, newest_per_seed, plot


def rows(runs: int = 3) -> list[dict]:
    out = []
    for i in range(runs):  # newest first, as stage_metrics returns them
        run = f"run{i:05d}"
        out += [{"pipeline": "instructgpt", "run": run, "started": 100 - i, "stage": "reward_model",
                 "kind": "reward_model", "run_id": f"rm{i}", "skipped": i > 0,
                 "metrics": {"eval_accuracy": 0.8 + i / 100, "train_accuracy": 0.9, "normalization_bias": 1.5}},
                {"pipeline": "instructgpt", "run": run, "started": 100 - i, "stage": "ppo_without_ptx_long_name",
                 "kind": "ppo", "run_id": f"ppo{i}", "skipped": False,
                 "metrics": {"gold_score": 0.7 + i / 10, "kl": 0.01, "ptx_lm_loss": 3.2, "truncated_prompts": 0}}]
    return out


def test_the_table_shows_key_metrics_only_and_fits_100_columns():
    table = as_table(rows(30), None)
    assert max(len(line) for line in table.splitlines()) <= WIDTH
    assert "eval_accuracy" in table and "gold_score" in table and "kl" in table
    assert "normalization_bias" not in table and "truncated_prompts" not in table
    assert "older run(s) not shown" in table
    first = table.splitlines()[0].split()
    assert first[:2] == ["instructgpt", "metric"] and first[2] == "run00000"  # newest first


def test_chosen_metrics_replace_the_key_metrics():
    table = as_table(rows(), ["normalization_bias"])
    assert "normalization_bias" in table and "eval_accuracy" not in table and "ppo" not in table


def test_csv_json_and_markdown_hold_the_same_values():
    data = rows(2)
    records = list(csv.DictReader(io.StringIO(FORMATTERS["csv"](data, None))))
    assert len(records) == 2 * (2 + 3)  # 2 runs × (2 reward model + 3 ppo key metrics)
    parsed = json.loads(FORMATTERS["json"](data, None))
    assert parsed[0]["metrics"] == {"eval_accuracy": 0.8, "train_accuracy": 0.9}
    assert sorted(float(r["value"]) for r in records if r["metric"] == "gold_score") == pytest.approx([0.7, 0.8])
    markdown = FORMATTERS["markdown"](data, None).splitlines()
    assert markdown[0] == "| instructgpt | metric | run00000 | run00001 |" and "| ppo_without_ptx_long_name | kl |" \
        in markdown[-2]


def test_the_chart_has_the_stage_panels_and_the_rl_curves(tmp_path):
    curves = {f"ppo{i}": {name: [0.1 * s + i for s in range(5)] for name in CURVES} for i in range(3)}
    plot(rows(), None, curves, tmp_path / "compare.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "compare.png").size
    assert width > 1000 and height > 500  # 3 columns; a row of stage panels and a row of curves


def test_several_seeds_show_the_newest_run_of_each_and_their_mean_and_sd(tmp_path):
    seeded = []
    for started, seed, gold in ((5, "0", 0.5), (9, "0", 0.6), (7, "1", 0.8), (8, "2", 0.7)):  # seed 0 ran twice
        seeded.append({"pipeline": "instructgpt", "run": f"r{started}", "seed": seed, "started": started,
                       "seed_of": None if seed == "0" else "instructgpt", "stage": "ppo", "kind": "ppo",
                       "run_id": f"ppo{started}", "skipped": False,
                       "metrics": {"gold_score": gold}})
    table = as_table(seeded, None)
    header, _, line = table.splitlines()[:3]
    assert header.split()[2:] == ["mean", "±", "sd", "seed", "0", "seed", "1", "seed", "2"]
    assert line.split() == ["ppo", "gold_score", "0.7", "±", "0.1", "0.6", "0.8", "0.7"]  # mean, sample sd
    markdown = FORMATTERS["markdown"](seeded, None)
    assert "| instructgpt | metric | mean ± sd | seed 0 | seed 1 | seed 2 |" in markdown
    curves = {row["run_id"]: {name: [0.1, 0.2] for name in CURVES} for row in seeded}
    plot(seeded, None, curves, tmp_path / "compare.png")  # a curve per seed, coloured as its bars
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_runs_of_one_seed_are_not_taken_for_seeds_and_no_chart_is_drawn_without_metrics(tmp_path):
    plain = rows(2)
    for row, seed in zip(plain, ("0", "0", None, None)):  # the older run predates seed tags
        row["seed"] = seed
    assert newest_per_seed(plain) == plain  # no seed variants: the runs as they are
    assert not plot(plain, ["no_such_metric"], {}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def best_of_n_rows(points: dict[str, list[float]], seeds: bool = True) -> list[dict]:
    """A best_of_n stage row per seed (or per plain run, newest first); `points`: {scorer: [accuracy at N = 1, 2,
    4, 8, 16] of seed 0}, seed s adding s / 10 to each."""
    out = []
    for s in range(3):
        metrics = {f"{scorer}_n{n}": value + s / 10 for scorer, values in points.items()
                   for n, value in zip((1, 2, 4, 8, 16), values)}
        metrics |= {"pass1": 0.9, "problems": 40, "answered_rate": 0.5}  # not points of a curve
        metrics = dict(sorted(metrics.items()))  # by name, as a store may list them: pass1_n16 before pass1_n2
        out.append({"pipeline": "verifiers", "run": f"r{s}", "seed": str(s) if seeds else None, "started": 10 - s,
                    "seed_of": "verifiers" if seeds and s else None, "stage": "best_of_n", "kind": "best_of_n",
                    "run_id": f"bon{s}", "skipped": False, "metrics": metrics})
    return out


POINTS = {"oracle": [0.2, 0.3, 0.5, 0.7, 0.8], "pass1": [0.2] * 5, "prm_min": [0.2, 0.25, 0.3, 0.35, 0.4]}


def test_best_of_n_curves_are_parsed_from_the_metrics_and_averaged_over_seeds():
    [(pipeline, stage, runs, curves)] = best_of_n_curves(best_of_n_rows(POINTS))
    assert (pipeline, stage, runs) == ("verifiers", "best_of_n", ["seed 0", "seed 1", "seed 2"])
    assert list(curves) == ["pass1", "prm_min", "oracle"]  # the kind's order, whatever the metrics' order
    for scorer, values in POINTS.items():
        assert list(curves[scorer]) == [1, 2, 4, 8, 16]  # N as numbers, ascending (not "16" < "2")
        for (mean, sd), value in zip(curves[scorer].values(), values):
            assert mean == pytest.approx(value + 0.1) and sd == pytest.approx(0.1)  # seeds add 0, 0.1, 0.2


def test_best_of_n_curves_of_plain_runs_are_the_newest_runs():
    [(_, _, runs, curves)] = best_of_n_curves(best_of_n_rows(POINTS, seeds=False))
    assert runs == ["r0"] and curves["prm_min"] == {n: (v, 0.0) for n, v in zip((1, 2, 4, 8, 16), POINTS["prm_min"])}
    assert best_of_n_curves(rows()) == []  # no best-of-N stage, no curve


def test_the_chart_has_a_best_of_n_panel_with_a_line_and_band_per_scorer(tmp_path):
    from PIL import Image

    curves = {f"ppo{i}": {name: [0.1 * s + i for s in range(5)] for name in CURVES} for i in range(3)}
    plot(rows(), None, curves, tmp_path / "without.png")
    plot(rows() + best_of_n_rows(POINTS), None, curves, tmp_path / "with.png")
    (width, height), (_, before) = Image.open(tmp_path / "with.png").size, Image.open(tmp_path / "without.png").size
    assert width > 1000 and height > before + 250  # a row more: the best-of-N panel

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2)
    draw_best_of_n(list(axes), best_of_n_curves(best_of_n_rows(POINTS)), plt.get_cmap("tab10"))
    lines = {line.get_label(): line for line in axes[0].get_lines()}
    assert list(lines) == ["pass1", "prm_min", "oracle"] and axes[0].get_xscale() == "log"
    assert list(lines["oracle"].get_xdata()) == [1, 2, 4, 8, 16]
    assert list(lines["oracle"].get_ydata()) == pytest.approx([v + 0.1 for v in POINTS["oracle"]])
    assert len(axes[0].collections) == 3  # a ± sd band per scorer
    assert not axes[1].axison  # the unused panel is blank
    plt.close(fig)
