#!/usr/bin/env python3
"""fp32 GEMM throughput of numpy's BLAS (OpenBLAS in the PyPI wheels) at
given shapes: the reference the embed bench prints beside the `gemm` crate.

Usage: blas-gemm.py REPEATS M,K,N[,BATCH] ...
Prints one line: the GFLOP/s over all shapes (total FLOPs / total time, best
of REPEATS), then the BLAS numpy uses.
"""
import sys
import time

import numpy as np


def main() -> int:
    repeats = int(sys.argv[1])
    shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[2:]]
    rng = np.random.default_rng(7)
    work = []
    flops = 0
    for shape in shapes:
        m, k, n = shape[:3]
        batch = shape[3] if len(shape) > 3 else 1
        a = rng.standard_normal((batch, m, k), dtype=np.float32)
        b = rng.standard_normal((batch, k, n), dtype=np.float32)
        work.append((a, b))
        flops += 2 * m * k * n * batch
    for a, b in work:  # warm-up
        np.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for a, b in work:
            np.matmul(a, b)
        best = min(best, time.perf_counter() - started)
    blas = "unknown BLAS"
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{info.get('name')} {info.get('version')}"
    except Exception:  # noqa: BLE001 - older numpy: only the name is lost
        pass
    print(f"{flops / best / 1e9:.1f} {blas}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
