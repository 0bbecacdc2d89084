#!/usr/bin/env python
"""Feed the command line every kind of bad input a new user produces and report what it answers.

For each case the script writes a small dataset under ``--work`` (tiny MVTec-layout pictures or NIfTI volumes),
hashes every input file (SHA-256), runs ``python -m medad run ...`` on it in a fresh process, and records the exit
code, the one-sentence error on stderr (or, for inputs that are accepted, the data warnings the run logged) and whether
every input file is byte-identical afterwards. The table goes to stdout as Markdown (docs/results.md)::

    OMP_NUM_THREADS=1 python scripts/bad_inputs.py --work /tmp/bad_inputs

Nothing is downloaded; the FAIR runs use 1 training step at 16², the volume runs the untrained ``zscore`` baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

TINY_FAIR = ["--quick", "true", "--image_size", "16", "--max_steps", "1", "--batch_size", "2", "--monitor_every", "0"]


def _png(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0, mask: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mask:
        array = np.zeros(size, np.uint8)
        array[4:8, 4:8] = 255
    else:
        array = (rng.random((*size, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def _mvtec(root: Path, n_train: int = 6) -> Path:
    for i in range(n_train):
        _png(root / "train" / "good" / f"{i:03d}.png", seed=i)
    _png(root / "test" / "good" / "000.png", seed=100)
    for i in range(2):
        _png(root / "test" / "hole" / f"{i:03d}.png", seed=200 + i)
        _png(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", mask=True)
    return root


def _volume(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = np.random.default_rng(seed).random((12, 14, 10)).astype(np.float32)
    image = nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0]))
    if affine is not None:  # an affine nibabel cannot store as qform goes in the sform only
        image.set_sform(affine, code=1)
        image.set_qform(None, code=0)
    nib.save(image, str(path))
    return path


def _cohort(root: Path, n: int = 4) -> Path:
    for i in range(n):
        _volume(root / "train" / f"h{i}.nii.gz", seed=i)
    _volume(root / "test" / "p0.nii.gz", seed=50)
    mask = np.zeros((12, 14, 10), np.uint8)
    mask[4:7, 4:7, 4:7] = 1
    _volume(root / "masks" / "p0_mask.nii.gz", mask)
    return root


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


# -- the cases: (name, build(root) -> medad run arguments) ------------------------------------------------------
def case_truncated_picture(root: Path) -> list[str]:
    data = _mvtec(root)
    _truncate(data / "train" / "good" / "002.png")
    _truncate(data / "train" / "good" / "004.png")
    return ["--config", "bundles/fair", "--dataset_dir", str(data), *TINY_FAIR]


def case_mask_of_another_size(root: Path) -> list[str]:
    data = _mvtec(root)
    _png(data / "ground_truth" / "hole" / "001_mask.png", size=(20, 16), mask=True)
    return ["--config", "bundles/fair", "--dataset_dir", str(data), *TINY_FAIR]


def case_empty_mask(root: Path) -> list[str]:
    data = _mvtec(root)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "ground_truth" / "hole" / "000_mask.png")
    return ["--config", "bundles/fair", "--dataset_dir", str(data), *TINY_FAIR]


def case_non_square_picture(root: Path) -> list[str]:
    data = _mvtec(root)
    _png(data / "test" / "good" / "000.png", size=(16, 32), seed=100)
    return ["--config", "bundles/fair", "--dataset_dir", str(data), *TINY_FAIR]


def case_missing_folder(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return ["--config", "bundles/fair", "--dataset_dir", str(root / "no_such_folder"), *TINY_FAIR]


def case_nan_voxels(root: Path) -> list[str]:
    data = _cohort(root)
    volume = np.random.default_rng(9).random((12, 14, 10)).astype(np.float32)
    volume[3, 3, 3] = np.nan
    _volume(data / "train" / "h1.nii.gz", volume)
    return ["--config", "bundles/zscore", "--dataset_dir", str(data / "train"), "--test_dir", str(data / "test"),
            "--test_mask_dir", str(data / "masks")]


def case_4d_volume(root: Path) -> list[str]:
    data = _cohort(root)
    _volume(data / "test" / "p0.nii.gz", np.random.default_rng(3).random((12, 14, 10, 3)).astype(np.float32))
    return ["--config", "bundles/zscore", "--dataset_dir", str(data / "train"), "--test_dir", str(data / "test"),
            "--test_mask_dir", str(data / "masks")]


def case_singular_affine(root: Path) -> list[str]:
    data = _cohort(root)
    affine = np.diag([4.0, 4.0, 0.0, 1.0])  # a collapsed axis (pixdim 0): no inverse
    _volume(data / "test" / "p0.nii.gz", affine=affine, seed=50)
    return ["--config", "bundles/zscore", "--dataset_dir", str(data / "train"), "--test_dir", str(data / "test"),
            "--test_mask_dir", str(data / "masks")]


def case_other_run_in_run_dir(root: Path) -> list[str]:
    first, second = _mvtec(root / "a"), _mvtec(root / "b", n_train=5)
    run_dir = root / "run"
    subprocess.run([sys.executable, "-m", "medad", "run", "--config", "bundles/fair", "--dataset_dir", str(first),
                    "--run_dir", str(run_dir), *TINY_FAIR], check=True, capture_output=True)
    return ["--config", "bundles/fair", "--dataset_dir", str(second), "--run_dir", str(run_dir), *TINY_FAIR]


CASES: dict[str, Callable[[Path], list[str]]] = {
    "truncated PNG (2 of 6 training pictures)": case_truncated_picture,
    "ground-truth mask of another size": case_mask_of_another_size,
    "empty mask in a defect folder": case_empty_mask,
    "non-square test picture (16x32)": case_non_square_picture,
    "missing dataset folder": case_missing_folder,
    "NaN voxel in a training volume": case_nan_voxels,
    "4D test volume": case_4d_volume,
    "singular affine in a test volume": case_singular_affine,
    "run_dir holding a run with other data": case_other_run_in_run_dir,
}


def _digests(folder: Path, skip: Path | None = None) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


def _message(done: subprocess.CompletedProcess) -> str:
    """The error sentence (stderr) of a failed run, else the warnings the run logged (stdout), else ''."""
    if done.returncode:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""
    warnings = [line.split(" - WARNING - ", 1)[1] for line in (done.stdout + done.stderr).splitlines()
                if " - WARNING - " in line and "medad.data" in line]
    return "warning: " + " / ".join(warnings) if warnings else "(no message)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="scratch folder (emptied first)")
    parser.add_argument("--cases", nargs="*", default=None, help="names (substrings) of the cases to run")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    repo = Path(__file__).resolve().parents[1]
    print("| bad input | exit code | what the user sees | inputs unchanged (SHA-256) | s |")
    print("|---|---|---|---|---|")
    for name, build in CASES.items():
        if args.cases and not any(c in name for c in args.cases):
            continue
        root = work / build.__name__
        arguments = build(root)
        if "--run_dir" not in arguments:
            arguments += ["--run_dir", str(root / "run")]
        before = _digests(root, skip=root / "run")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "medad", "run", *arguments], cwd=repo, capture_output=True,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        seconds = time.perf_counter() - start
        unchanged = _digests(root, skip=root / "run") == before
        message = _message(done).replace(str(work), "<work>").replace("|", "\\|")
        print(f"| {name} | {done.returncode} | {message} | {'yes' if unchanged else 'NO'} ({len(before)} files) | "
              f"{seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
