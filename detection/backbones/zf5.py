"""The paper's ZF-5 conv trunk and its within-channel local response normalisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WithinChannelLRN", "ZF5"]


class WithinChannelLRN(nn.Module):
    """Caffe's ``lrn`` with ``norm_region: WITHIN_CHANNEL``, as in the SPP_net ZF-5 model
    (``model-defs/Zeiler_conv5.prototxt``: local_size 3, alpha 5e-5, beta 0.75).

    ``y = x / (1 + alpha / size^2 * sum_{size x size window} x^2) ^ beta`` (zero padding).
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75) -> None:
        super().__init__()
        self.size, self.alpha, self.beta = size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # avg_pool2d with count_include_pad divides by size^2, which is Caffe's alpha / n^2.
        mean_sq = F.avg_pool2d(x * x, self.size, stride=1, padding=self.size // 2, count_include_pad=True)
        return x / (1.0 + self.alpha * mean_sq).pow(self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}"


class ZF5(nn.Module):
    """The paper's ZF-5 conv trunk (Table 1 of the TPAMI paper, "ZF-5"), padded ``floor(p/2)``.

    The official code's prototxt pads conv1 by 1 and nothing else (and compensates with
    ``offset0 = 21`` in the window projection); the paper's appendix pads every layer by
    ``floor(p/2)``, which makes the conv5 map ``ceil(H/16) x ceil(W/16)`` and cell ``j`` centred on
    pixel ``16 j``. We follow the paper. ``features`` holds the layers so that state-dict keys look
    like torchvision's (``features.0.weight``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2, padding=3),      # conv1
            nn.ReLU(inplace=True),
            WithinChannelLRN(),                                         # norm1
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),           # pool1
            nn.Conv2d(96, 256, kernel_size=5, stride=2, padding=2),     # conv2
            nn.ReLU(inplace=True),
            WithinChannelLRN(),                                         # norm2
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),           # pool2
            nn.Conv2d(256, 384, kernel_size=3, padding=1),              # conv3
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=3, padding=1),              # conv4
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),              # conv5
            nn.ReLU(inplace=True),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init keeps activations from vanishing through 5 ReLU layers, so random
                # ZF-5 features are usable for tests; the Caffe model used N(0, 0.01) and
                # ImageNet pre-training, which we cannot reproduce here.
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)
