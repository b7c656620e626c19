"""Plot loss (train and eval) and learning rate against step, for one run or several side by side.

Reads RUN/metrics.jsonl (what train.py writes to --output) for each run and saves one
PNG, each run's lines labelled with its directory name. Needs matplotlib, an optional
extra: pip install -e ".[plot]".

    python scripts/plot_metrics.py runs/phi3-lora --output curves.png
    python scripts/plot_metrics.py runs/a runs/b --output compare.png
"""
import argparse
import json
import sys
from pathlib import Path


def read_metrics(run: Path) -> list:
    """The rows of RUN/metrics.jsonl, or a ValueError naming the file (and line)."""
    path = run / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file "
                         f"(is {run} a train.py --output directory?)") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not JSON") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{number}: not a metrics row (no step)")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no logged steps")
    return rows


def series(rows: list, key: str):
    """Steps and values of one metric, over the rows that have it."""
    points = [(row["step"], row[key]) for row in rows if key in row]
    return [step for step, _ in points], [value for _, value in points]


def figure_class():
    """matplotlib's Figure (it saves PNG through Agg, no display needed), or a ValueError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError('plotting needs the matplotlib package: '
                         'pip install -e ".[plot]"') from None
    return Figure


def plot(runs: list, output: Path) -> None:
    """Loss on the left (eval dashed, in its run's colour), learning rate on the right."""
    figure = figure_class()(figsize=(10, 4), layout="constrained")
    loss_axes, lr_axes = figure.subplots(1, 2)
    for i, (name, rows) in enumerate(runs):
        colour = f"C{i % 10}"
        loss_axes.plot(*series(rows, "loss"), color=colour, label=f"{name} train")
        steps, eval_loss = series(rows, "eval_loss")
        if steps:
            loss_axes.plot(steps, eval_loss, "o--", color=colour, label=f"{name} eval")
        lr_axes.plot(*series(rows, "lr"), color=colour, label=name)
    for axes, title in ((loss_axes, "loss"), (lr_axes, "learning rate")):
        axes.set(title=title, xlabel="step")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(output, dpi=100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plot_metrics.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="train.py output directories (each with metrics.jsonl)")
    parser.add_argument("--output", type=Path, default=Path("curves.png"),
                        help="PNG file to write (default: curves.png)")
    args = parser.parse_args(argv)
    try:
        figure_class()  # a missing package stops here, before reading anything
        runs = [(run.resolve().name, read_metrics(run)) for run in args.runs]
        plot(runs, args.output)
    except (ValueError, OSError) as error:
        parser.exit(2, f"plot_metrics.py: error: {error}\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
