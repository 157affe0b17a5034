import numpy as np
import torch

from detection.boxes import box_iou, box_iou_numpy, flip_boxes, internal_to_voc, valid_boxes_mask, voc_to_internal


def devkit_iou(a, b):
    """The VOC devkit's IoU on 1-based inclusive boxes (+1 areas)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / union


def test_voc_round_trip_and_single_pixel():
    voc = np.array([[1, 1, 1, 1], [10, 20, 30, 40]], dtype=np.float64)
    internal = voc_to_internal(voc)
    # A 1-based pixel (1, 1) is the 0-based continuous square [0, 1) x [0, 1).
    np.testing.assert_array_equal(internal[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(internal[1], [9, 19, 30, 40])
    np.testing.assert_array_equal(internal_to_voc(internal), voc)


def test_iou_equals_devkit_iou():
    rng = np.random.default_rng(0)
    a = rng.integers(1, 50, size=(30, 2))
    a = np.concatenate([a, a + rng.integers(0, 30, size=(30, 2))], axis=1).astype(np.float64)
    b = rng.integers(1, 50, size=(20, 2))
    b = np.concatenate([b, b + rng.integers(0, 30, size=(20, 2))], axis=1).astype(np.float64)
    ours = box_iou_numpy(voc_to_internal(a), voc_to_internal(b))
    ref = np.array([[devkit_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    tv = box_iou(torch.from_numpy(voc_to_internal(a)).double(), torch.from_numpy(voc_to_internal(b)).double())
    np.testing.assert_allclose(tv.numpy(), ref, atol=1e-6)


def test_flip_is_an_involution_and_mirrors_pixels():
    width = 20
    boxes = np.array([[0, 0, 5, 5], [14, 2, 20, 9]], dtype=np.float32)
    flipped = flip_boxes(boxes, width)
    np.testing.assert_array_equal(flipped, [[15, 0, 20, 5], [0, 2, 6, 9]])
    np.testing.assert_array_equal(flip_boxes(flipped, width), boxes)
    # Pixels inside the box stay inside after mirroring the image.
    img = np.zeros((10, width), dtype=np.uint8)
    img[2:9, 14:20] = 1
    mirrored = img[:, ::-1]
    x1, y1, x2, y2 = flipped[1].astype(int)
    assert mirrored[y1:y2, x1:x2].all() and mirrored.sum() == img.sum() == mirrored[y1:y2, x1:x2].sum()
    t = flip_boxes(torch.from_numpy(boxes), width)
    np.testing.assert_array_equal(t.numpy(), flipped)


def test_valid_boxes_mask():
    boxes = np.array([[0, 0, 1, 1], [5, 5, 5, 9], [0, 0, np.nan, 3], [30, 0, 40, 4]])
    assert valid_boxes_mask(boxes).tolist() == [True, False, False, True]
    assert valid_boxes_mask(boxes, width=20, height=20).tolist() == [True, False, False, False]
