"""``medad`` command line: run bundles by folder, verify their metadata, export, preprocess MRI cohorts.

Examples::

    medad run --config bundles/disyre                       # train + evaluate on the embedded demo data
    medad run --config bundles/fair --dataset_dir /data/mvtec_ad --category bottle --quick False
    medad run --config bundles/fair --workflow inference --input_dir /data/new_images
    medad verify_metadata --config bundles/fair
    medad export --config bundles/fair
    medad preprocess --input /data/ixi --output /data/ixi_preprocessed
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def _preprocess(*argv: str) -> None:
    """Preprocess a folder of brain MRI volumes (see ``medad preprocess --help``)."""
    from medad.preprocess import main as preprocess_main

    preprocess_main(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "preprocess":  # argparse-driven, not fire
        _preprocess(*argv[1:])
        return
    import fire

    from medad import bundle

    fire.Fire(
        {"run": bundle.run, "verify_metadata": bundle.verify_metadata, "export": bundle.export},
        command=argv,
        name="medad",
    )


if __name__ == "__main__":
    main()
