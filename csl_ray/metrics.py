"""Segmentation metrics from a confusion matrix kept on the model's device (torchvision references style).

    cm = ConfusionMatrix(num_classes=21, ignore_index=255, device="cuda")
    for pred, target in ...:
        cm.update(pred, target)
    cm.all_reduce()  # once per evaluation; a no-op without torch.distributed
    cm.miou(), cm.iou(), cm.pixel_acc()

All scores are percentages, as UniMatch and the CSL paper report them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Counts of (target class, predicted class) pixel pairs.

    Args:
        num_classes: C.
        ignore_index: target value that never counts (padding, object boundaries).
        device: where the counts live; keep it on the prediction's device so an update never copies to the host.
    """

    def __init__(self, num_classes: int, ignore_index: int, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds one batch.

        Args:
            pred: predicted class ids in [0, C), any integer shape, e.g. [N, H, W].
            target: ground-truth class ids of the same shape; `ignore_index` and any value outside [0, C) are
                skipped, so neither ignore nor padding pixels ever count.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        n = self.num_classes
        target = target.to(self.mat.device)
        pred = pred.to(self.mat.device)
        keep = (target != self.ignore_index) & (target >= 0) & (target < n)
        # Row = target, column = prediction; one bincount over flattened pairs, no host round trip.
        index = target[keep].long() * n + pred[keep].long()
        self.mat += torch.bincount(index, minlength=n * n).reshape(n, n)

    def all_reduce(self) -> None:
        """Sums the counts over all processes; call once per evaluation, after the last update."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class intersection over union in percent, float64 [C]; NaN for a class with an empty union
        (absent from both target and prediction), so it can be told apart from a class scored 0."""
        mat = self.mat.double()
        inter = mat.diag()
        union = mat.sum(0) + mat.sum(1) - inter
        return torch.where(union > 0, 100.0 * inter / union.clamp(min=1), torch.nan)

    def miou(self) -> float:
        """Mean IoU in percent over the classes with a non-empty union.

        UniMatch averages `inter / (union + 1e-10)` over all C classes, scoring an absent class 0; on full
        benchmark validation sets every class is present and the two agree. Returns NaN when nothing was counted.
        """
        iou = self.iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if bool(present.any()) else float("nan")

    def pixel_acc(self) -> float:
        """Percentage of counted pixels predicted correctly; NaN when nothing was counted."""
        total = self.mat.sum()
        return float(100.0 * self.mat.diag().sum() / total) if int(total) > 0 else float("nan")
