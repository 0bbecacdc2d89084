#!/usr/bin/env python
"""Compare ``medad preprocess`` output folders side by side (e.g. one per ``--registration-backend``).

Per folder: the cases of its ``preprocess_log.csv`` with outputs, the registration and total time per case (wall
clock, and CPU time of all threads, which depends less on the machine's load), and the Dice of each registered
brain mask with the template's brain mask (MNI152 2 mm, nilearn). Prints a Markdown table; ``--csv`` also writes
the per-case rows::

    python scripts/registration_table.py /tmp/bench/ants /tmp/bench/elastix --csv /tmp/bench/cases.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def case_rows(folder: Path, template_mask: np.ndarray) -> pd.DataFrame:
    """One row per processed case of ``folder``: backend, times and Dice with the template brain mask."""
    log = pd.read_csv(folder / "preprocess_log.csv", keep_default_na=False, na_values=[""])
    log = log[log["status"].isin(["ok", "skipped"])].copy()
    log["dice_template"] = [dice(np.asarray(nib.load(path).dataobj) > 0, template_mask) for path in log["brain_mask"]]
    log["folder"] = str(folder)
    if "cpu_seconds_register" not in log:  # logs written before the per-step CPU times
        log["cpu_seconds_register"] = np.nan
    return log[["folder", "case", "registration_backend", "seconds_register", "cpu_seconds_register",
                "total_seconds", "cpu_seconds", "dice_template"]]


def summary(rows: pd.DataFrame) -> str:
    """A Markdown table: per folder, mean / median / min-max of the times and Dice."""
    def stats(values: pd.Series, digits: int) -> str:
        return (f"{values.mean():.{digits}f} / {values.median():.{digits}f} / "
                f"{values.min():.{digits}f}–{values.max():.{digits}f}")

    lines = ["| backend | cases | registration s (wall) | registration s (CPU) | total s (wall) | total s (CPU) | "
             "Dice with template mask |", "|---|---|---|---|---|---|---|"]
    for folder, group in rows.groupby("folder", sort=False):
        backend = ", ".join(sorted(set(group["registration_backend"].astype(str))))
        lines.append(f"| {backend} (`{folder}`) | {len(group)} | {stats(group['seconds_register'], 1)} | "
                     f"{stats(group['cpu_seconds_register'], 1)} | {stats(group['total_seconds'], 1)} | "
                     f"{stats(group['cpu_seconds'], 1)} | "
                     f"{stats(group['dice_template'], 3)} |")
    lines.append("(each cell: mean / median / min–max over the cases)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="medad preprocess output folders")
    parser.add_argument("--csv", default=None, help="write the per-case rows here")
    args = parser.parse_args(argv)

    from medad.data import load_mni152

    template_mask = load_mni152(2)[1]
    rows = pd.concat([case_rows(Path(f), template_mask) for f in args.folders], ignore_index=True)
    print(summary(rows))
    if len(args.folders) == 2:  # paired per case
        a, b = (rows[rows["folder"] == str(Path(f))].set_index("case") for f in args.folders)
        common = a.index.intersection(b.index)
        diff = b.loc[common, "dice_template"] - a.loc[common, "dice_template"]
        print(f"\npaired over {len(common)} cases, Dice(second) - Dice(first): mean {diff.mean():+.4f}, "
              f"min {diff.min():+.4f}, max {diff.max():+.4f}; second better in {(diff > 0).sum()}")
    if args.csv:
        from medad.io.atomic import atomic_write

        with atomic_write(args.csv, "w") as handle:
            rows.to_csv(handle, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
