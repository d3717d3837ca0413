"""Recorded experiments: every config runs as `--config experiments/NAME`, every recorded result names one, and the
committed results table is what `python -m fastgrpo.experiments table` renders from the committed results."""

from __future__ import annotations

import json

from fastgrpo import experiments
from fastgrpo.config import load_config


def test_every_experiment_config_loads_and_every_result_names_one():
    names = {p.stem for p in experiments.CONFIGS.glob("*.yaml")}
    assert names
    for name in names:
        load_config(f"experiments/{name}")  # validated as `fastgrpo train --config experiments/NAME` would
        assert experiments.describe(name), f"{name}.yaml has no leading comment saying what it changes"
    results = list(experiments.RESULTS.glob("*.json"))
    assert results
    for path in results:
        record = json.loads(path.read_text())
        assert record["experiment"] in names and path.stem == f"{record['experiment']}-seed{record['seed']}"


def test_committed_table_matches_the_committed_results():
    text = experiments.TABLE_DOC.read_text(encoding="utf-8")
    assert text == experiments.render_doc(text), "docs/experiments/README.md is stale: python -m fastgrpo.experiments table"
    readme = experiments.README.read_text(encoding="utf-8")
    assert readme == experiments.render_doc(readme, experiments.README_EXPERIMENTS), \
        "README.md's results table is stale: python -m fastgrpo.experiments table"


def test_table_rows_show_the_change_the_report_holds(tmp_path):
    name = sorted(p.stem for p in experiments.CONFIGS.glob("*.yaml"))[0]
    report = {key: {"base": 0.8, "trained": 0.2} for key, _, _ in experiments.METRICS}
    (tmp_path / f"{name}-seed3.json").write_text(json.dumps({"experiment": name, "seed": 3, "epochs": 7,
                                                             "report": report}))
    row = experiments.render_table(tmp_path).splitlines()[2]
    assert f"| `{name}` | 3 | 7 |" in row and "80.0% -> 20.0% (-75.0%)" in row and "(-60.0 pts)" in row
    assert experiments.describe(name) in row


def test_seeds_of_one_experiment_share_a_row_with_mean_and_spread(tmp_path):
    name = sorted(p.stem for p in experiments.CONFIGS.glob("*.yaml"))[0]
    for seed, trained in ((0, 0.2), (1, 0.4), (2, 0.6)):
        report = {key: {"base": 0.8, "trained": trained} for key, _, _ in experiments.METRICS}
        (tmp_path / f"{name}-seed{seed}.json").write_text(json.dumps({"experiment": name, "seed": seed, "epochs": 7,
                                                                      "report": report}))
    rows = experiments.render_table(tmp_path).splitlines()[2:]
    # relative changes -75%, -50%, -25%: mean -50%, standard deviation 25; in points -60, -40, -20: -40 +- 20
    assert len(rows) == 1 and f"| `{name}` | 0, 1, 2 | 7 |" in rows[0]
    assert "80.0% -> 40.0% (-50.0% +- 25.0)" in rows[0] and "(-40.0 pts +- 20.0)" in rows[0]
