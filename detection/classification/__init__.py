"""SPP-net's classification half (paper Sec. 2-3): a trunk + SPP + fc classifier that takes any
input size, its no-SPP baseline, the single / multi / any-size training regimes, the centre /
ten / full / multi-view tests, scale robustness, and the ImageFolder / VOC image-label data.

Modules: :mod:`.config` (settings), :mod:`.data` (layouts), :mod:`.datasets` (benchmark sets),
:mod:`.model` (network, ``classifier.pt``), :mod:`.buckets` and :mod:`.regimes` (what an
epoch feeds), :mod:`.training`, :mod:`.views` and :mod:`.metrics` (testing),
:mod:`.robustness`, :mod:`.api` (what the tools call). See docs/classification.md.
"""
from .api import resolve_config, run_evaluation, run_training, score_text
from .config import ClassifierConfig, ModelConfig, TestConfig, TrainConfig
from .data import ClassificationSet, ClassSample, read_split
from .datasets import make_crop_folder, make_scale_folder
from .model import SPPClassifier, build_classifier, load_classifier, save_classifier
from .training import train_classifier
from .views import evaluate, score_image

__all__ = ["score_text", "ClassifierConfig", "ModelConfig", "TrainConfig", "TestConfig", "ClassificationSet", "ClassSample",
           "read_split", "make_crop_folder", "make_scale_folder", "SPPClassifier", "build_classifier",
           "load_classifier", "save_classifier", "train_classifier", "evaluate", "score_image",
           "resolve_config", "run_training", "run_evaluation"]
