"""The fully connected layers on top of the pooled window features: fc6, fc7 and the (K+1)-way
fc8 used while fine-tuning.

The paper fine-tunes fc6/fc7/fc8 on SPP features of windows with the conv layers frozen; the
SVMs are then trained on fc7 (or pool5 / fc6) features. :class:`FCHead` computes those layers.
"""
from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["FCHead", "FEATURE_LAYERS"]

log = logging.getLogger(__name__)

#: Layers whose output the SVMs can be trained on.
FEATURE_LAYERS = ("pool5", "fc6", "fc7")

#: Consecutive chunks of a batch's rows and the generator each chunk's dropout masks come from.
RowGenerators = Sequence[tuple[int, torch.Generator]]


class FCHead(nn.Module):
    """fc6 -> ReLU -> dropout -> fc7 -> ReLU -> dropout [-> fc8].

    Args:
        in_dim: length of the pooled window vector (C * sum(n*n)).
        hidden: widths of fc6 and fc7 (4096 in ZF-5/AlexNet/VGG16).
        num_classes: K object classes; fc8 has K + 1 outputs (0 = background), or no fc8 when None.
        dropout: dropout probability after fc6 and fc7 (0.5 in the paper's code).
        generator: seeds the initialisation without touching torch's global RNG.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, int] = (4096, 4096), num_classes: int | None = None,
                 dropout: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.hidden = tuple(hidden)
        # nn.Linear's default init draws from torch's global RNG; fork it so building a head
        # leaves the caller's random stream untouched (every weight is overwritten from
        # ``generator`` below anyway).
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # hidden (0, 0) is the empty head of a pool5 detector (no fc layer used or stored).
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.fc6 = nn.Linear(in_dim, hidden[0])
            self.fc7 = nn.Linear(hidden[0], hidden[1])
        # Multiplies pooled vectors before fc6. 1 for pretrained fc layers (trained on raw pool5);
        # fc layers that start from scratch get a scale bringing pool5 to the size their init
        # assumes (raw SqueezeNet pool5 has norm ~1e4: fine-tuning on it diverged).
        self.register_buffer("input_scale", torch.ones(()))
        self.dropout = nn.Dropout(dropout)
        self.fc8: nn.Linear | None = None
        self.svd_ranks: dict[str, int] = {}     # layers truncated by compress(): {"fc6": rank, ...}
        self._init(generator)
        if num_classes is not None:
            self.reset_fc8(num_classes, generator)

    @torch.no_grad()
    def _init(self, generator: torch.Generator | None) -> None:
        for layer in (self.fc6, self.fc7):
            if layer.weight.numel() == 0:
                continue
            # He-style init keeps activations of a randomly initialised head in a usable range.
            std = (2.0 / layer.in_features) ** 0.5
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
            layer.bias.zero_()

    @torch.no_grad()
    def reset_fc8(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """A fresh (K+1)-way fc8 with the paper's Gaussian init (sigma = 0.01), zero bias."""
        weight = torch.randn((num_classes + 1, self.hidden[1]), generator=generator) * 0.01
        # fc8 lives beside fc7 (device, dtype) and is built without drawing from the global RNG.
        ref = self.fc7.weight if isinstance(self.fc7, nn.Linear) else next(self.fc7.parameters())
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")   # the empty head's
            fc8 = nn.Linear(self.hidden[1], num_classes + 1, device=ref.device, dtype=ref.dtype)
        fc8.weight.copy_(weight)
        fc8.bias.zero_()
        self.fc8 = fc8

    def load_pretrained(self, head: nn.Module) -> bool:
        """Copy fc6/fc7 from a backbone's pretrained head (its Linear layers, in order) when the
        shapes fit (e.g. a single 6x6 pyramid level for AlexNet/VGG16). Returns whether it did."""
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            return False
        src6, src7 = linears[0], linears[1]
        if src6.weight.shape != self.fc6.weight.shape or src7.weight.shape != self.fc7.weight.shape:
            log.info("pretrained fc6/fc7 %s/%s do not fit the pyramid's %s/%s: fc layers start from scratch",
                     tuple(src6.weight.shape), tuple(src7.weight.shape),
                     tuple(self.fc6.weight.shape), tuple(self.fc7.weight.shape))
            return False
        with torch.no_grad():
            self.fc6.load_state_dict(src6.state_dict())
            self.fc7.load_state_dict(src7.state_dict())
        return True

    def features(self, pooled: torch.Tensor, layer: str = "fc7", rows: RowGenerators | None = None) -> torch.Tensor:
        """Window features at ``layer`` ("pool5", "fc6" or "fc7"; after ReLU, no dropout at eval).

        Args:
            pooled: Tensor[N, in_dim] pooled window vectors.
            rows: in training, dropout masks drawn chunk by chunk (see :meth:`_drop`).
        Returns:
            Tensor[N, D].
        """
        if layer == "pool5":
            return pooled
        x = torch.relu(self.fc6(pooled * self.input_scale))
        if layer == "fc6":
            return x
        if layer != "fc7":
            raise ValueError(f"unknown feature layer {layer!r}; choose from {FEATURE_LAYERS}")
        return torch.relu(self.fc7(self._drop(x, rows)))

    def forward(self, pooled: torch.Tensor, rows: RowGenerators | None = None) -> torch.Tensor:
        """Class logits Tensor[N, K+1] (needs fc8); ``rows``: see :meth:`_drop`."""
        if self.fc8 is None:
            raise RuntimeError("FCHead has no fc8: build it with num_classes to classify")
        return self.fc8(self._drop(self.features(pooled, "fc7", rows), rows))

    def _drop(self, x: torch.Tensor, rows: RowGenerators | None) -> torch.Tensor:
        """Dropout. With ``rows`` [(count, generator), ...] covering x's rows in order, each
        chunk's mask comes from its own generator: the rows of an image get the same mask
        whichever process computes them (fine-tuning split over processes)."""
        p = self.dropout.p
        if rows is None or not self.training or p == 0:
            return self.dropout(x)
        if p >= 1:
            return torch.zeros_like(x)
        keep = torch.cat([torch.empty((n, x.shape[1])).bernoulli_(1 - p, generator=g) for n, g in rows])
        return x * keep.to(x) / (1 - p)

    @torch.no_grad()
    def compress(self, rank6: int, rank7: int) -> "FCHead":
        """Replace fc6 / fc7 by truncated SVDs (Fast R-CNN, section 3.1): ``W ~ U_r S_r V_r^T``
        becomes two layers, ``V_r^T`` then ``U_r S_r`` (+ bias), costing ``r * (in + out)``
        instead of ``in * out`` multiply-adds per window."""
        for name, rank in (("fc6", rank6), ("fc7", rank7)):
            layer = getattr(self, name)
            if not isinstance(layer, nn.Linear) or rank >= min(layer.weight.shape):
                continue
            u, s, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
            # The share of squared singular values kept (the Frobenius error is the rest): a
            # layer trained briefly from scratch keeps its random init's flat spectrum, and a
            # low rank then loses much of it (docs/benchmarks.md, "SVD fc").
            energy = float((s[:rank] ** 2).sum() / (s ** 2).sum())
            log.info("%s: SVD rank %d of %d keeps %.1f%% of the squared singular values",
                     name, rank, min(layer.weight.shape), 100 * energy)
            first, second = self.factorize(name, rank)
            first.weight.copy_(vh[:rank])
            second.weight.copy_(u[:, :rank] * s[:rank])
            second.bias.copy_(layer.bias)
        return self

    @torch.no_grad()
    def factorize(self, name: str, rank: int) -> tuple[nn.Linear, nn.Linear]:
        """Replace Linear ``name`` by an (uninitialised) rank-``rank`` pair of layers and return
        them; :meth:`compress` fills them from the SVD, a model file's loader from its tensors."""
        layer = getattr(self, name)
        # The new layers live where the old one did (device) and keep its dtype.
        like = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        with torch.random.fork_rng(devices=[]):
            first = nn.Linear(layer.in_features, rank, bias=False, **like)
            second = nn.Linear(rank, layer.out_features, **like)
        setattr(self, name, nn.Sequential(first, second))
        self.svd_ranks[name] = rank
        return first, second

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden={self.hidden}"
