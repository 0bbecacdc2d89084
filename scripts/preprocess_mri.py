#!/usr/bin/env python
"""Preprocess a cohort of T1 brain MRI volumes (reorient, N4, skull strip, register to MNI152, normalise).

Example::

    python scripts/preprocess_mri.py --input /data/ixi_t1_2mm --output /data/ixi_preprocessed \
        --skull-strip deepbet --registration affine --montage /data/ixi_preprocessed/montage.png

See ``medad.preprocess`` for the outputs and options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from medad.preprocess import main
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from medad.preprocess import main

if __name__ == "__main__":
    raise SystemExit(main())
