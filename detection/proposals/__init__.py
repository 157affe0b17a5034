"""Region proposals: selective search on one image (:mod:`.search`), the proposals of a set of
images and their file (:mod:`.proposal_set`), a dataset's proposals computed in parallel into a
resumable cache (:mod:`.cache`), R-CNN's published boxes (:mod:`.rcnn_mat`), proposal recall
(:mod:`.recall`) and a split's proposals with their summary (:mod:`.summary`, what
``tools/compute_proposals.py`` runs).

Every box is in the library's convention (:mod:`detection.boxes`): float32
``(x1, y1, x2, y2)``, 0-based, continuous, in ORIGINAL image pixels.
"""
from .cache import compute_proposals, proposal_cache_key
from .proposal_set import FORMAT_VERSION, ProposalSet
from .rcnn_mat import load_rcnn_mat
from .recall import proposal_recall
from .search import SelectiveSearchConfig, selective_search, xywh_to_internal
from .summary import compute_split_proposals

__all__ = [
    "SelectiveSearchConfig",
    "selective_search",
    "xywh_to_internal",
    "ProposalSet",
    "compute_proposals",
    "compute_split_proposals",
    "proposal_cache_key",
    "load_rcnn_mat",
    "proposal_recall",
    "FORMAT_VERSION",
]
