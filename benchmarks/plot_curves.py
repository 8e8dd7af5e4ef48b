"""Plot validation curves of training runs from their ``curve.csv`` files into one PNG (for docs/).

A run continued across several ``--out`` folders is given as one label with its CSV files in order, joined with
commas; rows whose step is not beyond the previous file's last step are dropped (a resumed run may repeat one).

Example::

    python benchmarks/plot_curves.py --key val_exact_match --out docs/img/star_medium_equal_steps.png \
        --run "LoFlexMDM=benchmarks/out/s15/a/curve.csv,benchmarks/out/s16/b/curve.csv" \
        --run "FlexMDM=benchmarks/out/s18/c/curve.csv"
"""

from __future__ import annotations

import argparse
import csv
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_series(paths: list[str], key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key`` across the CSV files of one run, in file order, steps strictly increasing.
    Rows with an empty or NaN value are skipped."""
    steps: list[float] = []
    values: list[float] = []
    for path in paths:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if key not in (reader.fieldnames or []):
                raise SystemExit(f"{path}: no column {key!r}; it has {', '.join(reader.fieldnames or [])}")
            for row in reader:
                step, raw = float(row["step"]), row[key]
                if steps and step <= steps[-1]:
                    continue
                try:
                    value = float(raw)
                except ValueError:
                    continue
                if not math.isnan(value):
                    steps.append(step)
                    values.append(value)
    return steps, values


def parse_run(text: str) -> tuple[str, list[str]]:
    label, sep, files = text.rpartition("=")  # the label may hold "=" ("a = 0.25"); the paths may not
    paths = [p for p in files.split(",") if p]
    if not sep or not label or not paths:
        raise SystemExit(f"--run {text!r}: expected LABEL=path/curve.csv[,path/curve.csv...]")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--run {label}: no such file {missing[0]}")
    return label, paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=curve.csv[,curve.csv...] (repeatable)")
    ap.add_argument("--key", default="val_exact_match", help="the curve.csv column to plot")
    ap.add_argument("--ylabel", default=None)
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args(argv)

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for text in args.run:
        label, paths = parse_run(text)
        steps, values = read_series(paths, args.key)
        ax.plot(steps, values, marker=".", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(args.ylabel or args.key)
    if args.title:
        ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, args.out)  # never leave a half-written image behind
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
