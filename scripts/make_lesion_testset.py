"""Build synthetic-lesion test sets from healthy, preprocessed volumes (the MRI benchmark of docs/results.md).

For each healthy volume (``medad preprocess`` output: ``images/<case>.nii.gz`` + ``brain_masks/<case>_brain_mask.nii.gz``)
three test cases are written, one folder each, in the layout every MRI bundle reads
(``--test_dir <kind>/images --test_mask_dir <kind>/masks --brain_mask_dir <kind>/brain_masks``):

- ``dark``: 3 spheres of radius 4-6 voxels set to 0.1 (hypointense, CSF-like);
- ``bright``: 3 spheres of radius 4-6 voxels set to 1.0 (hyperintense);
- ``foreign``: 2 DISYRE-type foreign patches (soft random shapes, 24-voxel region, α = 1) cut from the next volume
  of the list (``medad.corruptions.ForeignPatchCorruption``); the mask is where the patch changed the image by
  more than 0.05 inside the brain.

The input files are read only. Seeds are fixed, so a test set is reproducible. Use volumes held out from training::

    python scripts/make_lesion_testset.py --input /data/ixi_pre --output /data/ixi_lesions --cases 32:40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medad.corruptions import ForeignPatchCorruption
from medad.corruptions.spheres import insert_spheres

KINDS = ("dark", "bright", "foreign")


def _case_slice(text: str) -> slice:
    start, _, stop = text.partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


def _save(array: np.ndarray, like: nib.Nifti1Image, path: Path, dtype: type) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), like.affine, like.header), str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="preprocessed cohort (images/ and brain_masks/)")
    parser.add_argument("--output", required=True, help="output folder (one subfolder per lesion kind)")
    parser.add_argument("--cases", default="32:40", help="python slice of the sorted case list (held-out cases)")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)

    root, out = Path(args.input), Path(args.output)
    files = sorted((root / "images").glob("*.nii*"))[_case_slice(args.cases)]
    if len(files) < 2:
        raise SystemExit(f"{root / 'images'}: need at least 2 volumes in --cases {args.cases}, found {len(files)}.")
    generator = torch.Generator().manual_seed(args.seed)
    foreign = ForeignPatchCorruption(patch_size=24, foreground_only=True)
    volumes = []
    for f in files:
        case = f.name.split(".nii")[0]
        image_nii = nib.load(str(f))
        brain_nii = nib.load(str(root / "brain_masks" / f"{case}_brain_mask.nii.gz"))
        volumes.append((case, image_nii, brain_nii))
    for i, (case, image_nii, brain_nii) in enumerate(volumes):
        image = torch.from_numpy(np.asarray(image_nii.dataobj, dtype=np.float32))[None]
        brain = torch.from_numpy(np.asarray(brain_nii.dataobj, dtype=np.float32) > 0.5)[None].to(torch.float32)
        for kind in KINDS:
            if kind == "foreign":
                donor = torch.from_numpy(np.asarray(volumes[(i + 1) % len(volumes)][1].dataobj, dtype=np.float32))[None]
                lesioned = image
                for _ in range(2):
                    lesioned, _ = foreign(lesioned[None], donor[None], 1.0, foreground=brain[None], generator=generator)
                    lesioned = lesioned[0]
                mask = (((lesioned - image).abs() > 0.05) & (brain > 0)).to(torch.float32)
            else:
                lesioned, mask = insert_spheres(image, brain, count=3, kind=kind, generator=generator)
            _save(lesioned[0].numpy(), image_nii, out / kind / "images" / f"{case}.nii.gz", np.float32)
            _save(mask[0].numpy(), image_nii, out / kind / "masks" / f"{case}_mask.nii.gz", np.uint8)
            _save(brain[0].numpy(), brain_nii, out / kind / "brain_masks" / f"{case}_brain_mask.nii.gz", np.uint8)
        print(f"{case}: written ({', '.join(KINDS)})", flush=True)
    print(f"test sets in {out}/{{{','.join(KINDS)}}}", flush=True)


if __name__ == "__main__":
    main()
