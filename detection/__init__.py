"""SPP-net object detection (He et al., 2014) in PyTorch."""
import os

# OpenMP threads that spin while they wait take the CPU from other processes' threads, and
# theirs from ours: beside other jobs on the 2-core dev machine a conv training step took
# 430-680 ms with OpenMP's default policy and 110-180 ms with PASSIVE (tools/bench_threads.py,
# docs/benchmarks.md). OpenMP reads the policy once, when torch loads it, so it is set here,
# before any module of the package imports torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
