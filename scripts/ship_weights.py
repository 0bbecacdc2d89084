#!/usr/bin/env python
"""Make a finished run a bundle's shipped weights (MONAI model-zoo style: ``bundles/<name>/models/``).

Copies ``<run_dir>/models/model.pt`` (weights + calibration) and ``calibration.json`` into ``bundles/<name>/models/``
and writes ``bundles/<name>/run.json``: the run's record with its ``data`` entry (absolute paths of the machine
that trained it) replaced by ``trained_on`` (what the data were, their licence, the training command) and, for MRI,
by the training volumes' brain geometry (``data.brain_geometry``: volume and extent ranges), so that
``inference`` rebuilds the network from it and ``evaluate --run_dir bundles/<name>`` works on any machine::

    python scripts/ship_weights.py --run_dir runs/fair/bottle-1234abcd --bundle fair \\
        --data "MVTec AD bottle, train/good (209 images)" --licence "CC BY-NC-SA 4.0 (MVTec Software GmbH)" \\
        --command "medad run --config bundles/fair --dataset_dir .../bottle --quick true --image_size 128 ..."

The training checkpoint (optimiser state) is not shipped: only what inference needs. Refuses files over 20 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MAX_BYTES = 20 * 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="finished run folder (run.json + models/model.pt)")
    parser.add_argument("--bundle", required=True, help="bundle name (bundles/<name>)")
    parser.add_argument("--data", required=True, help="what the training data were (one line)")
    parser.add_argument("--licence", required=True, help="licence of the training data")
    parser.add_argument("--command", required=True, help="the training command")
    parser.add_argument("--notes", default="", help="anything else a user should know (steps, CPU time, ...)")
    args = parser.parse_args(argv)

    run_dir, target = Path(args.run_dir), REPO / "bundles" / args.bundle
    record = json.loads((run_dir / "run.json").read_text())
    if record.get("bundle") != args.bundle:
        print(f"ship_weights: {run_dir} is a run of bundle {record.get('bundle')!r}, not {args.bundle!r}.",
              file=sys.stderr)
        return 2
    model = run_dir / "models" / "model.pt"
    if model.stat().st_size > MAX_BYTES:
        print(f"ship_weights: {model} has {model.stat().st_size / 2**20:.1f} MB, over the 20 MB limit.",
              file=sys.stderr)
        return 2
    (target / "models").mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "calibration.json"):
        if (run_dir / "models" / name).is_file():
            shutil.copy2(run_dir / "models" / name, target / "models" / name)
    data = record.pop("data", None) or {}
    if record.get("settings", {}).get("data") == "mri" and data.get("dataset_dir"):
        # the training volumes' brain size and extent travel with the weights: evaluation and inference warn about
        # a volume outside them (not preprocessed into the training space) on machines without those volumes
        from medad.data import nifti_datalist
        from medad.transforms.mri import brain_geometry_range

        items = nifti_datalist(data["dataset_dir"], brain_mask_dir=data.get("brain_mask_dir"))
        record["data"] = {"brain_geometry": brain_geometry_range(items)}
    record["trained_on"] = {"data": args.data, "licence": args.licence, "command": args.command,
                            "notes": args.notes}
    (target / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"shipped {model} -> {target / 'models' / 'model.pt'} ({model.stat().st_size / 2**20:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
