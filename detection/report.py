"""``OUT/report.md``: per-class AP, the timing table, PR curves and a few detected images; and the
same as one self-contained ``OUT/report.html`` (:mod:`detection.report_html`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import cv2

from .evaluation.inference import iter_detections
from .io.files import atomic_path, atomic_write_text
from .report_html import write_html_report
from .visualize import draw_detections, shown_detections

__all__ = ["write_report", "timing_table", "ap_table", "calibration_table"]

log = logging.getLogger(__name__)


def _defined(value: Any) -> bool:
    return value is not None and value == value


def ap_table(metrics: dict[str, Any]) -> str:
    lines = ["| class | AP |", "| --- | --- |"]
    # AP is NaN in memory and null in metrics.json for a class without ground truth.
    for name, ap in metrics["AP"].items():
        lines.append(f"| {name} | {ap:.3f} |" if _defined(ap) else f"| {name} | n/a (no ground truth) |")
    m = metrics["mAP"]
    lines.append(f"| **mAP ({metrics['metric']})** | **{m:.3f}** |" if _defined(m) else
                 f"| **mAP ({metrics['metric']})** | n/a |")
    return "\n".join(lines)


def timing_table(timing: dict[str, Any]) -> str:
    """The paper's Table 10 layout: seconds per image per stage, both methods, speed-ups."""
    rows = ["| stage | SPP-net (s/img) | R-CNN (s/img) | speed-up | FLOP ratio |", "| --- | --- | --- | --- | --- |"]
    flops = timing.get("flops", {})
    for stage in ("conv", "pool", "fc", "svm", "nms", "total"):
        s, r = timing["spp"][stage], timing["rcnn"][stage]
        speed = f"{r / s:.1f}x" if s > 0 else "-"
        fr = "-"
        if flops and flops["spp"].get(stage):
            fr = f"{flops['rcnn'][stage] / flops['spp'][stage]:.1f}x"
        rows.append(f"| {stage} | {s:.4f} | {r:.4f} | {speed} | {fr} |")
    rows.append("")
    rows.append(f"{timing['num_images']} images, {timing['num_windows']} windows per image, device: "
                f"{timing['device']}; `pool` is window pooling for SPP-net and crop + warp for R-CNN; "
                "proposals excluded, as in the paper.")
    return "\n".join(rows)


def calibration_table(calibration: dict[str, Any]) -> str:
    """The reliability diagram of the test split's detections as a table, with the ECE."""
    rows = ["| probability | detections | mean probability | fraction correct |", "| --- | --- | --- | --- |"]
    for b in calibration["bins"]:
        rows.append(f"| {b['low']:.1f}-{b['high']:.1f} | {b['count']} | {b['mean_probability']:.3f} | "
                    f"{b['fraction_correct']:.3f} |")
    above = calibration["above_threshold"]
    # metrics.json writes an undefined value (no detection at all, none above the threshold) as null.
    ece = f"{calibration['ece']:.3f}" if _defined(calibration["ece"]) else "n/a"
    right = (f", {above['fraction_correct']:.3f} of them correct" if _defined(above["fraction_correct"]) else "")
    rows += ["", f"Expected calibration error {ece} over {calibration['num_detections']} "
             f"detections (correct: IoU >= {calibration['iou']} with an object of the class); "
             f"{above['count']} at probability >= {above['threshold']}{right}."]
    return "\n".join(rows)


def box_voting_text(vote_iou: float | None) -> str:
    return "" if vote_iou is None else f", box voting over windows at IoU >= {vote_iou}"


def nms_choice_text(choice: Any) -> str:
    """How the NMS threshold was chosen on the calibration's held-out folds ("" when it was not)."""
    if not isinstance(choice, dict) or not isinstance(choice.get("held_out_map"), dict):
        return ""
    maps = ", ".join(f"{t}: {m:.3f}" if isinstance(m, (int, float)) else f"{t}: -"
                     for t, m in choice["held_out_map"].items())
    return f" (chosen on the held-out folds of the training images, their mAP at each choice: {maps})"


def write_report(out: Path, metrics: dict[str, Any], timing: dict[str, Any] | None, dataset: Any, detector: Any,
                 proposals_fn: Callable, num_images: int = 4) -> Path:

    out = Path(out)
    parts = ["# SPP-net detection report", "",
             f"Data: `{dataset.root}` split `{dataset.split}` ({len(dataset)} images), classes: "
             f"{', '.join(dataset.classes)}. Method: `{detector.settings.method}`, backbone "
             f"`{detector.backbone.name}` ({detector.backbone.weights_id}), scales {list(detector.settings.scales)}, "
             f"SVMs on `{detector.settings.feature_layer}`, NMS at IoU {detector.settings.nms_iou}"
             f"{nms_choice_text(metrics.get('nms_choice'))}{box_voting_text(detector.settings.box_vote_iou)}.", "",
             "## Accuracy", "", ap_table(metrics), ""]
    if "coco" in metrics:
        parts += [f"COCO-style: AP@[.5:.95] {metrics['coco']['AP']:.3f}, AP50 {metrics['coco']['AP50']:.3f}, "
                  f"AP75 {metrics['coco']['AP75']:.3f}", ""]
    curves = sorted((out / "pr_curves").glob("*.png")) if (out / "pr_curves").is_dir() else []
    if curves:
        parts += ["## Precision / recall", ""] + [f"![{p.stem}](pr_curves/{p.name})" for p in curves] + [""]
    if timing:
        parts += ["## Speed: SPP-net against R-CNN", "", timing_table(timing), ""]
    if "stage_seconds" in metrics:
        parts += ["## Stage times (s, this run)", "", "| stage | s |", "| --- | --- |"]
        parts += [f"| {k} | {v} |" for k, v in metrics["stage_seconds"].items()] + [""]
    if "calibration" in metrics:
        parts += ["## Score calibration", "", calibration_table(metrics["calibration"]), ""]
    pics = out / "detections"
    pics.mkdir(exist_ok=True)
    pictures = []
    caption = ""
    for record, image, dets in iter_detections(detector, dataset.records[:num_images], proposals_fn):
        mask, values, caption = shown_detections(dets)
        drawn = draw_detections(image, dets.boxes[mask], dets.labels[mask], values[mask], detector.classes,
                                -float("inf"))
        path = pics / f"{record.image_id}.png"
        with atomic_path(path, suffix=".png") as tmp:
            ok, buf = cv2.imencode(".png", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            tmp.write_bytes(buf.tobytes())
        pictures.append(f"![{record.image_id}](detections/{path.name})")
    parts += [f"## Detections ({caption})", ""] + pictures
    atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
    write_html_report(out / "report.md")
    return out / "report.md"
