"""Embedded default data: synthetic inspection images (MVTec AD layout) and synthetic brain MRI.

Nothing is downloaded. Both generators are deterministic given their parameters (every image or
subject draws from its own ``numpy`` generator seeded by ``(seed, split, index)``), write into a
temporary folder that is renamed into place when complete, and skip the work when the folder
already holds a complete set made with the same parameters (marker file ``.medad_demo.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from medad.data.templates import load_mni152

logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_DEFECTS",
    "MARKER_NAME",
    "demo_root",
    "make_demo_mvtec",
    "make_demo_mri",
]

MARKER_NAME = ".medad_demo.json"
DEMO_DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "missing_part")
_FORMAT_VERSION = 1  # bump when a generator changes, so stale caches are rebuilt


def _params_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def demo_root(kind: str, **params) -> Path:
    """Default folder of a demo data set: ``<base>/demo/<kind>_<hash of params>``.

    ``<base>`` is ``$MEDAD_DATA_DIR`` when set, else ``$XDG_CACHE_HOME/medad`` (``~/.cache/medad``).
    """
    base = os.environ.get("MEDAD_DATA_DIR")
    if base:
        root = Path(base).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "medad"
    return root / "demo" / f"{kind}_{_params_hash({'version': _FORMAT_VERSION, **params})}"


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _generate_once(dest: Path, params: dict, write: Callable[[Path], int]) -> Path:
    """Run ``write(tmp_folder)`` unless ``dest`` is already complete for ``params``; rename into place."""
    marker = {"version": _FORMAT_VERSION, "params": params}
    existing = _read_marker(dest)
    if existing is not None and {k: existing.get(k) for k in marker} == marker:
        return dest
    if dest.exists():
        if existing is None and any(dest.iterdir()):
            raise FileExistsError(
                f"{dest} exists and is not a medad demo folder; choose another out_dir or empty it."
            )
        made_with = (existing or {}).get("params") or {}
        if existing is not None and made_with != params:
            # a run pointed at a demo folder made with other settings (e.g. --demo_dir without the --demo_kwargs
            # that made it) would otherwise score other data than the folder held, without a word
            changed = ", ".join(f"{k}: {made_with.get(k)} -> {v}" for k, v in params.items() if made_with.get(k) != v)
            logger.warning("%s: replacing the demo data made with other settings (%s) by new demo data.", dest, changed)
        shutil.rmtree(dest)  # ours, made with other parameters or an older format (or empty)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        count = write(tmp)
        (tmp / MARKER_NAME).write_text(json.dumps({**marker, "files": count}, indent=1, sort_keys=True))
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process (e.g. a second DDP rank) finished first: keep its copy if complete.
            if _read_marker(dest) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------
# Industrial images
# --------------------------------------------------------------------------------------------


def _texture(rng: np.random.Generator, size: int, base: np.ndarray, contrast: float) -> np.ndarray:
    """A woven, periodic RGB texture ``(H, W, 3)``: random phase (shift), fixed periods and colours.

    The normal variation (phase, ±2 % colour, pixel noise) is what a small model must learn.
    """
    period = size / 8.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = rng.uniform(0, 2 * period, size=2)
    y, x = (yy + dy) * 2 * np.pi / period, (xx + dx) * 2 * np.pi / period
    weave = 0.6 * np.sin(x) * np.sin(y) + 0.4 * np.sin((x + y) / 2)
    colour = base + rng.normal(0, 0.02, size=3)
    image = colour[None, None, :] + contrast * weave[..., None] * np.array([1.0, 0.9, 0.8])
    return image + rng.normal(0, 0.01, size=image.shape)


def _normal_image(rng: np.random.Generator, size: int, pattern: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Return a normal image ``(H, W, 3)`` in [0, 1] and, for objects, the boolean object mask."""
    if pattern == "texture":
        return np.clip(_texture(rng, size, np.array([0.62, 0.48, 0.32]), 0.16), 0, 1), None
    # "object": a shaded disc (with a darker ring) on a faint texture, shifted by a few pixels.
    image = _texture(rng, size, np.array([0.35, 0.35, 0.38]), 0.04)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-size / 32, size / 32, size=2)
    radius = size * 0.32 * (1 + rng.uniform(-0.02, 0.02))
    r = np.hypot(yy - cy, xx - cx) / radius
    disc = r <= 1.0
    shade = 0.85 - 0.25 * r**2 - 0.2 * np.exp(-(((r - 0.7) / 0.06) ** 2))
    body = np.array([0.35, 0.55, 0.85]) + rng.normal(0, 0.02, size=3)
    image = np.where(disc[..., None], shade[..., None] * body[None, None, :] + rng.normal(0, 0.01, image.shape), image)
    return np.clip(image, 0, 1), disc


def _scratch(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, ImageDraw

    size = image.shape[0]
    angle, length = rng.uniform(0, np.pi), rng.uniform(0.3, 0.6) * size
    half = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    p0, p2 = centre - half, centre + half
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * size, size=2)
    s = np.linspace(0, 1, 32)[:, None]
    curve = (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s**2 * p2  # quadratic Bezier
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in curve], fill=255, width=max(1, size // 40))
    mask = np.asarray(canvas) > 0
    value = 0.95 if rng.random() < 0.5 else 0.05
    image = image.copy()
    image[mask] = 0.15 * image[mask] + 0.85 * value
    return image, mask


def _ellipse(rng: np.random.Generator, size: int, low: float, high: float, centre: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = centre
    a, b = rng.uniform(low * size, high * size, size=2)
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _hole(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse(rng, image.shape[0], 0.05, 0.11, centre)
    image = image.copy()
    image[mask] = rng.uniform(0.03, 0.1) + rng.normal(0, 0.01, size=(int(mask.sum()), 3))
    return image, mask


def _stain(rng: np.random.Generator, image: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    blob = np.zeros((size, size), bool)
    for _ in range(3):
        blob |= _ellipse(rng, size, 0.04, 0.09, centre=centre + rng.normal(0, 0.04 * size, size=2))
    alpha = ndimage.gaussian_filter(blob.astype(np.float64), sigma=max(0.5, size / 128))
    mask = alpha > 0.5
    stain = np.array([[0.75, 0.2, 0.15], [0.2, 0.6, 0.25], [0.2, 0.3, 0.75]])[rng.integers(3)]
    image = (1 - 0.8 * alpha[..., None]) * image + 0.8 * alpha[..., None] * stain[None, None, :]
    return image, mask


def _missing_part(
    rng: np.random.Generator, image: np.ndarray, pattern: str, object_mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    image = image.copy()
    if pattern == "object" and object_mask is not None:
        # Cut a segment off the disc beyond a random chord; the background shows through.
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        cy, cx = np.argwhere(object_mask).mean(0)
        angle = rng.uniform(0, 2 * np.pi)
        depth = size * 0.32 * rng.uniform(0.45, 0.7)
        mask = object_mask & ((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle) > depth)
        background = _texture(rng, size, np.array([0.35, 0.35, 0.38]), 0.04)
        image[mask] = np.clip(background[mask], 0, 1)
        return image, mask
    # Texture: a patch where the weave is missing, showing the flat backing material.
    h, w = rng.integers(int(0.15 * size), int(0.3 * size) + 1, size=2)
    y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    image[mask] = np.array([0.45, 0.4, 0.35]) + rng.normal(0, 0.01, size=(int(mask.sum()), 3))
    return image, mask


def _defect_image(
    rng: np.random.Generator, size: int, pattern: str, defect: str
) -> tuple[np.ndarray, np.ndarray]:
    image, object_mask = _normal_image(rng, size, pattern)
    # Defects of an object sit on the object (the disc spans 0.18-0.82 of the side).
    low, high = (0.2, 0.8) if pattern == "texture" else (0.35, 0.65)
    for _ in range(10):  # redraw the rare defect that falls (almost) outside the image
        centre = rng.uniform(low * size, high * size, size=2)
        if defect == "scratch":
            out, mask = _scratch(rng, image, centre)
        elif defect == "hole":
            out, mask = _hole(rng, image, centre)
        elif defect == "stain":
            out, mask = _stain(rng, image, centre)
        else:
            out, mask = _missing_part(rng, image, pattern, object_mask)
        if mask.sum() >= max(4, size * size // 1000):
            return np.clip(out, 0, 1), mask
    raise RuntimeError(f"could not place a {defect} defect in a {size}x{size} image.")


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, optimize=False)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_demo_mvtec(
    out_dir: str | Path | None = None,
    num_train: int = 60,
    num_test_good: int = 10,
    num_test_defect: int = 20,
    image_size: int = 64,
    seed: int = 0,
    category: str = "demo_texture",
    pattern: str = "texture",
) -> Path:
    """Write a synthetic inspection data set in the MVTec AD layout and return its category folder.

    Layout: ``<out_dir>/<category>/{train/good, test/good, test/<defect>}/NNN.png`` (RGB, uint8) and
    ``ground_truth/<defect>/NNN_mask.png`` (0/255), defects ``DEMO_DEFECTS`` taken in turn
    (scratches: thin bright or dark curves; holes: dark ellipses; stains: blobs of another colour;
    missing parts: texture or object region replaced by the backing/background).

    Args:
        out_dir: parent folder; None uses ``demo_root("mvtec", ...)``.
        num_train: normal training images.
        num_test_good: normal test images.
        num_test_defect: defective test images, spread evenly over the defect types.
        image_size: side of the square images in pixels.
        seed: random seed; equal parameters give byte-identical files.
        category: name of the category folder.
        pattern: ``"texture"`` (a periodic weave, random phase and colour jitter) or ``"object"``
            (a shaded disc on a faint texture, shifted by up to size/32 pixels).
    """
    if pattern not in ("texture", "object"):
        raise ValueError(f"pattern must be 'texture' or 'object', got {pattern!r}.")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}.")
    params = {
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "image_size": image_size,
        "seed": seed,
        "category": category,
        "pattern": pattern,
    }
    out_dir = demo_root("mvtec", **params) if out_dir is None else Path(out_dir)

    def write(folder: Path) -> int:
        count = 0
        for split, code, number in (("train", 0, num_train), ("test", 1, num_test_good)):
            for i in range(number):
                image, _ = _normal_image(np.random.default_rng([seed, code, i]), image_size, pattern)
                _save_png(folder / split / "good" / f"{i:03d}.png", _to_uint8(image))
                count += 1
        per_type = {d: 0 for d in DEMO_DEFECTS}
        for i in range(num_test_defect):
            defect = DEMO_DEFECTS[i % len(DEMO_DEFECTS)]
            k = per_type[defect]
            per_type[defect] += 1
            rng = np.random.default_rng([seed, 2, i])
            image, mask = _defect_image(rng, image_size, pattern, defect)
            _save_png(folder / "test" / defect / f"{k:03d}.png", _to_uint8(image))
            _save_png(folder / "ground_truth" / defect / f"{k:03d}_mask.png", mask.astype(np.uint8) * 255)
            count += 2
        return count

    return _generate_once(out_dir / category, params, write)


# --------------------------------------------------------------------------------------------
# Brain MRI
# --------------------------------------------------------------------------------------------

def _random_rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.radians(rng.uniform(-max_degrees, max_degrees, size=3))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    return rotation


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float, amplitude: float) -> np.ndarray:
    """Gaussian-smoothed white noise, scaled so that its largest magnitude is ``amplitude``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_vox, mode="reflect")
    return field * (amplitude / max(np.abs(field).max(), 1e-12))


def _add_lesions(
    rng: np.random.Generator, image: np.ndarray, brain: np.ndarray, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Blend 1-3 soft-edged ellipsoids (hyper- or hypo-intense) into the brain; return image and mask."""
    depth_mm = ndimage.distance_transform_edt(brain) * spacing
    grid = np.indices(brain.shape).reshape(3, -1).T * spacing  # voxel centres in mm
    lesion_mask = np.zeros(brain.shape, bool)
    image = image.copy()
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        radii = rng.uniform(5.0, 12.0, size=3) * max(1.0, spacing / 4.0)
        candidates = np.argwhere(depth_mm > radii.max()) * spacing
        # Lesions do not overlap: a bright one over a dark one would cancel out under its mask.
        for other, other_radius in placed:
            candidates = candidates[np.linalg.norm(candidates - other, axis=1) > other_radius + radii.max() + spacing]
        if len(candidates) == 0:
            if placed:
                break
            candidates = np.argwhere(depth_mm >= depth_mm.max()) * spacing
        centre = candidates[rng.integers(len(candidates))]
        placed.append((centre, float(radii.max())))
        local = (grid - centre) @ _random_rotation(rng, 90.0)
        distance = np.sqrt(((local / radii) ** 2).sum(1)).reshape(brain.shape)
        weight = 1.0 / (1.0 + np.exp((distance - 1.0) / 0.12))  # soft edge, 0.5 at the surface
        weight *= brain
        # Normal tissue is scaled to at most ~0.85 (see make_demo_mri), so 1.0 stays brighter.
        target = rng.uniform(0.95, 1.0) if rng.random() < 0.5 else rng.uniform(0.1, 0.25)
        image = (1 - weight) * image + weight * target
        lesion_mask |= (weight > 0.5) & brain
    return image, lesion_mask


def _mri_subject(
    rng: np.random.Generator,
    template: np.ndarray,
    template_mask: np.ndarray,
    template_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    lesions: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spacing = float(affine[0, 0])
    # Output voxel centres in mm, moved by a small random similarity transform about the brain
    # centre and a smooth random displacement field, then read from the template.
    world = (np.indices(shape).reshape(3, -1).T * spacing) + affine[:3, 3]
    centre = world.mean(0)
    linear = _random_rotation(rng, 4.0) * rng.uniform(0.95, 1.05, size=3)[None, :]
    moved = (world - centre) @ linear.T + centre + rng.uniform(-3.0, 3.0, size=3)
    sigma = 20.0 / spacing  # displacement smooth over ~2 cm
    moved += np.stack([_smooth_field(rng, shape, sigma, 4.0).ravel() for _ in range(3)], axis=1)
    voxels = (moved - template_affine[:3, 3]) @ np.linalg.inv(template_affine[:3, :3]).T
    image = ndimage.map_coordinates(template, voxels.T, order=1, mode="constant").reshape(shape)
    brain = ndimage.map_coordinates(template_mask, voxels.T, order=1, mode="constant").reshape(shape) > 0.5
    brain = ndimage.binary_fill_holes(brain)

    bias = np.exp(_smooth_field(rng, shape, 50.0 / spacing, 0.2))  # smooth multiplicative field, ±20 %
    image = image * bias * brain
    # Normal tissue: 99.5th percentile of the brain -> 0.85, leaving room above for bright lesions.
    image = image * (0.85 / np.percentile(image[brain], 99.5))
    lesion = np.zeros(shape, bool)
    if lesions:
        image, lesion = _add_lesions(rng, image, brain, spacing)
    sigma_noise = 0.02  # Rician: magnitude of a complex signal with Gaussian noise in both parts
    image = np.sqrt((image + rng.normal(0, sigma_noise, shape)) ** 2 + rng.normal(0, sigma_noise, shape) ** 2)
    image = np.clip(image * brain, 0, 1).astype(np.float32)
    return image, brain, lesion


def make_demo_mri(
    out_dir: str | Path | None = None,
    num_train: int = 8,
    num_test: int = 4,
    seed: int = 0,
    spacing_mm: float = 4.0,
) -> Path:
    """Write synthetic skull-stripped T1 brain volumes derived from the MNI152 template.

    Each subject is the template warped by a small random similarity transform and a smooth random
    displacement field (up to 4 mm), times a smooth bias field (±20 %), with Rician noise
    (σ = 0.02), skull-stripped, intensities in [0, 1] (normal tissue up to ~0.85). Test subjects
    get 1-3 soft-edged ellipsoidal lesions inside the brain, bright (~1.0) or dark (~0.1-0.25).
    Volumes are float32 RAS on an isotropic ``spacing_mm`` grid cropped to the brain (4 mm:
    about 40 x 48 x 40 voxels); the affine carries the spacing.

    Layout (read by ``nifti_datalist(out/"test", out/"test_masks", brain_mask_dir=out/"brain_masks")``)::

        <out_dir>/train/train_000.nii.gz
        <out_dir>/test/test_000.nii.gz
        <out_dir>/test_masks/test_000_mask.nii.gz         lesions, uint8 0/1
        <out_dir>/brain_masks/<case>_brain_mask.nii.gz    every train and test case, uint8 0/1

    Args:
        out_dir: folder to write; None uses ``demo_root("mri", ...)``.
        num_train: healthy training subjects.
        num_test: test subjects with lesions.
        seed: random seed; equal parameters give byte-identical files.
        spacing_mm: isotropic voxel size in mm.
    """
    import nibabel as nib

    if spacing_mm < 1.0:
        raise ValueError(f"spacing_mm must be at least the template's 1 mm, got {spacing_mm}.")
    params = {"num_train": num_train, "num_test": num_test, "seed": seed, "spacing_mm": float(spacing_mm)}
    out_dir = demo_root("mri", **params) if out_dir is None else Path(out_dir)

    def write(folder: Path) -> int:
        template, template_mask, template_affine = load_mni152()
        factor = int(round(spacing_mm / abs(template_affine[0, 0])))
        if factor > 1:  # box-average before sampling on the coarse grid (anti-aliasing)
            template = ndimage.uniform_filter(template, size=factor)
        template_mask_f = ndimage.uniform_filter(template_mask.astype(np.float32), size=max(1, factor))
        # Grid: the template's brain bounding box plus a 12 mm margin, RAS, isotropic spacing.
        index = np.argwhere(template_mask)
        corners = np.array(np.meshgrid(*zip(index.min(0), index.max(0)), indexing="ij")).reshape(3, -1).T
        world = corners @ template_affine[:3, :3].T + template_affine[:3, 3]
        low, high = world.min(0) - 12.0, world.max(0) + 12.0
        shape = tuple(int(n) for n in np.ceil((high - low) / spacing_mm) + 1)
        affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
        affine[:3, 3] = low
        count = 0
        for split, code, number in (("train", 0, num_train), ("test", 1, num_test)):
            for i in range(number):
                case = f"{split}_{i:03d}"
                rng = np.random.default_rng([seed, code, i])
                image, brain, lesion = _mri_subject(
                    rng, template, template_mask_f, template_affine, shape, affine, lesions=split == "test"
                )
                for sub, name, data in (
                    (split, case, image),
                    ("brain_masks", f"{case}_brain_mask", brain.astype(np.uint8)),
                    *((("test_masks", f"{case}_mask", lesion.astype(np.uint8)),) if split == "test" else ()),
                ):
                    (folder / sub).mkdir(exist_ok=True)
                    nifti = nib.Nifti1Image(data, affine)
                    nifti.header.set_xyzt_units("mm")
                    nifti.set_qform(affine, code=1)
                    nifti.set_sform(affine, code=1)
                    nib.save(nifti, folder / sub / f"{name}.nii.gz")
                    count += 1
        return count

    return _generate_once(out_dir, params, write)
