"""Evaluation: the PASCAL VOC devkit protocol (:mod:`.voc`), COCO-style metrics through
pycocotools (:mod:`.coco`) and precision/recall plots (:mod:`.plots`)."""
from .voc import (METRICS, ClassDetections, ClassEvaluation, VOCEvaluator, default_metric, detections_by_class,
                  evaluate_class, evaluate_detections, evaluate_result_dir, read_result_dir, read_result_file,
                  voc_ap, write_result_files)

__all__ = ["METRICS", "ClassDetections", "ClassEvaluation", "VOCEvaluator", "default_metric", "detections_by_class",
           "evaluate_class", "evaluate_detections", "evaluate_result_dir", "read_result_dir", "read_result_file",
           "voc_ap", "write_result_files"]
