"""mIoU from a dataset-level confusion matrix (docs/official_code.md)."""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """[C, C] counts, rows = ground truth, columns = prediction. Pixels with target == ignore_index are skipped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def miou(confusion: torch.Tensor, over: str = "present") -> tuple[float, torch.Tensor]:
    """Mean IoU and per-class IoU (NaN where undefined).

    over: "present" (standard: classes present in ground truth or prediction), "truth" (classes present in the ground
    truth only: the toy-world protocols, where a class named but absent must not lift the mean) or "all" (official
    GoCA: every class, absent ones counting 0).
    """
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    iou = tp / union
    if over == "all":
        return float(torch.nan_to_num(iou, nan=0.0).mean()), iou
    if over == "truth":
        return float(iou[c.sum(1) > 0].mean()), iou
    if over != "present":
        raise ValueError(f"over must be 'present', 'truth' or 'all', got {over!r}")
    return float(iou[union > 0].mean()), iou
