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
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "experiments" / "results"
TABLE_DOC = REPO / "docs" / "experiments" / "README.md"
README = REPO / "README.md"
# the README's table: one row per objective (and sampler) on the embedded default's world and recipe
README_EXPERIMENTS = ("colour_ddpo", "colour_ddpo_window", "colour_awm", "colour_awm_guided")
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


def render_table(results_dir: Path = RESULTS, only: tuple[str, ...] | None = None) -> str:
    """One row per recorded (experiment, seed): base -> trained for each metric, then its change; `only`: these
    experiments, in this order."""
    rows = ["| experiment | seed | epochs | " + " | ".join(label for _, label, _ in METRICS) + " | what it changes |",
            "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    records = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(results_dir.glob("*.json"))]
    if only is not None:
        records = sorted((r for r in records if r["experiment"] in only),
                         key=lambda r: (only.index(r["experiment"]), r["seed"]))
    for record in records:
        cells = []
        for key, _, kind in METRICS:
            base, trained = record["report"][key]["base"], record["report"][key]["trained"]
            cells.append(f"{100 * base:.1f}% -> {100 * trained:.1f}% ({_change(base, trained, kind)})")
        rows.append(f"| `{record['experiment']}` | {record['seed']} | {record['epochs']} | " + " | ".join(cells) +
                    f" | {describe(record['experiment'])} |")
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
