"""benchmarks/plot_curves.py: joining continued runs, skipping NaN, refusing bad input, writing a real PNG."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import plot_curves


def write_csv(path, rows):
    path.write_text("step,seconds,val_exact_match\n" + "".join(f"{s},{s / 10},{v}\n" for s, v in rows))
    return str(path)


def test_continued_run_is_joined_in_order_and_repeated_or_nan_rows_are_dropped(tmp_path):
    a = write_csv(tmp_path / "a.csv", [(1000, 0.1), (2000, "nan"), (3000, 0.3)])
    # the continuation repeats step 3000 (a resume writes its first row again) and then goes on
    b = write_csv(tmp_path / "b.csv", [(3000, 0.9), (4000, 0.4), (5000, "")])
    steps, values = plot_curves.read_series([a, b], "val_exact_match")
    assert steps == [1000, 3000, 4000]
    assert values == [0.1, 0.3, 0.4]


def test_writes_a_png_with_one_line_per_run_and_labels_may_hold_an_equals_sign(tmp_path):
    a = write_csv(tmp_path / "a.csv", [(1000, 0.1), (2000, 0.2)])
    b = write_csv(tmp_path / "b.csv", [(1000, 0.0), (2000, 0.05)])
    out = tmp_path / "img" / "curves.png"
    plot_curves.main(["--run", f"A, a = 0.25={a}", "--run", f"B={b}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "img" / "curves.png.tmp.png").exists()


@pytest.mark.parametrize(
    ("run", "key", "message"),
    [
        ("nolabel", "val_exact_match", "expected LABEL=path"),
        ("A={missing}", "val_exact_match", "no such file"),
        ("A={a}", "val_validity", "no column 'val_validity'; it has step, seconds, val_exact_match"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(tmp_path, run, key, message):
    a = write_csv(tmp_path / "a.csv", [(1000, 0.1)])
    run = run.format(a=a, missing=str(tmp_path / "nope.csv"))
    with pytest.raises(SystemExit, match=message):
        plot_curves.main(["--run", run, "--key", key, "--out", str(tmp_path / "x.png")])
