"""A cohort spread over machines: ``--shard K/N`` for ``medad preprocess`` and for inference / evaluation.

Shard ``K`` of ``N`` (1-based, e.g. ``$SLURM_ARRAY_TASK_ID/N`` in a SLURM array ``--array=1-N``) takes the ``K``-th of
``N`` contiguous, nearly equal blocks of the sorted case list (of whole batches, for inference), so the split
depends only on the inputs and the same command always gives a shard the same cases. Every shard is resumable like
an unsharded run (finished cases are skipped) and writes where no other shard writes:

- ``medad preprocess``: the per-case outputs as usual (one file set per case) and its own log,
  ``preprocess_log.shard-K-of-N.csv``, with ``shards/preprocess-K-of-N.json`` once it has finished;
- inference / evaluation: maps and overlays into ``<output_dir>/maps`` and ``overlays`` as usual (one file set per
  case), its case store, tables and metrics into ``<output_dir>/shards/K-of-N/``, with ``shard.json`` once finished.

The merge (:func:`merge_shards`) runs by itself when the last shard finishes, and by hand with
``medad cohort merge-shards OUT_DIR`` (e.g. as a SLURM job depending on the array): it writes the cohort's
``preprocess_log.csv``, or ``cases.csv`` / ``cases.parquet`` / ``metrics.json`` / ``report.html`` over all cases, the
same as one unsharded run would (up to the run times).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medad.overrides import OverrideError

__all__ = [
    "SHARDS_DIR",
    "parse_shard",
    "shard_name",
    "shard_range",
    "evaluation_shard_dir",
    "write_shard_record",
    "evaluation_shards_done",
    "merge_evaluation_shards",
    "preprocess_shard_log",
    "merge_preprocess_logs",
    "merge_shards",
]

logger = logging.getLogger("medad.shards")

#: folder (inside an output folder) of the shards' own outputs and records
SHARDS_DIR = "shards"
_RECORD = "shard.json"
_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def parse_shard(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"K/N"`` (1 <= K <= N) -> ``(K, N)``; None stays None.

    Raises:
        OverrideError: (a ``ValueError``; exit code 2 on the command line) not of that form.
    """
    if text is None or text == "":
        return None
    if isinstance(text, (tuple, list)) and len(text) == 2:
        k, n = (int(v) for v in text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if match is None:
            raise OverrideError(f"--shard takes K/N (shard K of N, 1 <= K <= N, e.g. 1/4), not {text!r}.")
        k, n = int(match.group(1)), int(match.group(2))
    if not 1 <= k <= n:
        raise OverrideError(f"--shard {k}/{n}: K must lie between 1 and N.")
    return k, n


def shard_name(k: int, n: int) -> str:
    """``K-of-N``, the name of a shard's files and folders."""
    return f"{k}-of-{n}"


def shard_range(count: int, k: int, n: int) -> range:
    """Indices of shard ``k`` of ``n`` among ``count`` ordered items: the k-th of n contiguous blocks whose sizes
    differ by at most one (the first ``count % n`` blocks are one longer), as :func:`numpy.array_split`."""
    size, extra = divmod(int(count), int(n))
    start = (k - 1) * size + min(k - 1, extra)
    return range(start, start + size + (1 if k <= extra else 0))


# -- inference / evaluation ----------------------------------------------------------------------------------
def evaluation_shard_dir(output_dir: str | os.PathLike, k: int, n: int) -> Path:
    """Where shard ``k`` of ``n`` keeps its case store, tables and metrics."""
    return Path(output_dir) / SHARDS_DIR / shard_name(k, n)


def write_shard_record(folder: str | os.PathLike, k: int, n: int, record: dict[str, Any]) -> Path:
    """``shard.json``: the shard has finished (``k``, ``n``, its case ids in order and what the merge needs)."""
    from medad.io import write_json

    return write_json(Path(folder) / _RECORD, {"shard": k, "num_shards": n, **record})


def _evaluation_records(output_dir: Path) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """``(N, {K: shard.json content})`` of the finished evaluation shards under ``output_dir``."""
    found: dict[int, dict[str, Any]] = {}
    counts = set()
    for folder in sorted((output_dir / SHARDS_DIR).glob("*-of-*")):
        match = _NAME.match(folder.name)
        if match is None or not (folder / _RECORD).is_file():
            continue
        counts.add(int(match.group(2)))
        record = json.loads((folder / _RECORD).read_text())
        record["folder"] = str(folder)
        found[int(match.group(1))] = record
    if len(counts) > 1:
        raise ValueError(f"{output_dir / SHARDS_DIR}: holds shards of different splits ({sorted(counts)} shards); "
                         "remove the folders of the old split.")
    return (counts.pop() if counts else None), found


def evaluation_shards_done(output_dir: str | os.PathLike) -> bool:
    """True when every shard of the split under ``output_dir`` has finished."""
    n, found = _evaluation_records(Path(output_dir))
    return n is not None and set(found) == set(range(1, n + 1))


def merge_evaluation_shards(output_dir: str | os.PathLike) -> Path:
    """Tables, metrics and report over every case of the finished shards, at the top of ``output_dir``.

    Raises:
        ValueError: a shard has not finished, or the shards were made with different weights or settings.
    """
    from medad import io

    from .evaluator import AnomalyEvaluator, _CaseStore, _table_records, _timing

    output_dir = Path(output_dir)
    n, found = _evaluation_records(output_dir)
    if n is None:
        raise ValueError(f"{output_dir}: no finished shard here (expected {SHARDS_DIR}/K-of-N/{_RECORD}).")
    missing = sorted(set(range(1, n + 1)) - set(found))
    if missing:
        raise ValueError(f"{output_dir}: shard(s) {', '.join(shard_name(k, n) for k in missing)} have not finished; "
                         "run them (the same command with --shard K/N) before merging.")
    signatures = {found[k]["signature"] for k in found}
    if len(signatures) > 1:
        raise ValueError(f"{output_dir}: the shards were made with different weights or settings; rerun them alike.")
    first = found[1]
    cases: dict[str, Any] = {key: [] for key in ("case_id", "map", "mask", "region", "label", "score", "seconds")}
    records, items, calls = [], [], []
    for k in range(1, n + 1):
        folder = Path(found[k]["folder"])
        store = _CaseStore(folder / "case_data", found[k]["signature"], resume=True)
        part = store.load(found[k]["case_ids"])
        for key in cases:
            cases[key] += part[key]
        for case_id in found[k]["case_ids"]:
            records.append(store.records[case_id])
            items.append(store.records[case_id]["network_items"])
            calls.append(store.records[case_id]["network_calls"])
    cases["timing"] = _timing(cases["seconds"], items, calls)
    merger = AnomalyEvaluator(network=None, inferer=None, test_loader=[], output_dir=output_dir, image_score=None,
                              region_key=first.get("region_key"), fpr_limit=float(first.get("fpr_limit", 0.3)),
                              progress=False)
    merger.calibration = first.get("calibration")
    result = merger._metrics(cases)
    if first.get("baselines_note"):  # why the shards measured no baselines
        result["baselines_note"] = first["baselines_note"]
    result["num_shards"] = n
    table = io.case_table(_table_records(records))
    io.write_tables(table, output_dir, stem="cases")
    labels = [label for label in cases["label"] if label is not None]
    if len(labels) == len(cases["score"]) and len(set(labels)) == 2:
        io.save_roc_pr_curves(cases["score"], labels, output_dir / "image")
    io.write_json(output_dir / "metrics.json", result)
    merger._write_report(result, table)
    logger.info("merged %d shards (%d cases) into %s", n, len(records), output_dir)
    return output_dir


# -- preprocessing -------------------------------------------------------------------------------------------
def preprocess_shard_log(output_dir: str | os.PathLike, k: int, n: int) -> Path:
    """The log of preprocessing shard ``k`` of ``n``."""
    return Path(output_dir) / f"preprocess_log.shard-{shard_name(k, n)}.csv"


def _preprocess_records(output_dir: Path) -> tuple[int | None, dict[int, Path]]:
    found: dict[int, Path] = {}
    counts = set()
    for marker in sorted((output_dir / SHARDS_DIR).glob("preprocess-*-of-*.json")):
        match = _NAME.match(marker.stem[len("preprocess-"):])
        if match is None:
            continue
        counts.add(int(match.group(2)))
        found[int(match.group(1))] = marker
    if len(counts) > 1:
        raise ValueError(f"{output_dir / SHARDS_DIR}: holds preprocessing shards of different splits "
                         f"({sorted(counts)} shards); remove the markers of the old split.")
    return (counts.pop() if counts else None), found


def merge_preprocess_logs(output_dir: str | os.PathLike, require_all: bool = True) -> Path | None:
    """``preprocess_log.csv`` from the shards' logs (rows of other cases already in it are kept).

    Returns None when not every shard has finished and ``require_all`` is False.

    Raises:
        ValueError: a shard has not finished (with ``require_all``).
    """
    import pandas as pd

    from medad.preprocess import LOG_COLUMNS, LOG_NAME, _read_log, _write_log

    output_dir = Path(output_dir)
    n, found = _preprocess_records(output_dir)
    if n is None:
        if require_all:
            raise ValueError(f"{output_dir}: no finished preprocessing shard here ({SHARDS_DIR}/preprocess-K-of-N.json).")
        return None
    missing = sorted(set(range(1, n + 1)) - set(found))
    if missing:
        if not require_all:
            return None
        raise ValueError(f"{output_dir}: preprocessing shard(s) {', '.join(shard_name(k, n) for k in missing)} have "
                         "not finished; run them (the same command with --shard K/N) before merging.")
    frames = [_read_log(preprocess_shard_log(output_dir, k, n)) for k in range(1, n + 1)]
    rows = pd.concat([f.reindex(columns=list(LOG_COLUMNS)) for f in frames], ignore_index=True)
    path = output_dir / LOG_NAME
    _write_log(rows.to_dict("records"), _read_log(path), path)  # rows of other cases already in it are kept
    logger.info("merged %d preprocessing shard logs into %s", n, path)
    return path


def merge_shards(output_dir: str | os.PathLike) -> list[Path]:
    """Merge whatever finished shards ``output_dir`` holds (evaluation and/or preprocessing); the written files.

    Raises:
        ValueError: there are no shards, or not all of a split have finished.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir}: no such folder; give the --output_dir of the sharded runs.")
    written = []
    if _evaluation_records(output_dir)[0] is not None:
        merge_evaluation_shards(output_dir)
        written += [output_dir / "cases.csv", output_dir / "metrics.json"]
    if _preprocess_records(output_dir)[0] is not None:
        written.append(merge_preprocess_logs(output_dir))
    if not written:
        raise ValueError(f"{output_dir}: no finished shards to merge (looked for {SHARDS_DIR}/K-of-N/{_RECORD} and "
                         f"{SHARDS_DIR}/preprocess-K-of-N.json).")
    return written
