#!/usr/bin/env python
"""Put more images of a preprocessed case into the template space with that case's own transforms.

``medad preprocess`` registers one sequence (T1) per case to MNI152 and keeps the transforms
(``<output>/transforms/<case>/registration.json``). Other sequences of the same session that are already
co-registered with it (FLAIR, T2, a lesion mask: same scanner space, any grid) go to exactly the same template
grid with this script, so test volumes and their masks lie where the training volumes lie::

    medad preprocess --input /data/ms/t1 --output /data/ms_pre
    python scripts/map_to_template.py --record /data/ms_pre/transforms/patient26_T1 \\
        --input /data/ms/patient26/FLAIR.nii.gz --output /data/ms_test/flair/patient26.nii.gz
    python scripts/map_to_template.py --record /data/ms_pre/transforms/patient26_T1 --label \\
        --input /data/ms/patient26/lesions.nii.gz --output /data/ms_test/masks/patient26_mask.nii.gz

Images are resampled linearly, labels (``--label``) by nearest neighbour and written as uint8. The input files
are only read; the output is written atomically. Intensities are not rescaled: the bundles' loaders scale them
(``--intensity percentile``), and the ``intensity`` baseline z-scores each volume inside the brain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", required=True, help="the case's transforms folder (or its registration.json)")
    parser.add_argument("--input", required=True, help="NIfTI image co-registered with the preprocessed sequence")
    parser.add_argument("--output", required=True, help="NIfTI file to write on the template grid")
    parser.add_argument("--label", action="store_true", help="a label map: nearest neighbour, uint8")
    args = parser.parse_args(argv)

    from medad.transforms.mri import apply_forward_transform, save_volume

    if Path(args.output).resolve() == Path(args.input).resolve():
        parser.error("--output must differ from --input (inputs are never modified)")
    try:
        volume = apply_forward_transform(args.input, args.record,
                                         interpolator="nearestNeighbor" if args.label else "linear")
    except ValueError as exc:
        print(f"map_to_template: {exc}", file=sys.stderr)
        return 2
    dtype = np.uint8 if args.label else np.float32
    if args.label:
        volume = volume.round()
    path = save_volume(volume, args.output, dtype=dtype)
    count = int(np.count_nonzero(np.asarray(volume))) if args.label else None
    print(f"wrote {path}" + (f" ({count} labelled voxels)" if count is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
