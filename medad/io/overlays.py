"""PNG overlays for looking at results: image | restoration | anomaly map | thresholded map and ground truth.

Figures are built on matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), so they
can be drawn from worker processes and headless servers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from medad.io.atomic import atomic_write

__all__ = ["save_overlay_png", "save_volume_overlay_png", "select_slices"]

PathLike = str | os.PathLike

MAP_COLORMAP = "inferno"
PREDICTION_COLOUR = (1.0, 0.15, 0.15)  # thresholded anomaly map, filled
GROUND_TRUTH_COLOUR = "lime"  # annotated mask, outlined


def _to_numpy(array: Any) -> np.ndarray | None:
    if array is None:
        return None
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _display_range(*arrays: np.ndarray | None) -> tuple[float, float]:
    # One intensity window for image and restoration, so the eye compares like with like; 1st-99th percentile
    # keeps a few bright pixels (MRI vessels, specular highlights) from washing the picture out.
    values = np.concatenate([a.ravel() for a in arrays if a is not None])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1.0, 99.0])
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return float(low), float(high if high > low else low + 1.0)


def _as_display_image(image: np.ndarray, window: tuple[float, float]) -> tuple[np.ndarray, str | None]:
    """``(C, H, W)`` with C in {1, 3} (or ``(H, W)``) -> an imshow-ready array in 0..1 and its colormap."""
    low, high = window
    scaled = np.clip((image - low) / (high - low), 0.0, 1.0)
    if scaled.ndim == 2:
        return scaled, "gray"
    if scaled.shape[0] == 1:
        return scaled[0], "gray"
    if scaled.shape[0] == 3:
        return np.moveaxis(scaled, 0, -1), None
    raise ValueError(f"An image to draw must have 1 or 3 channels (C, H, W), got shape {image.shape}.")


def _map_range(anomaly_map: np.ndarray, map_range: tuple[float, float] | None) -> tuple[float, float]:
    if map_range is not None:
        return float(map_range[0]), float(map_range[1])
    finite = anomaly_map[np.isfinite(anomaly_map)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return low, high if high > low else low + 1.0


def _draw_contour(axis: Any, mask: np.ndarray, colour: Any) -> None:
    # contour() warns on a constant field; an empty or full mask simply has no outline.
    binary = mask > 0.5
    if binary.any() and not binary.all():
        axis.contour(binary.astype(np.float64), levels=[0.5], colors=[colour], linewidths=1.0)


def _draw_row(
    axes: Sequence[Any],
    image: np.ndarray,
    restoration: np.ndarray | None,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    threshold: float | None,
    map_range: tuple[float, float],
    window: tuple[float, float],
    titles: bool,
) -> Any:
    """Draw one case/slice into ``axes`` (3 or 4 axes); returns the map's image handle for a colourbar."""
    display, cmap = _as_display_image(image, window)
    panels = iter(axes)
    axis = next(panels)
    axis.imshow(display, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if titles:
        axis.set_title("image")
    if restoration is not None:
        axis = next(panels)
        restored, cmap_r = _as_display_image(restoration, window)
        axis.imshow(restored, cmap=cmap_r, vmin=0.0, vmax=1.0, interpolation="nearest")
        if titles:
            axis.set_title("restoration")
    axis = next(panels)
    handle = axis.imshow(anomaly_map, cmap=MAP_COLORMAP, vmin=map_range[0], vmax=map_range[1], interpolation="nearest")
    if titles:
        axis.set_title("anomaly map")
    axis = next(panels)
    axis.imshow(display, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if threshold is not None:
        predicted = np.isfinite(anomaly_map) & (anomaly_map >= threshold)
        overlay = np.ma.masked_where(~predicted, predicted.astype(np.float64))
        axis.imshow(overlay, cmap=ListedColormap([PREDICTION_COLOUR]), alpha=0.45, vmin=0.0, vmax=1.0,
                    interpolation="nearest")
    else:
        # No decision threshold: blend the map itself over the image.
        axis.imshow(anomaly_map, cmap=MAP_COLORMAP, vmin=map_range[0], vmax=map_range[1], alpha=0.5,
                    interpolation="nearest")
    if mask is not None:
        _draw_contour(axis, mask, GROUND_TRUTH_COLOUR)
    if titles:
        label = "map >= threshold" if threshold is not None else "map over image"
        axis.set_title(label + (" | mask" if mask is not None else ""))
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    return handle


def _save_figure(figure: Figure, path: PathLike) -> Path:
    FigureCanvasAgg(figure)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    return Path(path)


def save_overlay_png(
    path: PathLike,
    image: Any,
    restoration: Any | None,
    anomaly_map: Any,
    mask: Any | None = None,
    threshold: float | None = None,
    title: str | None = None,
    map_range: tuple[float, float] | None = None,
) -> Path:
    """Save a one-row PNG: image | restoration | anomaly map | thresholded map with the ground-truth outline.

    Args:
        path: output ``.png``.
        image: ``(C, H, W)`` with C = 1 (grey) or 3 (RGB), or ``(H, W)``; any intensity range.
        restoration: the model's restored image, same shape as ``image``, or ``None`` (panel omitted).
        anomaly_map: ``(H, W)``.
        mask: ground-truth ``(H, W)`` (drawn as a green outline) or ``None``.
        threshold: pixel threshold: pixels with ``map >= threshold`` are filled red in the last panel; when
            ``None`` the map is blended over the image instead.
        title: figure title (e.g. case id and image score).
        map_range: fixed colour range of the map, e.g. a calibrated range shared by all cases; default: the
            map's own min..max.
    """
    image_np, restoration_np = _to_numpy(image), _to_numpy(restoration)
    map_np, mask_np = _to_numpy(anomaly_map), _to_numpy(mask)
    spatial = image_np.shape[-2:]
    for name, array in (("restoration", restoration_np), ("anomaly map", map_np), ("mask", mask_np)):
        if array is not None and array.shape[-2:] != spatial:
            raise ValueError(f"Cannot draw {path}: the {name} is {array.shape[-2:]} but the image is {spatial}.")
    if map_np.ndim != 2:
        raise ValueError(f"Cannot draw {path}: the anomaly map must be (H, W), got shape {map_np.shape}.")
    if mask_np is not None:
        mask_np = mask_np.reshape(spatial)
    n_panels = 4 if restoration_np is not None else 3
    figure = Figure(figsize=(3.0 * n_panels, 3.3))
    axes = figure.subplots(1, n_panels)
    window = _display_range(image_np, restoration_np)
    handle = _draw_row(axes, image_np, restoration_np, map_np, mask_np, threshold, _map_range(map_np, map_range),
                       window, titles=True)
    figure.colorbar(handle, ax=axes[-2], fraction=0.046, pad=0.02)
    if title:
        figure.suptitle(title)
    return _save_figure(figure, path)


def select_slices(weights: np.ndarray, n_slices: int) -> list[int]:
    """Pick ``n_slices`` indices along the last axis of ``weights (X, Y, Z)`` through its mass.

    Slices sit at the (k + 0.5) / n quantiles of the per-slice mass, so they span the anomalous region instead of
    being n neighbours of its peak; the slice of largest mass is always included. With no mass (an empty mask, a
    flat map) they are spread evenly over the middle of the volume.
    """
    depth = weights.shape[-1]
    n_slices = max(1, min(int(n_slices), depth))
    mass = np.nan_to_num(weights, nan=0.0).reshape(-1, depth).sum(axis=0)
    mass = np.clip(mass, 0.0, None)
    if mass.sum() <= 0:
        return sorted({int(round(v)) for v in np.linspace(depth * 0.2, depth * 0.8 - 1, n_slices)})
    cumulative = np.cumsum(mass) / mass.sum()
    quantiles = (np.arange(n_slices) + 0.5) / n_slices
    chosen = {int(np.searchsorted(cumulative, q)) for q in quantiles} | {int(np.argmax(mass))}
    chosen_sorted = sorted(min(c, depth - 1) for c in chosen)
    if len(chosen_sorted) > n_slices:  # the peak was an extra: drop the quantile slice nearest to it
        peak = int(np.argmax(mass))
        others = [c for c in chosen_sorted if c != peak]
        others.remove(min(others, key=lambda c: abs(c - peak)))
        chosen_sorted = sorted(others + [peak])
    return chosen_sorted


def save_volume_overlay_png(
    path: PathLike,
    volume: Any,
    anomaly_map: Any,
    mask: Any | None = None,
    restoration: Any | None = None,
    slices: Sequence[int] | None = None,
    n_slices: int = 4,
    threshold: float | None = None,
    title: str | None = None,
    map_range: tuple[float, float] | None = None,
) -> Path:
    """Save a PNG with one row per axial slice of a 3D case: image | restoration | map | thresholded map + mask.

    Args:
        path: output ``.png``.
        volume: ``(X, Y, Z)`` image; "axial" means the last axis, true for volumes in RAS-like orientation
            (e.g. after MONAI ``Orientation(axcodes="RAS")``). Slices are drawn with X to the right and Y upward.
        anomaly_map: ``(X, Y, Z)``.
        mask: ground truth ``(X, Y, Z)`` or ``None``.
        restoration: restored volume ``(X, Y, Z)`` or ``None`` (column omitted).
        slices: indices along Z to draw; default: ``n_slices`` slices through the mask's mass when a non-empty
            mask is given, else through the anomaly map's mass above its median (see :func:`select_slices`).
        n_slices: number of slices picked automatically.
        threshold, title, map_range: as in :func:`save_overlay_png`; the map range is shared by all rows.
    """
    volume_np, map_np = _to_numpy(volume), _to_numpy(anomaly_map)
    mask_np, restoration_np = _to_numpy(mask), _to_numpy(restoration)
    if volume_np.ndim != 3:
        raise ValueError(f"Cannot draw {path}: the volume must be (X, Y, Z), got shape {volume_np.shape}.")
    for name, array in (("anomaly map", map_np), ("mask", mask_np), ("restoration", restoration_np)):
        if array is not None and array.shape != volume_np.shape:
            raise ValueError(f"Cannot draw {path}: the {name} is {array.shape} but the volume is {volume_np.shape}.")
    if slices is None:
        if mask_np is not None and mask_np.any():
            weights = mask_np
        else:
            finite = np.nan_to_num(map_np, nan=np.nanmin(map_np) if np.isfinite(map_np).any() else 0.0)
            weights = np.clip(finite - np.median(finite), 0.0, None)
        slices = select_slices(weights, n_slices)
    slices = [int(s) for s in slices]
    if not slices or min(slices) < 0 or max(slices) >= volume_np.shape[2]:
        raise ValueError(f"Cannot draw {path}: slice indices {slices} are outside 0..{volume_np.shape[2] - 1}.")

    def axial(array: np.ndarray | None, index: int) -> np.ndarray | None:
        # (X, Y) -> (rows = Y from top to bottom reversed, cols = X) so that Y (anterior in RAS) points up.
        return None if array is None else np.flipud(array[:, :, index].T)

    n_columns = 4 if restoration_np is not None else 3
    figure = Figure(figsize=(3.0 * n_columns, 3.0 * len(slices) + 0.4))
    axes = np.asarray(figure.subplots(len(slices), n_columns)).reshape(len(slices), n_columns)
    window = _display_range(volume_np, restoration_np)
    shared_range = _map_range(map_np, map_range)
    handle = None
    for row, index in enumerate(slices):
        handle = _draw_row(axes[row], axial(volume_np, index), axial(restoration_np, index), axial(map_np, index),
                           axial(mask_np, index), threshold, shared_range, window, titles=row == 0)
        axes[row, 0].set_ylabel(f"z = {index}")
    figure.colorbar(handle, ax=axes[:, -2].tolist(), fraction=0.046, pad=0.02)
    if title:
        figure.suptitle(title)
    return _save_figure(figure, path)
