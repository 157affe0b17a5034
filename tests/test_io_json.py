"""metrics.json and timing.json are strict JSON: NaN (a class without ground truth) becomes null."""
import json
import math

from detection.io.jsonfile import read_json, write_json
from detection.report import ap_table


def test_write_json_writes_undefined_values_as_null(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"metric": "voc07", "mAP": 0.5, "AP": {"a": 0.5, "b": math.nan}, "r": [math.inf, 1.0]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))   # strict parse
    assert read_json(path) == {"metric": "voc07", "mAP": 0.5, "AP": {"a": 0.5, "b": None}, "r": [None, 1.0]}


def test_ap_table_reads_metrics_back_from_disk(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"metric": "voc07", "mAP": math.nan, "AP": {"a": math.nan}})
    table = ap_table(read_json(path))
    assert "| a | n/a (no ground truth) |" in table and "| **mAP (voc07)** | n/a |" in table
