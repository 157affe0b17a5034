"""Datasets: VOC-layout reader, image records and the embedded synthetic dataset."""
from .images import load_image, read_image
from .records import ImageRecord
from .synthetic import SYNTHETIC_CLASSES, make_synthetic_voc
from .voc import VOC_CLASSES, VOCDataset, flip_record

__all__ = ["ImageRecord", "VOCDataset", "VOC_CLASSES", "SYNTHETIC_CLASSES", "flip_record", "load_image",
           "make_synthetic_voc", "read_image"]
