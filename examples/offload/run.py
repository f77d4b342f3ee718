#!/usr/bin/env python3
"""The offload example: redis-server under the senpai controller, on vswapfs and on zram.

    sudo python examples/offload/run.py [--dataset 256M] [--baseline 30] [--seconds 150]

For each swap target (vswapfs with its own hoststore, then zram), fresh:

1. the target is swapped on (as ``vswapctl bench`` does it, at the highest priority);
2. a memory cgroup ``vswapctl-offload-TARGET`` is made (limit 4G: nothing is pushed yet),
   redis-server started in it and filled with DATASET of ~1 KiB records, key ``k0`` first;
3. ``zipfload.py`` (outside the cgroup) drives GETs and SETs (5% SETs) at the hot set,
   the first quarter of the keys, Zipf-skewed (0.99) within it, for BASELINE seconds:
   the throughput without the controller (the other three quarters are cold: read
   only by the final check);
4. ``vswapctl offload`` (senpai) runs for SECONDS with the load going on, recording a
   line per second.  Senpai's defaults (a 1% probe every 6 s) would take some ten
   minutes to reach a working set of a third of the peak, so the example probes by
   3% every 2 s, with Senpai's stall budget scaled to that interval (10 ms per 6 s);
   --interval, --step and --pressure-threshold change that;
5. the load stops and every key is read back and checked; redis-server, the cgroup and
   the target are taken down.

At the end: the report of both runs side by side (``vswapctl offload --report``), each
run's GET throughput against its own baseline, and a chart (``--chart``, needs matplotlib).
Records and results stay in --workdir.  Needs root, redis-server, and zram for its run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, TOP)

from vswapcommon.sizes import parse_size  # noqa: E402
from vswapctl import cgroup  # noqa: E402
from vswapctl.benchtargets import BenchError, open_target  # noqa: E402
from vswapctl.redisload import BATCH, RECORD, socket_path, start, value  # noqa: E402
from vswapctl.workload import json_pool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FOUND = 4 << 30
TARGETS = {"vswapfs": "hoststore", "zram": "zram"}


def say(message: str) -> None:
    print(f"offload example: {message}", file=sys.stderr, flush=True)


def metric(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(json.load(f)["get_ops_per_s"])
    except (OSError, ValueError, KeyError):
        return None


def baseline(path: str, seconds: float) -> float:
    """Median GET throughput over ``seconds``, one sample a second."""
    samples = []
    for _ in range(int(seconds)):
        time.sleep(1.0)
        value_ = metric(path)
        if value_ is not None:
            samples.append(value_)
    return statistics.median(samples[len(samples) // 3:]) if samples else 0.0


def load(client, pool: bytes, seed: int, keys: int) -> None:
    for at in range(0, keys, BATCH):
        pipe = client.pipeline(transaction=False)
        for key in range(at, min(at + BATCH, keys)):
            pipe.set(b"k%d" % key, value(pool, seed, key))
        pipe.execute()


def run_target(name: str, args: argparse.Namespace) -> dict:
    work = os.path.join(args.workdir, name)
    os.makedirs(work, exist_ok=True)
    record, metric_file = os.path.join(work, "offload.jsonl"), os.path.join(work, "metric.json")
    for path in (record, metric_file):
        if os.path.exists(path):
            os.unlink(path)
    seed, keys = random.getrandbits(31), args.dataset // RECORD
    target = TARGETS[name]
    with open_target(target, args.workdir, args.device_size, args.device_size, say):
        cg = cgroup.create(f"vswapctl-offload-{name}", FOUND)
        server = loader = None
        try:
            def join() -> None:
                with open(cg.procs, "w") as f:
                    f.write(str(os.getpid()))

            server, client = start(work, preexec_fn=join)
            sock = socket_path(work)
            say(f"{name}: loading {keys} keys ({args.dataset >> 20} MiB of values) into redis-server")
            load(client, json_pool(seed), seed, keys)
            loader = subprocess.Popen([sys.executable, os.path.join(HERE, "zipfload.py"), sock, str(keys), str(seed),
                                       metric_file], stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": TOP})
            say(f"{name}: {args.baseline:.0f} s of load without the controller")
            base = baseline(metric_file, args.baseline)
            say(f"{name}: baseline {base:.0f} GETs/s; the controller runs {args.seconds:.0f} s")
            argv = [sys.executable, "-m", "vswapctl"]
            if target != "zram":
                argv += ["--state-dir", os.path.join(args.workdir, f"state-{target}")]
            argv += ["offload", cg.path, "--controller", args.controller, "--duration", str(args.seconds), "--record", record, "--workload-metric",
                     metric_file, "--interval", str(args.interval), "--step", str(args.step),
                     "--pressure-threshold", str(args.pressure_threshold), "--floor", args.floor, "--quiet"]
            if target == "zram":
                argv.append("--no-device")
            done = subprocess.run(argv, cwd=TOP, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"offload failed: {done.stderr}")
            loader.send_signal(signal.SIGTERM)
            checked = json.loads(loader.communicate(timeout=600)[0].strip().splitlines()[-1])
            say(f"{name}: {checked['keys']} keys read back, {checked['bad_values']} wrong")
            return {"record": record, "baseline_gets": base, **checked}
        finally:
            for proc in (loader, server):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            cg.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", type=parse_size, default=parse_size("256M"), help="bytes of values (default 256M)")
    ap.add_argument("--device-size", type=parse_size, default=parse_size("1G"), help="each swap target's size")
    ap.add_argument("--baseline", type=float, default=60.0, help="seconds of load without the controller")
    ap.add_argument("--seconds", type=float, default=240.0,
                    help="seconds of load under the controller (the report's settled half is the second)")
    ap.add_argument("--controller", default="senpai", choices=("senpai", "swapin-slo"),
                    help="the controller (default senpai)")
    ap.add_argument("--interval", type=float, default=2.0, help="the controller's --interval (default 2)")
    ap.add_argument("--step", default="0.03", help="the controller's --step (default 0.03)")
    ap.add_argument("--pressure-threshold", type=float,
                    help="the controller's --pressure-threshold (default: Senpai's rate, 10 ms of stall "
                         "per 6 s, over --interval)")
    ap.add_argument("--floor", default="32M", help="the controller's --floor (default 32M)")
    ap.add_argument("--targets", default="vswapfs,zram", help="comma-separated: vswapfs, zram")
    ap.add_argument("--workdir", default="/var/tmp/vswapctl-offload-example")
    ap.add_argument("--chart", help="also draw the runs to this file (.png)")
    args = ap.parse_args()
    if args.pressure_threshold is None:
        args.pressure_threshold = round(10_000 * args.interval / 6)
    if os.geteuid() != 0:
        return print("the example needs root (cgroups, swap)", file=sys.stderr) or 2
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    try:
        for name in args.targets.split(","):
            results[name] = run_target(name, args)
    except BenchError as exc:
        print(f"offload example: {exc}", file=sys.stderr)
        return 1
    report = [sys.executable, "-m", "vswapctl", "offload", "--report", *[r["record"] for r in results.values()],
              "--metric", "get_ops_per_s", *[x for name in results for x in ("--name", name)]]
    if args.chart:
        report += ["--chart", args.chart]
    subprocess.run(report, cwd=TOP, check=False)
    for name, r in results.items():
        from offload.report import load as load_record, summarize

        settled = summarize(load_record(r["record"]), "get_ops_per_s").get("workload", 0.0)
        print(f"{name}: GETs/s {settled:.0f} under the controller vs {r['baseline_gets']:.0f} without "
              f"({settled / r['baseline_gets'] - 1:+.1%}); {r['keys']} keys checked, {r['bad_values']} wrong")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 1 if any(r["bad_values"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
