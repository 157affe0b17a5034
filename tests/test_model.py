"""Tests of detection.model: the one model file (tensors + JSON metadata, weights_only loading)."""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.errors import ModelError
from detection.model import MODEL_FORMAT, MODEL_VERSION, load_model, prefixed, save_model, unprefixed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"trunk.0.weight": torch.randn(4, 3, 3, 3, generator=g),
            "head.fc6.bias": torch.randn(7, generator=g).double(),
            "svm.weight": torch.randn(2, 5, generator=g).half(),
            "bbox.count": torch.arange(6).reshape(2, 3),
            "mask": torch.tensor([True, False, True]),
            "strided": torch.randn(6, 4, generator=g).T}            # non-contiguous on the way in


META = {"classes": ["cat", "dog"], "settings": {"scales": [688], "nms_iou": 0.3, "method": "spp"},
        "nested": {"none": None, "flag": True, "unicode": "Ωmega"}}


def test_round_trip_gives_equal_tensors_and_meta(tmp_path):
    path = tmp_path / "sub" / "model.pt"                            # parent created
    tensors = _tensors()
    save_model(path, tensors, META)
    loaded, meta = load_model(path)
    assert meta == META
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]   # no temporary file left


def test_saved_file_holds_only_plain_containers(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, _tensors(), META)
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == MODEL_FORMAT and blob["version"] == MODEL_VERSION
    assert json.loads(blob["meta"]) == META


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        save_model(tmp_path / "m.pt", _tensors(), {"array": np.zeros(2)})
    assert not (tmp_path / "m.pt").exists()


def test_overwrite_is_atomic_and_complete(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, {"a": torch.zeros(2)}, {"v": 1})
    save_model(path, {"b": torch.ones(3)}, {"v": 2})
    tensors, meta = load_model(path)
    assert meta == {"v": 2} and list(tensors) == ["b"]


def test_prefixed_and_unprefixed_are_inverse():
    state = {"0.weight": torch.ones(2, requires_grad=True), "1.bias": torch.zeros(1)}
    p = prefixed("trunk", state)
    assert set(p) == {"trunk.0.weight", "trunk.1.bias"} and not p["trunk.0.weight"].requires_grad
    mixed = {**p, "trunkX.other": torch.ones(1), "head.w": torch.ones(1)}
    back = unprefixed("trunk", mixed)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k].detach()) for k in state)


# ---------------------------------------------------------------------------------------------
# Files that are not (safe) model files
# ---------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path)                                          # a folder


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", b"PK\x03\x04garbage",
                                     json.dumps({"format": MODEL_FORMAT}).encode()])
def test_not_a_model_file(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="model.pt"):
        load_model(path)


def test_a_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "nothing here")
    with pytest.raises(ModelError, match="model.pt"):
        load_model(path)


def test_numpy_file_is_refused(tmp_path):
    path = tmp_path / "model.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ModelError):
        load_model(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, fraction):
    path = tmp_path / "model.pt"
    save_model(path, _tensors(), META)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelError, match="model.pt"):
        load_model(path)


class Exploit:
    """Unpickling this object would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("wrap", ["bare", "in_tensors", "as_meta"])
def test_pickled_object_is_refused_without_running_code(tmp_path, wrap):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "model.pt"
    payload = Exploit(marker)
    if wrap == "bare":
        blob = payload
    elif wrap == "in_tensors":
        blob = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": "{}", "tensors": {"x": payload}}
    else:
        blob = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": payload, "tensors": {}}
    torch.save(blob, path)
    with pytest.raises(ModelError, match="model.pt"):
        load_model(path)
    assert not marker.exists()
    # Sanity check of the test itself: a plain unpickler does run the code.
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        raw = z.read(name)
    pickle.loads(raw)
    assert marker.read_text() == "code ran"


def _save_blob(path: Path, **overrides) -> None:
    blob = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "meta": json.dumps({"a": 1}),
            "tensors": {"w": torch.zeros(2)}}
    blob.update(overrides)
    torch.save({k: v for k, v in blob.items() if v is not ...}, path)


@pytest.mark.parametrize("overrides, message", [
    ({"format": "something-else"}, "not a detection model"),
    ({"version": MODEL_VERSION + 1}, "version"),
    ({"meta": "{not json"}, "damaged"),
    ({"meta": ...}, "damaged"),
    ({"tensors": ...}, "damaged"),
    ({"meta": 5}, "damaged"),
    ({"meta": "[1, 2]"}, "damaged"),                  # JSON, but not an object
    ({"tensors": {"w": [1, 2, 3]}}, "damaged"),        # allowed by weights_only, but not a tensor
    ({"tensors": ["abc"]}, "damaged"),
    ({"tensors": [1, 2]}, "damaged"),
])
def test_wrong_content_is_a_model_error(tmp_path, overrides, message):
    path = tmp_path / "model.pt"
    _save_blob(path, **overrides)
    with pytest.raises(ModelError, match=message):
        load_model(path)


def test_plain_state_dict_is_not_a_model(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ModelError, match="not a detection model"):
        load_model(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "model.pt"
    save_model(path, {"a": torch.zeros(1)}, {})
    path.chmod(0)
    try:
        with pytest.raises(ModelError, match="model.pt"):
            load_model(path)
    finally:
        path.chmod(0o600)
