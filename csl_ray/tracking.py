"""Run tracking: the run directory and Weights & Biases.

Run directory (`<train.output_dir>/<run name>/`, written on the driver's machine):

    config.yaml        the resolved config (never a secret: the W&B key only ever comes from the environment)
    metrics.jsonl      one JSON row per `ray.train.report` (training means since the last report; val metrics at evals)
    results.json       the final summary (mIoU, per-class IoU, selected ratio, pseudo-label accuracy, ...)
    miou.png           validation mIoU against iteration
    selected_ratio.png share of unlabelled pixels the selector marks reliable, against iteration
    wandb/             offline W&B runs (when W&B is on and no key is set)

W&B runs only on world rank 0 (`WandbRun.start` is called there and nowhere else); `ray.air`'s `setup_wandb`
does not gate ranks under Ray Train v2, so this module calls `wandb.init` itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from csl_ray.config import Config, LoggingConfig, config_to_dict, dump_config


def wandb_mode(cfg: LoggingConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The W&B mode a run uses: online | offline | disabled.

    `logging.wandb: false` disables W&B. `logging.mode: auto` follows an explicit `WANDB_MODE` in the environment
    (the test suite sets `disabled`), else goes online iff `WANDB_API_KEY` is set, else offline.
    """
    if not cfg.wandb:
        return "disabled"
    if cfg.mode != "auto":
        return cfg.mode
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class WandbRun:
    """One W&B run (opened on world rank 0 only): scalars, per-class IoU tables and images, by iteration."""

    def __init__(self, run: Any, class_names: list[str]):
        self.run = run
        self.class_names = class_names

    @classmethod
    def start(
        cls, cfg: Config, mode: str, name: str, run_dir: str | os.PathLike, class_names: list[str]
    ) -> WandbRun | None:
        """Opens (or, after a restart, resumes) the run named `name`; None when `mode` is disabled.

        Args:
            cfg: the resolved config, logged as the W&B run config.
            mode: from `wandb_mode`, resolved where the user's environment is (the driver).
            name: run name; also the W&B run id, so a resumed Ray run continues the same W&B run.
            run_dir: offline runs are written under `<run_dir>/wandb`.
            class_names: row labels of the per-class IoU tables.
        """
        if mode == "disabled":
            return None
        import wandb

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=cfg.logging.project,
            entity=cfg.logging.entity,
            group=cfg.logging.group,
            name=name,
            id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[:128],
            resume="allow",
            config=config_to_dict(cfg),
            mode=mode,
            dir=str(run_dir),
        )
        return cls(run, class_names)

    def log_scalars(self, step: int, metrics: Mapping[str, float], prefix: str = "train/") -> None:
        self.run.log({f"{prefix}{k}": v for k, v in metrics.items()}, step=step)

    def log_eval(self, step: int, result: Mapping[str, Any]) -> None:
        """Val mIoU and pixel accuracy as scalars, the per-class IoU as a table."""
        import wandb

        rows = [[n, float(v)] for n, v in zip(self.class_names, result["iou_per_class"], strict=True)]
        table = wandb.Table(columns=["class", "iou"], data=rows)
        self.run.log(
            {"val/miou": result["miou"], "val/pixel_acc": result["pixel_acc"], "val/iou_per_class": table}, step=step
        )

    def log_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 [H, W, 3] arrays, e.g. from `label_rgb` / `weight_rgb` / `overlay`."""
        import wandb

        self.run.log({f"images/{k}": wandb.Image(v) for k, v in images.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()


def palette(num_classes: int) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class ids), uint8 [num_classes, 3]; class 0 is black."""
    colors = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        label, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colors[c] = (r, g, b)
    return colors


def label_rgb(labels: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
    """Class map [H, W] -> uint8 [H, W, 3] in the VOC colours; ignored pixels white."""
    colors = np.concatenate([palette(num_classes), np.full((1, 3), 255, dtype=np.uint8)])
    idx = np.where((labels == ignore_index) | (labels < 0) | (labels >= num_classes), num_classes, labels)
    return colors[idx]


def weight_rgb(weights: np.ndarray) -> np.ndarray:
    """Selector weights [H, W] in [0, 1] -> uint8 [H, W, 3] (viridis: dark = rejected, yellow = reliable)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.clip(weights, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a colour map over an image; both uint8 [H, W, 3]."""
    return (image.astype(np.float32) * (1 - alpha) + rgb.astype(np.float32) * alpha).round().astype(np.uint8)


def chw_to_hwc(image: Any) -> np.ndarray:
    """A uint8 image tensor or array [3, H, W] -> uint8 array [H, W, 3]."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    return np.ascontiguousarray(array.transpose(1, 2, 0)).astype(np.uint8)


class RunDir:
    """The run directory on the driver: resolved config, metrics stream, final results and curves."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.results = self.path / "results.json"

    def write_config(self, cfg: Config) -> None:
        dump_config(cfg, self.config)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(dict(row)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metric rows ordered by step; a step logged twice (re-run after a restart) keeps its latest row."""
        if not self.metrics.exists():
            return []
        rows: dict[int, dict[str, Any]] = {}
        for line in self.metrics.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
        return [rows[s] for s in sorted(rows)]

    def write_results(self, results: Mapping[str, Any]) -> None:
        tmp = self.results.with_name(f".{self.results.name}.tmp")
        tmp.write_text(json.dumps(dict(results), indent=2) + "\n")
        os.replace(tmp, self.results)

    def plot(self) -> list[Path]:
        """Writes miou.png and selected_ratio.png from metrics.jsonl; returns the files written."""
        rows = self.read_metrics()
        written = []
        for key, label in (("miou", "validation mIoU"), ("selected_ratio", "selected ratio (reliable pixels)")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                path = self.path / f"{key}.png"
                plot_xy({"": points}, xlabel="iteration", ylabel=label, path=path)
                written.append(path)
        return written


def plot_xy(series: Mapping[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, path: Path) -> None:
    """Line plot of named (x, y) series to a PNG (Agg canvas: no display, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot()
    for name, points in series.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label=name or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(series):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def val_panels(
    model: Any,
    batch: Mapping[str, Any],
    *,
    selector: Any,
    num_classes: int,
    mode: str,
    crop_size: int,
    ignore_index: int,
) -> dict[str, np.ndarray]:
    """What the model makes of one validation image, as uint8 [H, W, 3] images.

    Args:
        model: segmentation model (any device).
        batch: `image` uint8 [1, 3, H, W] and `mask` [1, H, W].
        selector: `selector(probs, valid) -> Selection`, e.g. `build_selector(cfg.ssl.selector)`.
        mode: eval mode (center_crop panels show the central crop).

    Returns:
        `image`; `truth` and `prediction` overlaid on it; `weights`: the selector's weights for the model's own
        prediction (bright where it would trust the pseudo-label).
    """
    import torch

    from csl_ray.evaluate import center_crop, predict

    image, mask = batch["image"], batch["mask"]
    probs = predict(model, image, mode=mode, crop_size=crop_size)
    if mode == "center_crop":
        image, mask = center_crop(image, crop_size), center_crop(mask, crop_size)
    # Whole validation images have no padding: every pixel is valid for the selector.
    valid = torch.ones(probs.shape[0], *probs.shape[2:], dtype=torch.bool, device=probs.device)
    rgb = chw_to_hwc(image[0])
    return {
        "image": rgb,
        "truth": overlay(rgb, label_rgb(mask[0].cpu().numpy(), num_classes, ignore_index)),
        "prediction": overlay(rgb, label_rgb(probs.argmax(dim=1)[0].cpu().numpy(), num_classes, ignore_index)),
        "weights": weight_rgb(selector(probs, valid).weights[0].float().cpu().numpy()),
    }


PSEUDO_LABEL_COLUMNS = ("weak view", "ground truth", "teacher prediction", "CSL weight", "reliable", "TMP view")


def pseudo_label_panels(
    model: Any,
    batch: Mapping[str, Any],
    *,
    selector: Any,
    num_classes: int,
    ignore_index: int,
) -> list[dict[str, np.ndarray]]:
    """What the selector and TMP make of a batch of unlabelled training rows, one dict of images per row.

    The teacher is `model` in eval mode on the weak view (what a trained checkpoint predicts); the selector sees
    the same probabilities and valid mask as in a training step, and the TMP view blanks the on-cells of
    `tmp_cells` that the selector marks reliable, exactly as the step does (shown in the dataset-mean colour that
    a normalised 0 stands for).

    Args:
        model: segmentation model (any device).
        batch: unlabelled rows (TORCH_DTYPES["unlabeled"]): `image_weak`, `image_masked` uint8 [N, 3, S, S],
            `tmp_cells`, `valid` bool [N, S, S], optional `mask` [N, S, S] (ground truth, diagnostics only).
        selector: `selector(probs, valid) -> Selection`.

    Returns:
        N dicts keyed by PSEUDO_LABEL_COLUMNS, uint8 [S, S, 3] each ("ground truth" is white without `mask`);
        "reliable" is green where the reliable pseudo-label is right, red where it is wrong (grey: unknown), black
        where rejected.
    """
    import torch

    from csl_ray.evaluate import predict
    from csl_ray.masking import apply_tmp
    from csl_ray.model import unwrap

    probs = predict(model, batch["image_weak"], mode="full", crop_size=batch["image_weak"].shape[-1])
    valid = batch["valid"].to(probs.device)
    selection = selector(probs, valid)
    labels, weights, reliable = selection.labels.cpu(), selection.weights.float().cpu(), selection.reliable.cpu()
    # The step's own masking on mean-centred pixels: its 0 is the dataset mean, as a normalised 0 is.
    mean_rgb = (255 * unwrap(model).pixel_mean.cpu()).round().to(torch.int16)
    centred = batch["image_masked"].cpu().to(torch.int16) - mean_rgb
    masked = (apply_tmp(centred, batch["tmp_cells"].cpu(), reliable) + mean_rgb).to(torch.uint8)
    truth = batch["mask"].cpu() if "mask" in batch else torch.full_like(labels, ignore_index)
    rows = []
    for i in range(labels.shape[0]):
        rgb = chw_to_hwc(batch["image_weak"][i])
        known = (truth[i] != ignore_index).numpy()
        right = (labels[i] == truth[i]).numpy()
        status = np.zeros((*labels.shape[1:], 3), dtype=np.uint8)
        on = reliable[i].numpy()
        status[on & known & right] = (60, 200, 80)
        status[on & known & ~right] = (230, 50, 50)
        status[on & ~known] = (150, 150, 150)
        rows.append(
            {
                "weak view": rgb,
                "ground truth": overlay(rgb, label_rgb(truth[i].numpy(), num_classes, ignore_index)),
                "teacher prediction": overlay(rgb, label_rgb(labels[i].numpy(), num_classes, ignore_index)),
                "CSL weight": weight_rgb(weights[i].numpy()),
                "reliable": status,
                "TMP view": chw_to_hwc(masked[i]),
            }
        )
    return rows


def write_pseudo_label_figure(rows: list[dict[str, np.ndarray]], path: str | os.PathLike, title: str = "") -> Path:
    """A grid PNG of `pseudo_label_panels` rows (one image per row, PSEUDO_LABEL_COLUMNS as column titles)."""
    from matplotlib.figure import Figure

    cols = len(PSEUDO_LABEL_COLUMNS)
    fig = Figure(figsize=(1.9 * cols, 1.9 * len(rows) + 0.4), dpi=110)
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, panels in enumerate(rows):
        for c, name in enumerate(PSEUDO_LABEL_COLUMNS):
            ax = axes[r][c]
            ax.imshow(panels[name], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_overlays(
    model: Any, batches: Any, out_dir: str | os.PathLike, *, limit: int = 8, **kwargs: Any
) -> list[Path]:
    """PNG strips of the first `limit` validation batches: image | ground truth | prediction | selector weights.

    Args:
        model: segmentation model.
        batches: validation batches of one image; files are named `<index>.png` after their `index` column.
        out_dir: created if missing.
        kwargs: `val_panels`' keyword arguments (selector, num_classes, mode, crop_size, ignore_index).
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        panels = val_panels(model, batch, **kwargs)
        path = out / f"{int(batch['index'][0]) if 'index' in batch else i:05d}.png"
        Image.fromarray(np.concatenate(list(panels.values()), axis=1)).save(path)
        written.append(path)
    return written
