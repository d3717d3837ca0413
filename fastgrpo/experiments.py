"""Recorded experiments: each is a packaged config (`fastgrpo/configs/experiments/NAME.yaml`, runnable with
`fastgrpo train --config experiments/NAME`) and, once run, its evaluation (`fastgrpo eval RUN`'s report.json) copied
to `docs/experiments/results/NAME-seedS.json` with `python -m fastgrpo.experiments record NAME RUN_DIR`.

`python -m fastgrpo.experiments table` renders the results table of `docs/experiments/README.md` and the README's
objectives table from those files; tests/test_experiments.py checks that the committed tables are what the
committed results render to.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "experiments" / "results"
TABLE_DOC = REPO / "docs" / "experiments" / "README.md"
README = REPO / "README.md"
# the README's table: one row per objective (and sampler) on the colour world's recipe, then the loose spot world's
# nearest recipes (the last is the embedded default)
README_EXPERIMENTS = ("colour_ddpo", "colour_ddpo_window", "colour_awm", "colour_awm_guided", "colour_awm_placebo",
                      "colour_nft", "loose_ddpo_directions2_200_alpha05_cosine", "loose_awm_directions2_kl03",
                      "loose_nft_directions2_kl13_prediction_100",
                      "loose_nft_directions2_prediction_200_alpha05_cosine_late_kl03_early",
                      "loose_nft_directions2_prediction_200_alpha05_cosine")
CONFIGS = Path(__file__).parent / "configs" / "experiments"
BEGIN, END = "<!-- results table: python -m fastgrpo.experiments table -->", "<!-- end of results table -->"
METRICS = (("unsafe_rate", "unsafe", "relative"), ("ood_unsafe_rate", "OOD unsafe", "relative"),
           ("safe_accuracy", "safe accuracy", "points"), ("content_kept", "content kept", "points"))


def _change(base: float, trained: float, kind: str) -> str:
    if kind == "relative":
        return f"{100 * (trained - base) / base:+.1f}%" if base else "n/a"
    return f"{100 * (trained - base):+.1f} pts"


def describe(name: str) -> str:
    """The first comment line of the experiment's config: what it changes."""
    for line in (CONFIGS / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _changes(base: float, trained: float, kind: str) -> float | None:
    if kind == "relative":
        return 100 * (trained - base) / base if base else None
    return 100 * (trained - base)


def _cells(records: list[dict]) -> list[str]:
    """One seed: base -> trained (change). Several: the means, and the change's mean +- its standard deviation over
    seeds."""
    cells = []
    for key, _, kind in METRICS:
        bases = [r["report"][key]["base"] for r in records]
        trained = [r["report"][key]["trained"] for r in records]
        if len(records) == 1:
            cells.append(f"{100 * bases[0]:.1f}% -> {100 * trained[0]:.1f}% ({_change(bases[0], trained[0], kind)})")
            continue
        changes = [_changes(b, t, kind) for b, t in zip(bases, trained)]
        unit = "%" if kind == "relative" else " pts"
        spread = "n/a" if None in changes else \
            f"{statistics.mean(changes):+.1f}{unit} +- {statistics.stdev(changes):.1f}"
        cells.append(f"{100 * statistics.mean(bases):.1f}% -> {100 * statistics.mean(trained):.1f}% ({spread})")
    return cells


def render_table(results_dir: Path = RESULTS, only: tuple[str, ...] | None = None) -> str:
    """One row per experiment: base -> trained for each metric, then its change; with several recorded seeds, the
    means over them and the change's spread (standard deviation over seeds). `only`: these experiments, in order."""
    rows = ["| experiment | seed | epochs | " + " | ".join(label for _, label, _ in METRICS) + " | what it changes |",
            "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    records = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(results_dir.glob("*.json"))]
    if only is not None:
        records = sorted((r for r in records if r["experiment"] in only),
                         key=lambda r: (only.index(r["experiment"]), r["seed"]))
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["experiment"], record["epochs"]), []).append(record)
    for (name, epochs), group in groups.items():
        seeds = ", ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
        rows.append(f"| `{name}` | {seeds} | {epochs} | " + " | ".join(_cells(group)) + f" | {describe(name)} |")
    return "\n".join(rows) + "\n"


def render_doc(text: str, only: tuple[str, ...] | None = None) -> str:
    """The document with its table section replaced by a freshly rendered table."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render_table(only=only)}{END}{tail}"


def record(name: str, run_dir: Path) -> Path:
    """Copy a finished, evaluated run's report into the results folder."""
    if not (CONFIGS / f"{name}.yaml").is_file():
        raise SystemExit(f"experiments: no config fastgrpo/configs/experiments/{name}.yaml")
    report_path = run_dir / "eval" / "report.json"
    if not report_path.is_file():
        raise SystemExit(f"experiments: {report_path} not found (run `fastgrpo eval {run_dir}` first)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    report = json.loads(report_path.read_text(encoding="utf-8"))
    checkpoint = Path(report["info"].pop("checkpoint"))  # a local path: only its epoch is kept
    seed, epochs = config["run"]["seed"], int(checkpoint.name.split("_")[-1]) + 1
    out = RESULTS / f"{name}-seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"experiment": name, "seed": seed, "epochs": epochs, "report": report}, indent=1) + "\n",
                   encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgrpo.experiments", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("table", help="rewrite the results table in docs/experiments/README.md")
    rec = sub.add_parser("record", help="copy an evaluated run's report.json into docs/experiments/results")
    rec.add_argument("name")
    rec.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        print(record(args.name, args.run_dir))
    TABLE_DOC.write_text(render_doc(TABLE_DOC.read_text(encoding="utf-8")), encoding="utf-8")
    README.write_text(render_doc(README.read_text(encoding="utf-8"), README_EXPERIMENTS), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
