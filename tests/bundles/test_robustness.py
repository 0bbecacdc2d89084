"""Bad input gives one clear error naming the file; inputs are never modified; outputs are atomic; a killed
training resumes; DICOM input leaves no patient identifier in outputs or logs."""

from __future__ import annotations

import gzip
import hashlib
import logging
import multiprocessing
import runpy
import signal
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from PIL import Image

from medad.data import (
    InvalidInputError,
    clear_input_errors,
    image_transforms,
    mvtec_datalist,
    nifti_datalist,
    volume_transforms,
)
from medad.engine import (
    AnomalyEvaluator,
    CheckpointMismatchError,
    load_checkpoint,
    load_network_weights,
    save_checkpoint,
)
from medad.engine.builders import image_folder_loader
from tests.helpers import signal_when_ready

REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, np.eye(4))
    if affine is not None:
        image.set_sform(affine, code=1)
        image.set_qform(None, code=0)
    nib.save(image, path)
    return path


def _singular_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[2, 2] = 0.0  # a collapsed axis (pixdim 0): nibabel cannot build it as qform, so it goes in the sform
    return affine


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _rgb(seed: int = 0, size: int = 12) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _load_all(items: list[dict], transform, num_workers: int = 0) -> None:
    for _ in clear_input_errors(DataLoader(Dataset(items, transform), batch_size=1, num_workers=num_workers)):
        pass


def _bad_inputs(root: Path) -> dict[str, tuple[dict, str, str]]:
    """name -> (datalist item, 2d|3d, expected message fragment); the item's offending file is ``item["bad"]``."""
    volume = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    nan = volume.copy()
    nan[1, 2, 3], nan[0, 0, 0] = np.nan, np.inf
    cases = {
        "truncated_nifti": ({"image": str(_truncate(_nifti(root / "t.nii.gz", volume)))}, "3d", "not a readable image file"),
        "4d_nifti": ({"image": str(_nifti(root / "f.nii.gz", np.stack([volume] * 3, -1)))}, "3d", "4D series of 3 volumes"),
        "nan_nifti": ({"image": str(_nifti(root / "n.nii.gz", nan))}, "3d", "2 voxel(s) are NaN or infinite"),
        "2d_nifti": ({"image": str(_nifti(root / "s.nii.gz", volume[..., 0]))}, "3d", "expected a 3D volume"),
        "truncated_png": ({"image": str(_truncate(_png(root / "t.png", _rgb())))}, "2d", "not a readable image file"),
        "not_a_png": ({"image": str(root / "x.png")}, "2d", "not a readable image file"),
        "mismatched_mask": ({"image": str(_png(root / "a.png", _rgb())),
                             "mask": str(_png(root / "a_mask.png", np.zeros((12, 9), np.uint8))), "label": 1},
                            "2d", "has size (12, 9) but its image has size (12, 12)"),
        "singular_affine": ({"image": str(_nifti(root / "z.nii.gz", volume, _singular_affine()))}, "3d",
                            "the affine (voxel-to-world matrix) is singular"),
        "mismatched_volume_mask": ({"image": str(_nifti(root / "v.nii.gz", volume)),
                                    "mask": str(_nifti(root / "v_mask.nii.gz", np.ones((6, 5, 3), np.float32))),
                                    "label": 1}, "3d", "has size (6, 5, 3) but its image has size (6, 5, 4)"),
    }
    (root / "x.png").write_bytes(b"this is not an image")
    for name in ("truncated_nifti", "4d_nifti", "nan_nifti", "2d_nifti", "truncated_png", "not_a_png", "singular_affine"):
        cases[name][0]["bad"] = cases[name][0]["image"]
    for name in ("mismatched_mask", "mismatched_volume_mask"):
        cases[name][0]["bad"] = cases[name][0]["mask"]
    return cases


BAD = ["truncated_nifti", "4d_nifti", "nan_nifti", "2d_nifti", "truncated_png", "not_a_png", "mismatched_mask",
       "singular_affine", "mismatched_volume_mask"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gives_one_clear_error_naming_the_file(tmp_path: Path, name: str):
    item, kind, fragment = _bad_inputs(tmp_path)[name]
    bad = item.pop("bad")
    item = {"mask": None, "label": 0, **item}
    transform = image_transforms(8, channels=3) if kind == "2d" else volume_transforms(intensity=None)
    if kind == "3d":
        item.setdefault("brain_mask", None)
    with pytest.raises(InvalidInputError) as error:
        _load_all([item], transform)
    message = str(error.value)
    assert bad in message and fragment in message and "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no MONAI wrapping shown


def test_clear_error_survives_a_dataloader_worker(tmp_path: Path):
    bad = _truncate(_png(tmp_path / "t.png", _rgb()))
    with pytest.raises(InvalidInputError, match=f"^{bad}: not a readable image file"):
        _load_all([{"image": str(bad), "mask": None}], image_transforms(8), num_workers=1)


def test_16_bit_and_gray_pngs_are_scaled_by_their_own_range(tmp_path: Path):
    wide = np.full((6, 6), 65535, np.uint16)
    wide[:3] = 32768
    gray = np.full((6, 6), 51, np.uint8)
    items = [{"image": str(_png(tmp_path / "w.png", wide)), "mask": None},
             {"image": str(_png(tmp_path / "g.png", gray)), "mask": None}]
    loaded = [image_transforms(6, channels=3)(item)["image"] for item in items]
    assert loaded[0].shape == (3, 6, 6) and torch.allclose(loaded[0][:, :3], torch.tensor(32768 / 65535))
    assert torch.allclose(loaded[0][:, 3:], torch.tensor(1.0))
    assert torch.allclose(image_transforms(6, channels=1)(items[1])["image"], torch.tensor(0.2))


def test_folders_without_images_are_named(tmp_path: Path):
    empty = tmp_path / "empty"
    (empty / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{empty}: no images found"):
        image_folder_loader(empty)
    with pytest.raises(FileNotFoundError, match="no images found"):
        mvtec_datalist(empty, split="train")
    with pytest.raises(FileNotFoundError, match=f"no images found in {empty}"):
        nifti_datalist(empty)


def test_checkpoint_of_another_bundle_is_refused(tmp_path: Path):
    network = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "model.pt", {"bundle": "fair", "network": network.state_dict()}) or tmp_path / "model.pt"
    with pytest.raises(CheckpointMismatchError, match=f"{path}: this checkpoint was trained by bundle 'fair'"):
        load_network_weights(network, path, bundle="ddpm_partial")
    with pytest.raises(CheckpointMismatchError, match="do not fit this network"):
        load_network_weights(torch.nn.Linear(4, 2), path, bundle="fair")
    _truncate(path)
    with pytest.raises(ValueError, match=f"{path}: not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})

    def dies_half_way(state, name):
        Path(name).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is interrupted in the middle of writing

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _identity_inferer(images: torch.Tensor, network) -> dict[str, torch.Tensor]:
    return {"anomaly_map": images.mean(1, keepdim=True), "restoration": images.clone()}


def _max_score(maps: torch.Tensor) -> torch.Tensor:
    return maps.flatten(1).amax(1)


def _evaluate(loader, out: Path) -> dict:
    return AnomalyEvaluator(torch.nn.Identity(), _identity_inferer, loader, out, _max_score, num_overlays=1,
                            progress=False).run()


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_inputs_are_never_modified_and_bad_files_stop_the_run(tmp_path: Path):
    inputs = tmp_path / "inputs"
    for i in range(3):
        _png(inputs / "pictures" / f"{i}.png", _rgb(i))
    volume = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    _nifti(inputs / "volumes" / "c1.nii.gz", volume, np.diag([-1.0, 1.0, 2.0, 1.0]))
    before = _digests(inputs)
    _evaluate(image_folder_loader(inputs / "pictures", image_size=8), tmp_path / "out2d")
    items = nifti_datalist(inputs / "volumes")
    _evaluate(DataLoader(Dataset(items, volume_transforms(intensity=None)), batch_size=1), tmp_path / "out3d")
    assert _digests(inputs) == before
    import nrrd

    heat, _ = nrrd.read(str(tmp_path / "out2d" / "maps" / "0_anomaly_map.nrrd"))
    assert heat.shape == (12, 12, 1)  # the picture's size, not the model's 8 x 8
    assert (tmp_path / "out2d" / "cases.csv").is_file() and (tmp_path / "out3d" / "maps" / "c1_anomaly_map.nii.gz").is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]

    bad = _truncate(inputs / "pictures" / "1.png")
    with pytest.raises(InvalidInputError, match=f"^{bad}: not a readable image file"):
        _evaluate(image_folder_loader(inputs / "pictures", image_size=8), tmp_path / "bad_run")
    assert not (tmp_path / "bad_run" / "cases.csv").exists()  # no partial results from a bad input


RESUME_SCRIPT = textwrap.dedent('''
    import sys, time
    import torch
    from medad.engine import Trainer

    max_steps, pause, ckpt = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    network = torch.nn.Linear(4, 1)
    batches = [{"x": torch.randn(2, 4), "y": torch.randn(2, 1)} for _ in range(5)]
    calls = []

    def step(network, batch):
        calls.append(1)
        time.sleep(pause)
        return {"loss": ((network(batch["x"]) - batch["y"]) ** 2).mean()}

    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    trainer = Trainer(network, optimizer, batches, step, max_steps=max_steps, checkpoint_path=ckpt,
                      checkpoint_every=1, progress=False)
    summary = trainer.run()
    print("steps", summary["steps"], "calls", len(calls), flush=True)
''')


def _run_script(script: str, argv: list[str]) -> None:
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def test_training_resumes_after_being_killed(tmp_path: Path, monkeypatch, capsys):
    script, ckpt = tmp_path / "train.py", tmp_path / "models" / "checkpoint.pt"
    script.write_text(RESUME_SCRIPT)
    # a forked child process (no second interpreter start-up), killed without warning once it has checkpoints
    process = multiprocessing.get_context("fork").Process(
        target=_run_script, args=(str(script), ["100000", "0.02", str(ckpt)]), daemon=True
    )
    signal_when_ready(process, lambda: ckpt.is_file() and load_checkpoint(ckpt)["step"] >= 3, signal.SIGKILL,
                      timeout=120, poll=0.1)
    assert process.exitcode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt)["step"]  # the last complete checkpoint (atomic writes)
    assert killed_at >= 3
    # the rerun, in this process (the same script, 2 more steps)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    capsys.readouterr()
    _run_script(str(script), [str(killed_at + 2), "0", str(ckpt)])
    assert f"steps {killed_at + 2} calls 2" in capsys.readouterr().out  # continued from the checkpoint
    assert load_checkpoint(ckpt)["step"] == killed_at + 2
    assert not list(ckpt.parent.glob("*.tmp"))


PATIENT = {"0010|0010": "Doe^Jane", "0010|0020": "PHI-12345", "0010|0030": "19700101",
           "0008|0080": "St Example Hospital"}


def _write_dicom_series(folder: Path, volume_zyx: np.ndarray, spacing=(0.8, 0.9, 2.5)) -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 15.0, 7.5))
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.42"
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in {**PATIENT, "0008|0060": "MR", "0020|000d": uid + ".1", "0020|000e": uid + ".2",
                           "0020|0037": "\\".join(str(v) for v in (*direction[0:7:3], *direction[1:8:3])),
                           "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                           "0020|0013": str(k + 1), "0008|0018": f"{uid}.3.{k + 1}"}.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_input_keeps_no_patient_identifier(tmp_path: Path, caplog, capfd):
    from medad.data import read_dicom_series
    from medad.io import dicom_to_nifti

    caplog.set_level(logging.DEBUG)
    volume_zyx = np.random.default_rng(0).integers(0, 1000, size=(5, 7, 6))
    series = tmp_path / "dicom" / "case001"
    _write_dicom_series(series, volume_zyx)
    voxels, affine = read_dicom_series(series)
    np.testing.assert_array_equal(voxels, volume_zyx.transpose(2, 1, 0))
    np.testing.assert_allclose(np.abs(np.diag(affine))[:3], (0.8, 0.9, 2.5), atol=1e-4)

    out = tmp_path / "out"
    dicom_to_nifti(series, out / "case001.nii.gz")
    item = {"image": str(series), "mask": None, "brain_mask": None, "case_id": "case001", "label": 0}
    loader = DataLoader(Dataset([item], volume_transforms(intensity=None)), batch_size=1)
    _evaluate(loader, out / "eval")
    written = nib.load(out / "eval" / "maps" / "case001_anomaly_map.nii.gz")
    assert written.shape == voxels.shape and np.allclose(written.affine, affine, atol=1e-4)  # the series' grid

    texts = [caplog.text.encode(), "".join(capfd.readouterr()).encode()]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            texts.append(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    for identifier in PATIENT.values():
        assert not any(identifier.encode() in text for text in texts), identifier


def test_every_bad_file_of_a_dataset_is_named_in_one_error(tmp_path: Path):
    for i in range(4):
        _png(tmp_path / "pictures" / f"{i}.png", _rgb(i))
    bad = [_truncate(tmp_path / "pictures" / f"{i}.png") for i in (0, 2, 3)]
    with pytest.raises(InvalidInputError) as error:
        image_folder_loader(tmp_path / "pictures", image_size=8)
    message = str(error.value)
    assert message.startswith("3 input files cannot be used") and "\n" not in message
    assert all(f"{path}: not a readable image file" in message for path in bad)


def test_a_singular_affine_is_refused_before_training_or_any_output(tmp_path: Path):
    volume = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    good = _nifti(tmp_path / "in" / "a.nii.gz", volume)
    bad = _nifti(tmp_path / "in" / "b.nii.gz", volume, _singular_affine())
    before = _digests(tmp_path / "in")
    with pytest.raises(InvalidInputError, match=f"^{bad}: the affine .* is singular"):
        nifti_datalist(tmp_path / "in")  # training and test datalists alike
    items = nifti_datalist(tmp_path / "in", check=False)
    loader = DataLoader(Dataset(items, volume_transforms(intensity=None)), batch_size=1)
    with pytest.raises(InvalidInputError, match=f"^{bad}: the affine"):
        _evaluate(loader, tmp_path / "out")
    assert not (tmp_path / "out").exists() and str(good) != str(bad)  # nothing written, not even the first case
    assert _digests(tmp_path / "in") == before


def test_an_empty_mask_keeps_its_case_anomalous_with_one_warning(tmp_path: Path, caplog):
    root = tmp_path / "widget"
    _png(root / "test" / "good" / "000.png", _rgb(0))
    for i in range(2):
        _png(root / "test" / "hole" / f"{i:03d}.png", _rgb(i + 1))
        _png(root / "ground_truth" / "hole" / f"{i:03d}_mask.png", np.zeros((12, 12), np.uint8))
    items = mvtec_datalist(root, split="test")
    from medad.data import check_files

    with caplog.at_level(logging.WARNING, logger="medad.data"):
        check_files(items)
        loaded = [image_transforms(8)(item) for item in items]
    warnings = [r.getMessage() for r in caplog.records if "are empty" in r.getMessage()]
    assert len(warnings) == 1 and all(item["mask"] in warnings[0] for item in items if item["label"] == 1)
    assert [int(item["label"]) for item in loaded] == [0, 1, 1] and not any(item["mask"].any() for item in loaded)


def test_a_picture_of_another_aspect_ratio_warns_once(tmp_path: Path, caplog):
    _png(tmp_path / "p" / "wide.png", (np.random.default_rng(0).random((10, 20, 3)) * 255).astype(np.uint8))
    _png(tmp_path / "p" / "square.png", _rgb())
    with caplog.at_level(logging.WARNING, logger="medad.data"):
        image_folder_loader(tmp_path / "p", image_size=8)
    warnings = [r.getMessage() for r in caplog.records if "aspect ratio" in r.getMessage()]
    assert len(warnings) == 1 and "1 picture(s)" in warnings[0] and "wide.png, 10x20 px" in warnings[0]
