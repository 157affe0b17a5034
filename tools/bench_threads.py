#!/usr/bin/env python
"""How torch's CPU threads behave beside other busy processes: a small conv training step timed
with OpenMP's default wait policy (threads spin while waiting) and with OMP_WAIT_POLICY=PASSIVE
(they sleep), in alternating fresh processes so both see the same machine load.

OpenMP reads OMP_WAIT_POLICY once, when torch loads it: each policy runs in its own process.
Run it on a busy machine to see the effect (e.g. beside another copy of the pipeline):

    python tools/bench_threads.py --rounds 5 --steps 20 --threads 2
"""
import argparse
import json
import os
import subprocess
import sys
import time

#: One process's measurement: an AlexNet-shaped trunk, 2 images of 256x256, forward + backward.
#: torch is imported before the package, so the policy is the environment's (unset: OpenMP's).
CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from detection.backbones import build_backbone
trunk = build_backbone("alexnet", seed=0).trunk.train()
x = torch.randn(2, 3, 256, 256)
opt = torch.optim.SGD(trunk.parameters(), lr=1e-4)
times = []
for step in range(int(sys.argv[2]) + 2):
    t0 = time.perf_counter()
    opt.zero_grad()
    trunk(x).square().mean().backward()
    opt.step()
    times.append(time.perf_counter() - t0)
times = sorted(times[2:])                     # two warm-up steps
print(json.dumps({"median_ms": 1000 * times[len(times) // 2]}))
"""


def measure(policy: str | None, threads: int, steps: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="alternating pairs of processes")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per process")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    results: dict[str, list[float]] = {"default (spin)": [], "PASSIVE": []}
    for _ in range(args.rounds):
        results["default (spin)"].append(measure(None, args.threads, args.steps))
        results["PASSIVE"].append(measure("PASSIVE", args.threads, args.steps))
    load = os.getloadavg()[0]
    for name, values in results.items():
        print(f"{name:15s} median step ms per round: {', '.join(f'{v:.0f}' for v in values)}")
    print(f"threads {args.threads}, load average {load:.1f} on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
