"""Tests of detection.heads.FCHead against plain matrix products (float64 where it matters)."""
from __future__ import annotations

import logging
import warnings

import numpy as np

import pytest
import torch
from torch import nn

from detection.heads import FEATURE_LAYERS, FCHead


def _head(in_dim: int = 12, hidden: tuple[int, int] = (10, 8), num_classes: int | None = 3,
          seed: int = 0, dtype: torch.dtype = torch.float64) -> FCHead:
    head = FCHead(in_dim, hidden, num_classes=num_classes, generator=torch.Generator().manual_seed(seed))
    return head.to(dtype).eval()


def ref_layers(head: FCHead, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """fc6 / fc7 / fc8 of an eval-mode head written out as matrix products."""
    w6, b6 = head.fc6.weight, head.fc6.bias
    w7, b7 = head.fc7.weight, head.fc7.bias
    fc6 = (x @ w6.T + b6).clamp(min=0)
    fc7 = (fc6 @ w7.T + b7).clamp(min=0)
    out = {"pool5": x, "fc6": fc6, "fc7": fc7}
    if head.fc8 is not None:
        out["fc8"] = fc7 @ head.fc8.weight.T + head.fc8.bias
    return out


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------

def test_features_at_each_layer_match_matrix_products():
    head = _head()
    x = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = ref_layers(head, x)
    shapes = {"pool5": (7, 12), "fc6": (7, 10), "fc7": (7, 8)}
    for layer in FEATURE_LAYERS:
        got = head.features(x, layer)
        assert tuple(got.shape) == shapes[layer]
        torch.testing.assert_close(got, ref[layer], rtol=1e-12, atol=1e-12)
    logits = head(x)
    assert tuple(logits.shape) == (7, 4)                       # K + 1 outputs, 0 = background
    torch.testing.assert_close(logits, ref["fc8"], rtol=1e-12, atol=1e-12)


def test_unknown_layer_and_missing_fc8_are_errors():
    head = _head(num_classes=None)
    x = torch.zeros(2, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown feature layer"):
        head.features(x, "fc8")
    with pytest.raises(RuntimeError, match="no fc8"):
        head(x)


def test_dropout_only_in_training_mode():
    head = FCHead(12, (64, 64), num_classes=2, dropout=0.5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    head.eval()
    a, b = head.features(x, "fc7"), head.features(x, "fc7")
    assert torch.equal(a, b)
    head.train()
    torch.manual_seed(0)
    c = head.features(x, "fc7")
    assert not torch.equal(a, c)        # half of fc6 dropped: fc7 changes


def test_init_is_seeded_by_generator_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = FCHead(20, (30, 40), num_classes=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.rand(3), expected_next)          # global stream untouched
    torch.manual_seed(999)                                    # a different global state ...
    b = FCHead(20, (30, 40), num_classes=5, generator=torch.Generator().manual_seed(7))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka           # ... same weights


def test_init_statistics():
    # fc6/fc7: He init std sqrt(2 / fan_in), zero bias; fc8: the paper's N(0, 0.01^2), zero bias.
    head = FCHead(400, (500, 2048), num_classes=20, generator=torch.Generator().manual_seed(0))
    n8 = head.fc8.weight.numel()                              # 21 x 2048 = 43k samples
    assert tuple(head.fc8.weight.shape) == (21, 2048)
    # The sample std of n Gaussian draws has relative standard error 1/sqrt(2n) (0.34 % here).
    assert abs(head.fc8.weight.std().item() / 0.01 - 1) < 5 / np.sqrt(2 * n8)
    assert abs(head.fc8.weight.mean().item()) < 5 * 0.01 / np.sqrt(n8)
    assert torch.count_nonzero(head.fc8.bias) == 0
    for layer in (head.fc6, head.fc7):
        std = (2.0 / layer.in_features) ** 0.5
        assert abs(layer.weight.std().item() / std - 1) < 5 / np.sqrt(2 * layer.weight.numel())
        assert torch.count_nonzero(layer.bias) == 0


def test_reset_fc8_changes_class_count():
    head = _head(num_classes=3)
    head.reset_fc8(6, torch.Generator().manual_seed(0))
    assert tuple(head.fc8.weight.shape) == (7, 8)
    assert head.fc8.weight.dtype == head.fc7.weight.dtype      # built beside fc7
    x = torch.randn(2, 12, dtype=torch.float64)
    assert tuple(head(x).shape) == (2, 7)


# ---------------------------------------------------------------------------------------------
# load_pretrained
# ---------------------------------------------------------------------------------------------

def _alexnet_like_classifier(in_dim: int, hidden: int) -> nn.Sequential:
    """The layout of torchvision AlexNet's ``classifier[:-1]``: dropout, fc6, relu, dropout, fc7, relu."""
    return nn.Sequential(nn.Dropout(), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(),
                         nn.Linear(hidden, hidden), nn.ReLU())


def test_load_pretrained_copies_fitting_weights():
    src = _alexnet_like_classifier(4 * 36, 16)                # a single 6x6 level of 4 channels
    head = FCHead(4 * 36, (16, 16), num_classes=2, generator=torch.Generator().manual_seed(0))
    fc8_before = head.fc8.weight.clone()
    assert head.load_pretrained(src)
    assert torch.equal(head.fc6.weight, src[1].weight) and torch.equal(head.fc6.bias, src[1].bias)
    assert torch.equal(head.fc7.weight, src[4].weight) and torch.equal(head.fc7.bias, src[4].bias)
    assert torch.equal(head.fc8.weight, fc8_before)            # fc8 stays the fresh one
    head.fc6.weight.data.add_(1.0)                             # a copy, not shared storage
    assert not torch.equal(head.fc6.weight, src[1].weight)


def test_load_pretrained_refuses_mismatched_shapes():
    src = _alexnet_like_classifier(4 * 36, 16)
    head = FCHead(4 * 50, (16, 16), num_classes=2, generator=torch.Generator().manual_seed(0))  # 4 levels
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert not head.load_pretrained(src)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())
    assert not head.load_pretrained(nn.Sequential(nn.Linear(4 * 50, 16)))   # only one Linear
    other_fc7 = nn.Sequential(nn.Linear(4 * 50, 16), nn.Linear(16, 32))
    assert not head.load_pretrained(other_fc7)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Truncated SVD (compress)
# ---------------------------------------------------------------------------------------------

def _effective_weight(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return layer.weight
    first, second = layer[0], layer[1]
    return second.weight @ first.weight


def test_compress_at_full_rank_keeps_the_layers():
    head = _head(in_dim=12, hidden=(10, 8))
    x = torch.randn(6, 12, dtype=torch.float64)
    before = head.features(x, "fc7")
    head.compress(10, 8)                                        # ranks >= min(shape): nothing to cut
    assert isinstance(head.fc6, nn.Linear) and isinstance(head.fc7, nn.Linear)
    assert torch.equal(head.features(x, "fc7"), before)


def test_compress_of_exactly_low_rank_weights_is_exact():
    # Give fc6 / fc7 rank 4 / 3: an SVD truncated at that rank reproduces them exactly, so the
    # compressed head must give the original outputs to float64 precision.
    g = torch.Generator().manual_seed(3)
    head = _head(in_dim=20, hidden=(16, 12), num_classes=2)
    with torch.no_grad():
        head.fc6.weight.copy_(torch.randn(16, 4, generator=g, dtype=torch.float64)
                              @ torch.randn(4, 20, generator=g, dtype=torch.float64))
        head.fc7.weight.copy_(torch.randn(12, 3, generator=g, dtype=torch.float64)
                              @ torch.randn(3, 16, generator=g, dtype=torch.float64))
        head.fc6.bias.copy_(torch.randn(16, generator=g, dtype=torch.float64))
        head.fc7.bias.copy_(torch.randn(12, generator=g, dtype=torch.float64))
    x = torch.randn(9, 20, generator=g, dtype=torch.float64)
    ref = {layer: head.features(x, layer) for layer in ("fc6", "fc7")}
    logits = head(x)
    head.compress(4, 3)
    assert isinstance(head.fc6, nn.Sequential) and isinstance(head.fc7, nn.Sequential)
    assert tuple(head.fc6[0].weight.shape) == (4, 20) and tuple(head.fc6[1].weight.shape) == (16, 4)
    assert head.fc6[0].bias is None
    assert head.fc6[0].weight.dtype == torch.float64           # dtype kept
    for layer in ("fc6", "fc7"):
        torch.testing.assert_close(head.features(x, layer), ref[layer], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(head(x), logits, rtol=1e-10, atol=1e-10)


def test_compress_logs_the_energy_it_keeps(caplog):
    g = torch.Generator().manual_seed(5)
    head = _head(in_dim=10, hidden=(6, 5), num_classes=None)
    with torch.no_grad():
        head.fc6.weight.copy_(torch.randn(6, 10, generator=g, dtype=torch.float64))
    sv = torch.linalg.svdvals(head.fc6.weight.detach())
    kept = 100 * float((sv[:2] ** 2).sum() / (sv ** 2).sum())
    with caplog.at_level(logging.INFO, logger="detection.heads"):
        head.compress(2, 5)                                     # fc7 at full rank: not cut
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [f"fc6: SVD rank 2 of 6 keeps {kept:.1f}% of the squared singular values"]


def test_compress_error_is_the_svd_truncation_error():
    g = torch.Generator().manual_seed(4)
    w6 = torch.randn(24, 30, generator=g, dtype=torch.float64)
    sv = torch.linalg.svdvals(w6)                               # descending
    x = torch.randn(50, 30, generator=g, dtype=torch.float64)
    prev = None
    for rank in (2, 6, 12, 20, 23):
        head = _head(in_dim=30, hidden=(24, 8), num_classes=None)
        with torch.no_grad():
            head.fc6.weight.copy_(w6)
        b6 = head.fc6.bias.clone()
        head.compress(rank, 8)
        w_r = _effective_weight(head.fc6)
        # Eckart-Young: the best rank-r approximation misses exactly the dropped singular values.
        frob = torch.linalg.matrix_norm(w6 - w_r).item()
        assert frob == pytest.approx(torch.sqrt((sv[rank:] ** 2).sum()).item(), rel=1e-9)
        spectral = torch.linalg.matrix_norm(w6 - w_r, ord=2).item()
        assert spectral == pytest.approx(sv[rank].item(), rel=1e-9)
        # Pre-activation error of every input is bounded by the largest dropped singular value.
        err = (x @ w6.T + b6) - head.fc6(x)
        assert bool((err.norm(dim=1) <= sv[rank] * x.norm(dim=1) * (1 + 1e-9)).all())
        total = err.norm().item()
        if prev is not None:
            assert total < prev                                 # more rank, less error
        prev = total
        # Cost: r * (in + out) weights instead of in * out.
        assert sum(p.numel() for p in head.fc6[0].parameters()) + head.fc6[1].weight.numel() == rank * (30 + 24)


def test_compress_keeps_float32_and_device():
    head = FCHead(12, (10, 8), num_classes=2, generator=torch.Generator().manual_seed(0)).eval()
    head.compress(3, 2)
    assert head.fc6[0].weight.dtype == torch.float32
    assert tuple(head(torch.randn(2, 12)).shape) == (2, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compress_on_cuda_stays_on_cuda():
    head = FCHead(12, (10, 8), num_classes=2, generator=torch.Generator().manual_seed(0)).cuda().eval()
    x = torch.randn(3, 12, device="cuda")
    head.compress(3, 2)
    assert all(p.is_cuda for p in head.parameters())
    assert head(x).is_cuda


def test_empty_head_of_a_pool5_detector_passes_pool5_through():
    head = FCHead(40, (0, 0), num_classes=None)
    assert sum(t.numel() for k, t in head.state_dict().items() if k != "input_scale") == 0
    x = torch.randn(3, 40)
    assert torch.equal(head.features(x, "pool5"), x)


def test_input_scale_multiplies_pool5_before_fc6_and_is_saved():
    head = FCHead(6, (5, 4), num_classes=None, dropout=0.0, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(3, 6)
    unscaled = head.features(x * 3.0, "fc7")
    head.input_scale.fill_(3.0)
    torch.testing.assert_close(head.features(x, "fc7"), unscaled)
    assert torch.equal(head.features(x, "pool5"), x)                  # pool5 stays raw (the SVMs scale it)
    assert float(head.state_dict()["input_scale"]) == 3.0


def test_the_empty_head_of_a_pool5_detector_is_built_without_a_warning():
    """hidden (0, 0): no fc layer is used, and torch's zero-element init warning would only
    alarm the user of every pool5 run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = FCHead(56, (0, 0), num_classes=3)
    assert head.fc8.weight.shape == (4, 0)
