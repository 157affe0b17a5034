#!/usr/bin/env python
"""The prepared check of the GPU path, for a machine with CUDA GPUs (none was at hand when it was
written: until its output is recorded in docs/benchmarks.md the GPU path is untested).

Three steps, each written to OUT:

1. the tests that need CUDA (those skipped without it: ``pytest -m "" -k "cuda or gpu"``),
   ``cuda_tests.xml`` / ``cuda_tests.txt``;
2. the NCCL path: the pipeline on a small synthetic config, ``torchrun --nproc-per-node`` = the
   number of GPUs (one process per GPU, ``--device auto`` = ``cuda:LOCAL_RANK``, NCCL beside
   gloo) against one process on ``cuda``: the same model tensors, detections and mAP, as
   tests/test_distributed.py checks on gloo (``nccl.json``; not run with one GPU: NCCL needs one
   GPU per process);
3. SPP-net against R-CNN on GPU (the paper's Table 10), 1 and 5 scales, ZF-5
   (``timing_1scale.json``, ``timing_5scales.json`` and their tables).

``OUT/summary.md`` says what passed; the exit status is 0 only when every step did. Without a
visible GPU it stops at once with ``error: ...`` and exit status 2.

    python tools/gpu_check.py --out gpu_check --data $DATA/raccoon
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"

#: The pipeline of step 2: tests/test_distributed.py's small config, the conv maps at one larger scale.
NCCL_CONFIG = """
data: {flip: false}
proposals: {max_boxes: 100, resize_to: 320, min_size: 16}
proposal_workers: 0
backbone: {name: alexnet, weights: null}
features: {scales: [320], workers: 0}
train: {svm: {norm_images: 4}}
metric: voc07
timing: {enabled: false}
"""


def run(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``: (exit status, seconds); 124 past ``timeout``."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT,
                                env=env).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def cuda_tests(out: Path) -> dict:
    xml = out / "cuda_tests.xml"
    rc, seconds = run([sys.executable, "-m", "pytest", "-q", "-m", "", "-k", "cuda or gpu", "-rs", "tests",
                       f"--junitxml={xml}"], out / "cuda_tests.txt", 1800)
    passed, failed, skipped = [], [], []
    if xml.exists():
        for case in ET.parse(xml).iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            elif case.find("skipped") is not None:
                skipped.append(f"{name}: {case.find('skipped').get('message')}")
            else:
                passed.append(name)
    # The one test skipped with a GPU is the refusal of cuda on a machine without one.
    unexpected = [s for s in skipped if "without CUDA" not in s]
    ok = rc == 0 and passed and not failed and not unexpected
    return {"ok": bool(ok), "exit_status": rc, "seconds": round(seconds, 1), "passed": passed, "failed": failed,
            "skipped": skipped}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def nccl_path(out: Path, gpus: int, one: str = "cuda", many: str = "auto") -> dict:
    """The pipeline on ``gpus`` processes (``--device many``) against one (``--device one``)."""
    if gpus < 2:
        return {"ok": True, "ran": False, "why": f"{gpus} GPU: NCCL needs one GPU per process, so 2 or more"}
    from detection.data.synthetic import make_synthetic_voc
    from detection.model import load_model

    work = out / "nccl"
    data = make_synthetic_voc(work / "voc", num_trainval=8, num_test=4, seed=0)
    config = work / "small.yaml"
    config.write_text(NCCL_CONFIG)
    pipeline = [str(TOOLS / "run_pipeline.py"), "--data", str(data), "--config", str(config), "--quiet"]
    rc1, s1 = run([sys.executable, *pipeline, "--out", str(work / "one"), "--device", one], work / "one.log", 1800,
                  _env())
    rcn, sn = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                   *pipeline, "--out", str(work / "many"), "--device", many], work / "many.log", 1800,
                  _env(DETECTION_DIST_TIMEOUT="600"))
    report = {"ran": True, "processes": gpus, "exit_status": [rc1, rcn], "seconds": [round(s1, 1), round(sn, 1)]}
    if rc1 or rcn:
        return {**report, "ok": False, "why": "a run failed: see nccl/one.log, nccl/many.log"}
    (a, _), (b, _) = load_model(work / "one" / "model.pt"), load_model(work / "many" / "model.pt")
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a if k in b}
    close = set(a) == set(b) and all(np.allclose(b[k].double().numpy(), a[k].double().numpy(), rtol=1e-5, atol=1e-6)
                                     for k in a)
    m1 = json.loads((work / "one" / "metrics.json").read_text())
    mn = json.loads((work / "many" / "metrics.json").read_text())
    return {**report, "ok": bool(close and abs(m1["mAP"] - mn["mAP"]) <= 1e-6), "mAP": [m1["mAP"], mn["mAP"]],
            "max_abs_diff": diffs, "tolerance": "rtol 1e-5, atol 1e-6 (tests/test_distributed.py's)"}


def timing(out: Path, data: str | None) -> dict:
    if data is None:
        from detection.data.synthetic import make_synthetic_voc
        data = str(make_synthetic_voc(out / "timing_voc", num_trainval=2, num_test=3, seed=0))
    report = {"data": data}
    for name, scales in (("1scale", "1"), ("5scales", "5")):
        rc, seconds = run([sys.executable, str(TOOLS / "compare_rcnn.py"), "--data", data, "--split", "test",
                           "--num-images", "3", "--backbone", "zf5", "--scales", scales, "--device", "cuda",
                           "--svd", "1024", "256", "--out", str(out / f"timing_{name}.json")],
                          out / f"timing_{name}.txt", 3600, _env())
        report[name] = {"ok": rc == 0, "exit_status": rc, "seconds": round(seconds, 1)}
    report["ok"] = all(report[n]["ok"] for n in ("1scale", "5scales"))
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for every output of the check")
    p.add_argument("--data", help="VOC-layout folder for the timing table (default: a generated synthetic set)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch (torch.cuda.is_available() is False): this script checks the "
              "GPU path and needs one; nothing was run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)],
           "nccl": str(torch.cuda.nccl.version()) if torch.distributed.is_nccl_available() else None}
    steps = {"environment": env}
    for name, step in (("cuda_tests", lambda: cuda_tests(out)), ("nccl", lambda: nccl_path(out, gpus)),
                       ("timing", lambda: timing(out, args.data))):
        steps[name] = step()
        (out / "gpu_check.json").write_text(json.dumps(steps, indent=1))
        print(f"{name}: {'ok' if steps[name]['ok'] else 'FAILED'}", flush=True)
    lines = [f"# GPU check: {', '.join(env['gpus'])}; torch {env['torch']}, CUDA {env['cuda']}, NCCL {env['nccl']}", ""]
    for name in ("cuda_tests", "nccl", "timing"):
        lines.append(f"- {name}: {'ok' if steps[name]['ok'] else 'FAILED'}: "
                     f"{json.dumps({k: v for k, v in steps[name].items() if k not in ('ok', 'max_abs_diff')})}")
    for name in ("1scale", "5scales"):
        table = out / f"timing_{name}.txt"
        if table.exists():
            lines += ["", f"## SPP-net vs R-CNN, {name}", "", "```", table.read_text().strip(), "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/summary.md")
    return 0 if all(steps[n]["ok"] for n in ("cuda_tests", "nccl", "timing")) else 1


if __name__ == "__main__":
    sys.exit(main())
