"""SPP's original use (paper Sec. 2.3): a CNN with an SPP layer before the fc layer accepts any
input size; trained with multi-size training (two sizes, alternating per epoch), it classifies
images of a third size it never saw."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from detection.features.pooling import SpatialPyramidPooling


def make_shapes(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n grey images [n, 1, size, size]: a bright filled square (label 0) or disc (label 1) of
    random size and position on a noisy dark background."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images = rng.normal(0.0, 0.15, size=(n, size, size))
    labels = rng.integers(0, 2, size=n)
    for k in range(n):
        r = rng.uniform(0.18, 0.32) * size                  # half side / radius
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if labels[k] == 0:
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        images[k][mask] += 1.0
    return torch.from_numpy(images[:, None].astype(np.float32)), torch.from_numpy(labels)


class SPPNet(nn.Module):
    """conv-relu-pool, conv-relu, SPP {4, 2, 1}, fc: a fixed-length output for any input size."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.spp = SpatialPyramidPooling((4, 2, 1))
        self.fc = nn.Linear(self.spp.output_size(32), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.spp(self.features(x)))


def test_multi_size_training_generalises_to_an_unseen_size():
    rng = np.random.default_rng(0)
    train = {s: make_shapes(256, s, rng) for s in (32, 48)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = SPPNet()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for epoch in range(12):
            x, y = train[(32, 48)[epoch % 2]]                 # alternate the input size per epoch
            for idx in torch.randperm(len(y), generator=gen).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
    net.eval()
    for size in (40, 64):                                     # sizes never trained on
        x, y = make_shapes(200, size, rng)
        with torch.no_grad():
            acc = (net(x).argmax(1) == y).float().mean().item()
        assert acc > 0.85, (size, acc)
