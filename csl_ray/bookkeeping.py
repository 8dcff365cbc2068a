"""What the Ray worker keeps between its reports: running means of the step metrics, the first validation batch
and the images it logs to W&B. No Ray here."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from csl_ray.evaluate import eval_options
from csl_ray.loop import TrainLoop
from csl_ray.tracking import chw_to_hwc, label_rgb, overlay, val_panels, weight_rgb


class RunningMeans:
    """Means of the step metrics since the last reset (reports carry the means over their interval)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        means = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return means


def remember_first(batches: Iterator[dict[str, torch.Tensor]], first: list) -> Iterator[dict[str, torch.Tensor]]:
    """Passes batches through, keeping the first one in `first` when it is empty (the W&B prediction image)."""
    for batch in batches:
        if not first:
            first.append(batch)
        yield batch


def step_images(loop: TrainLoop, val_batch: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Images for W&B: the latest step's pseudo-label and weight map, and a prediction on a validation image."""
    data = loop.cfg.data
    visuals = loop.last_visuals
    images = {}
    if visuals:
        pseudo = label_rgb(visuals["pseudo_label"].cpu().numpy(), data.num_classes, data.ignore_index)
        images["pseudo_label"] = overlay(chw_to_hwc(visuals["image_weak"]), pseudo)
        images["weight"] = weight_rgb(visuals["weight"].float().cpu().numpy())
    if val_batch is not None:
        panels = val_panels(loop.student, val_batch, selector=loop.selector, **eval_options(data))
        images["prediction"] = panels["prediction"]
    return images
