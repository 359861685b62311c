"""Threads that behave: MED-Net windows alone and beside a second busy process.

Usage::

    python benchmarks/bench_threads.py --batches 20
    python benchmarks/bench_threads.py --batches 10 --policies PASSIVE --backend openvino

Times ``--batches`` forward passes of 8 windows of 256² through the bundled network
(:class:`rcmseg.inference.SegmentationEngine`, fp32, threads from
:func:`rcmseg.inference.configure_threads`) in a fresh process, once alone and once while a
competitor process runs the same work on all cores, for each OpenMP wait policy given. On two
cores shared by two equal jobs the fair slowdown is 2x; spinning OpenMP threads (libgomp's
default ``ACTIVE`` policy) steal each other's time slices and make it far worse.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(batches: int, backend: str) -> float:
    import torch

    from rcmseg.bundle import load_bundle
    from rcmseg.inference import configure_threads

    configure_threads()
    engine = load_bundle(device="cpu").engine("fast", precision="fp32", backend=backend)
    windows = torch.rand(8, 1, 256, 256)
    with torch.inference_mode():
        engine._predict(windows)
        started = time.perf_counter()
        for _ in range(batches):
            engine._predict(windows)
    return (time.perf_counter() - started) / batches


def run(batches: int, policy: str | None, busy: bool, backend: str) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    if policy and policy.startswith("SPIN="):  # libgomp: spin this many times, then sleep
        env["GOMP_SPINCOUNT"] = policy.removeprefix("SPIN=")
    elif policy:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--child", "--backend", backend, "--batches", str(batches)]
    competitor = None
    if busy:  # the same work, endlessly, until we are done
        competitor = subprocess.Popen(
            [*command[:-1], str(10**6)], env=env, stdout=subprocess.DEVNULL
        )
        time.sleep(8)  # let it load and start spinning
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--policies", nargs="+", default=["default", "PASSIVE"], help="or SPIN=N (GOMP_SPINCOUNT)"
    )
    parser.add_argument("--backend", default="torch", help="torch or openvino")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.batches, args.backend))
        return
    rows = []
    for policy in args.policies:
        chosen = None if policy == "default" else policy
        alone = run(args.batches, chosen, busy=False, backend=args.backend)
        shared = run(args.batches, chosen, busy=True, backend=args.backend)
        rows.append(
            {
                "omp_wait_policy": policy,
                "backend": args.backend,
                "s_per_batch_alone": alone,
                "s_per_batch_beside_busy": shared,
                "slowdown": shared / alone,
                "cores": len(os.sched_getaffinity(0)),
            }
        )
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
