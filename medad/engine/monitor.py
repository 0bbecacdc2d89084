"""Learning monitor: does the restoration beat doing nothing, on held-out normal data and on synthetic anomalies?

Every ``every`` training steps (and at the end) :class:`medad.engine.Trainer` calls the monitor with the model it
would save. The monitor runs the bundle's own inferer on a few fixed held-out normal images (the ``val`` loader;
for brain MRI a few fixed axial slices of its first volumes) and on the same images with synthetic anomalies
inserted once (a seeded :class:`~medad.corruptions.ForeignPatchCorruption`: foreign patches and intensity
biases inside the foreground), and records:

- ``mse_normal``: restoration vs the clean image on normal images (doing nothing scores 0 here);
- ``mse_corrupted`` vs ``do_nothing_corrupted``: the same on the corrupted images, against returning the input;
- ``mse_inside`` vs ``do_nothing_inside``: the same inside the anomalies only (does it heal them?);
- ``pixel_auroc``: the anomaly map against the inserted anomalies (:func:`medad.metrics.pixel_auroc`).

It appends a row to ``learning_curve.csv``, redraws ``learning_curve.png`` and logs one line; it warns when the
restoration damages normal images more than the anomalies change them, or does not heal the anomalies.
It never changes a random stream that training or evaluation uses.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medad.corruptions import ForeignPatchCorruption
from medad.metrics import pixel_auroc

from .random_state import preserved_random_state

__all__ = ["LearningMonitor"]

logger = logging.getLogger("medad.train")

FIELDS = (
    "step",
    "progress",
    "mse_normal",
    "mse_corrupted",
    "do_nothing_corrupted",
    "mse_inside",
    "do_nothing_inside",
    "pixel_auroc",
    "seconds",
)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _axial_slices(foreground: torch.Tensor, count: int) -> list[int]:
    """``count`` fixed axial indices spread over the middle of the foreground's extent of a ``(X, Y, Z)`` mask."""
    area = foreground.flatten(0, 1).sum(0)
    occupied = torch.nonzero(area > 0).flatten()
    low, high = (int(occupied[0]), int(occupied[-1])) if occupied.numel() else (0, foreground.shape[-1] - 1)
    positions = np.linspace(low + 0.3 * (high - low), low + 0.7 * (high - low), count)
    return sorted({int(round(p)) for p in positions})


class LearningMonitor:
    """Track restoration error against doing nothing during training.

    Args:
        loader: held-out normal data (the bundle's ``val`` loader): ``(B, C, H, W)`` images, or ``(1, C, X, Y, Z)``
            volumes with an optional ``foreground_key`` mask.
        inferer: the bundle's :class:`~medad.inferers.AnomalyInferer` (2D images or, for volumes, a SliceAggregationInferer).
        output_dir: where ``learning_curve.csv`` / ``.png`` go.
        every: steps between calls; 0 or None turns the monitor off.
        num_images: 2D images to keep (the first ones of ``loader``).
        num_volumes / slices_per_volume: for volumes, the first volumes and that many fixed axial slices of each.
        anomaly_size: side of the region holding each synthetic anomaly, as a fraction of the smaller image side.
        seed: seed of the synthetic anomalies (drawn once).
        image_key / foreground_key: batch keys of the images and of the foreground (brain) masks.
        device: where the inferer runs (default: the network's device).
        visible_change: an inserted pixel counts as anomalous when it changed by at least this (data range [0, 1]).
    """

    def __init__(
        self,
        loader: Iterable[Mapping[str, Any]] | None,
        inferer: Callable[..., dict[str, torch.Tensor]],
        output_dir: str | os.PathLike,
        every: int | None = 100,
        num_images: int = 8,
        num_volumes: int = 2,
        slices_per_volume: int = 4,
        anomaly_size: float = 0.3,
        seed: int = 0,
        image_key: str = "image",
        foreground_key: str | None = "brain_mask",
        device: str | torch.device | None = None,
        visible_change: float = 0.05,
    ) -> None:
        self.loader = loader
        self.inferer = inferer
        self.output_dir = Path(output_dir)
        self.every = int(every or 0)
        self.num_images = num_images
        self.num_volumes = num_volumes
        self.slices_per_volume = slices_per_volume
        self.anomaly_size = anomaly_size
        self.seed = seed
        self.image_key = image_key
        self.foreground_key = foreground_key
        self.device = None if device is None else torch.device(device)
        self.visible_change = visible_change
        self.records: list[dict[str, float]] = []
        self._data: dict[str, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.loader is not None

    @property
    def csv_path(self) -> Path:
        return self.output_dir / "learning_curve.csv"

    @property
    def png_path(self) -> Path:
        return self.output_dir / "learning_curve.png"

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.every == 0

    # -- data ----------------------------------------------------------------------------------------
    def _collect(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed normal images ``(N, C, *spatial)`` (volumes: ``(V, C, X, Y, S)``) and their foreground."""
        images, foregrounds = [], []
        for batch in self.loader:  # type: ignore[union-attr]
            image = _plain(batch[self.image_key]).float()
            fg = batch.get(self.foreground_key) if self.foreground_key else None
            fg = None if fg is None or not torch.is_tensor(fg) else (_plain(fg) > 0).float()
            if image.dim() == 5:  # volumes: a few fixed axial slices of each
                for b in range(image.shape[0]):
                    mask = fg[b, 0] if fg is not None else (image[b].amax(0) > 0).float()
                    index = _axial_slices(mask, self.slices_per_volume)
                    images.append(image[b : b + 1, ..., index])
                    foregrounds.append(mask[None, None, ..., index])
                if len(images) >= self.num_volumes:
                    break
            else:
                images.append(image)
                foregrounds.append(fg if fg is not None else None)
                if sum(len(i) for i in images) >= self.num_images:
                    break
        if not images:
            raise ValueError("LearningMonitor: the validation loader is empty; set val_fraction > 0 or monitor_every 0.")
        if images[0].dim() == 5:
            depth = min(i.shape[-1] for i in images)  # volumes may differ in brain extent: keep equal slice counts
            return torch.cat([i[..., :depth] for i in images]), torch.cat([f[..., :depth] for f in foregrounds])
        clean = torch.cat(images)[: self.num_images]
        has_fg = all(f is not None for f in foregrounds)
        return clean, (torch.cat(foregrounds)[: self.num_images] if has_fg else None)

    def _as_2d(self, x: torch.Tensor) -> torch.Tensor:
        """``(V, C, X, Y, S)`` -> ``(V·S, C, X, Y)``; 2D batches unchanged."""
        return x.movedim(-1, 1).flatten(0, 1) if x.dim() == 5 else x

    def _from_2d(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dim() != 5:
            return x
        v, s = like.shape[0], like.shape[-1]
        return x.reshape(v, s, *x.shape[1:]).movedim(1, -1)

    def prepare(self) -> dict[str, torch.Tensor]:
        """Load the fixed images once and insert the synthetic anomalies (seeded)."""
        if self._data is not None:
            return self._data
        with preserved_random_state():  # reading the loader draws a shuffle seed from the global torch RNG
            clean, foreground = self._collect()
        flat = self._as_2d(clean)
        flat_fg = self._as_2d(foreground) if foreground is not None else None
        side = min(flat.shape[-2:])
        corruption = ForeignPatchCorruption(
            patch_size=max(4, int(self.anomaly_size * side)), foreground_only=flat_fg is not None,
            intensity_bias_prob=0.5, smooth_sigma=(0.5, 1.5), clip_range=(0.0, 1.0),
        )
        generator = torch.Generator().manual_seed(int(self.seed))
        alpha = 0.6 + 0.4 * torch.rand(flat.shape[0], generator=generator)
        corrupted, mask = corruption(flat, flat.roll(1, 0), alpha, foreground=flat_fg, generator=generator)
        changed = (corrupted - flat).abs().amax(1, keepdim=True) >= self.visible_change
        region = flat_fg if flat_fg is not None else torch.ones_like(mask)
        self._data = {
            "clean": clean,
            "corrupted": self._from_2d(corrupted, clean),
            "labels": ((mask >= 0.5) & changed & (region > 0)).float(),  # (N, 1, H, W), like every 2D quantity
            "region": region,
        }
        return self._data

    # -- measurement ---------------------------------------------------------------------------------
    def _infer(self, images: torch.Tensor, network: torch.nn.Module) -> dict[str, torch.Tensor]:
        device = self.device or next((p.device for p in network.parameters()), torch.device("cpu"))
        out = self.inferer(images.to(device), network)
        return {k: self._as_2d(_plain(v).detach().float().cpu()) for k, v in out.items() if k in ("anomaly_map", "restoration")}

    @staticmethod
    def _mse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
        """Mean over channels and the pixels where ``where`` (N, 1, H, W) is set; NaN when there are none."""
        weight = where.expand_as(a)
        total = float(weight.sum())
        return float((((a - b) ** 2) * weight).sum() / total) if total > 0 else math.nan

    @torch.no_grad()
    def __call__(self, network: torch.nn.Module, step: int, progress: float = math.nan) -> dict[str, float]:
        """Measure ``network`` now; append, plot, log and return the record."""
        data = self.prepare()
        start = time.perf_counter()
        was_training = network.training
        network.eval()
        try:
            with preserved_random_state(self.inferer):  # stochastic inferers must not shift training or evaluation
                normal = self._infer(data["clean"], network)
                anomalous = self._infer(data["corrupted"], network)
        finally:
            network.train(was_training)
        clean, corrupted = self._as_2d(data["clean"]), self._as_2d(data["corrupted"])
        region, labels = data["region"], data["labels"]
        try:
            auroc = pixel_auroc(anomalous["anomaly_map"][:, 0].numpy(), labels[:, 0].numpy(), region[:, 0].numpy() > 0)
        except ValueError:  # no visible synthetic anomaly (e.g. tiny foreground): the AUROC is undefined
            auroc = math.nan
        record = {
            "step": int(step),
            "progress": float(progress),
            "mse_normal": self._mse(normal["restoration"], clean, region),
            "mse_corrupted": self._mse(anomalous["restoration"], clean, region),
            "do_nothing_corrupted": self._mse(corrupted, clean, region),
            "mse_inside": self._mse(anomalous["restoration"], clean, labels),
            "do_nothing_inside": self._mse(corrupted, clean, labels),
            "pixel_auroc": auroc,
            "seconds": time.perf_counter() - start,
        }
        self.records = [r for r in self.records if r["step"] < record["step"]] + [record]
        self._write()
        self._report(record)
        return record

    def _report(self, r: Mapping[str, float]) -> None:
        logger.info(
            "monitor step %d: normal MSE %.5f (doing nothing: 0) | corrupted %.5f vs doing nothing %.5f | inside the "
            "anomalies %.5f vs %.5f | pixel AUROC %.3f (%.1f s)",
            r["step"], r["mse_normal"], r["mse_corrupted"], r["do_nothing_corrupted"], r["mse_inside"],
            r["do_nothing_inside"], r["pixel_auroc"], r["seconds"],
        )
        if r["mse_normal"] >= r["do_nothing_corrupted"]:
            logger.warning(
                "monitor step %d: the restoration changes held-out NORMAL images more (MSE %.5f) than the synthetic "
                "anomalies change the corrupted ones (%.5f): it is worse than doing nothing; train longer or check "
                "the learning rate (see %s).", r["step"], r["mse_normal"], r["do_nothing_corrupted"], self.png_path,
            )
        if r["mse_inside"] >= r["do_nothing_inside"]:
            logger.warning(
                "monitor step %d: inside the synthetic anomalies the restoration is no closer to the clean image than "
                "the input (MSE %.5f vs %.5f): it does not heal anomalies yet.", r["step"], r["mse_inside"],
                r["do_nothing_inside"],
            )

    # -- files ---------------------------------------------------------------------------------------
    def resume(self, step: int) -> None:
        """Keep the rows of ``learning_curve.csv`` up to ``step`` (a resumed run continues the same curve)."""
        self.records = []
        if self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    record = {k: float(row[k]) if row.get(k) not in (None, "") else math.nan for k in FIELDS}
                    record["step"] = int(record["step"])
                    if record["step"] <= step:
                        self.records.append(record)

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.records)
        self._plot()

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.records]
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
        curves = (
            ("mse_normal", "restoration, normal images", "C0", "-"),
            ("mse_corrupted", "restoration, corrupted images", "C1", "-"),
            ("do_nothing_corrupted", "do nothing, corrupted images", "C1", ":"),
            ("mse_inside", "restoration, inside anomalies", "C3", "-"),
            ("do_nothing_inside", "do nothing, inside anomalies", "C3", ":"),
        )
        for key, label, colour, style in curves:
            values = [max(r[key], 1e-12) for r in self.records]
            left.plot(steps, values, style, color=colour, marker="o", markersize=3, label=label)
        left.set_yscale("log")
        left.set_xlabel("training step")
        left.set_ylabel("MSE vs the clean image")
        left.legend(fontsize=7)
        right.plot(steps, [r["pixel_auroc"] for r in self.records], "-o", color="C2", markersize=3)
        right.axhline(0.5, color="gray", linestyle=":", linewidth=1)
        right.set_ylim(0.0, 1.0)
        right.set_xlabel("training step")
        right.set_ylabel("pixel AUROC, synthetic anomalies")
        fig.tight_layout()
        fig.savefig(self.png_path, dpi=90)
        plt.close(fig)
