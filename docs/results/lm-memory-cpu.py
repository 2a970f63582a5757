"""The driver behind lm-memory-cpu.json/.md (docs/benchmarks.md, "A 1 GiB token file: memory
per rank"): runs one torchrun command and samples every rank's memory from outside.

    .venv/bin/python docs/results/lm-memory-cpu.py OUT.json --label NAME -- \
        .venv/bin/torchrun --nproc_per_node=2 -m distnn.train --data BIG.safetensors ...

Every ``--interval-s`` (0.05 s) it reads, for each process torchrun started (a rank; ranks
are numbered in the order of their process ids, the order torchrun starts them),
/proc/PID/smaps_rollup (Private_Clean + Private_Dirty: the rank's private memory; Rss) and
/proc/PID/status (RssAnon, VmHWM), and keeps each one's peak over the start-up (until rank
0 prints the first step's loss line) and over the rest of the run. Wall times: from the
launch to the first step's line, and the run's own ``wall_s`` from its summary line (the
steps). Appends one record to OUT.json (a list). Uses only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

STARTUP, STEPS = "start-up (to the first step's line)", "the steps and the end of the run"


def proc_kb(text: str) -> dict[str, int]:
    """The ``Name: N kB`` fields of a /proc status or smaps_rollup file."""
    fields = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0])
    return fields


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def sample(pid: int) -> dict[str, int] | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            rollup = proc_kb(file.read())
        with open(f"/proc/{pid}/status") as file:
            status = proc_kb(file.read())
    except OSError:
        return None
    if "Rss" not in rollup or "RssAnon" not in status:
        return None  # the process is exiting
    return {"private_kb": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
            "rss_kb": rollup["Rss"], "rss_anon_kb": status["RssAnon"],
            "vm_hwm_kb": status.get("VmHWM", 0)}  # the peak RSS, between samples too


def by_second(timeline: list[dict]) -> list[dict]:
    """The samples in 1-second bins: each value's largest in the bin, and the bin's phase
    (the later one where the bin holds both)."""
    bins: dict[int, dict] = {}
    for point in timeline:
        into = bins.setdefault(int(point["t_s"]), {"t_s": int(point["t_s"])})
        for key, value in point.items():
            if key == "phase":
                into[key] = value
            elif key != "t_s":
                into[key] = max(into.get(key, value), value)
    return list(bins.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--label", required=True)
    parser.add_argument("--interval-s", type=float, default=0.05)
    split = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    args, command = parser.parse_args(sys.argv[1:split]), sys.argv[split + 1:]

    with open("/proc/loadavg") as file:
        load_before = file.read().split()[:3]
    start = time.monotonic()
    # unbuffered: rank 0's first loss line marks the end of the start-up when it is printed
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    phase = {"name": STARTUP, "first_step_s": None}
    peaks: dict[int, dict[str, dict[str, int]]] = {}
    timeline: list[dict] = []
    lines: list[str] = []
    stop = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            lines.append(line)
            sys.stderr.write(line)
            if phase["first_step_s"] is None and re.match(r"^\d+ [-+0-9.e]+$", line.strip()):
                phase["first_step_s"] = time.monotonic() - start
                phase["name"] = STEPS

    def watch() -> None:
        ranks: list[int] = []
        while not stop.is_set():
            if len(ranks) < 2:
                ranks = children(process.pid) or ranks
            now = time.monotonic() - start
            point = {"t_s": round(now, 2), "phase": phase["name"]}
            for rank, pid in enumerate(ranks):
                values = sample(pid)
                if values is None:
                    continue
                point[f"rank{rank}_private_mb"] = round(values["private_kb"] / 1000, 1)
                point[f"rank{rank}_rss_mb"] = round(values["rss_kb"] / 1000, 1)
                mine = peaks.setdefault(rank, {}).setdefault(phase["name"], {})
                for key, value in values.items():
                    mine[key] = max(mine.get(key, 0), value)
            timeline.append(point)
            stop.wait(args.interval_s)

    reader = threading.Thread(target=read_output)
    watcher = threading.Thread(target=watch)
    reader.start()
    watcher.start()
    code = process.wait()
    reader.join()
    stop.set()
    watcher.join()
    total = time.monotonic() - start
    with open("/proc/loadavg") as file:
        load_after = file.read().split()[:3]
    summary = next((line for line in lines if line.startswith("summary:")), "")
    wall = re.search(r"wall_s=([0-9.]+)", summary)
    record = {
        "label": args.label, "command": command, "exit_code": code,
        "interval_s": args.interval_s, "samples": len(timeline),
        "load_average_before": load_before, "load_average_after": load_after,
        "launch_to_first_step_line_s": phase["first_step_s"],
        "steps_wall_s": float(wall.group(1)) if wall else None,
        "total_s": round(total, 2), "summary": summary.strip(),
        "peaks_kb": {f"rank{rank}": by_phase for rank, by_phase in sorted(peaks.items())},
        "timeline_1s": by_second(timeline),
    }
    records = []
    if os.path.exists(args.out):
        with open(args.out) as file:
            records = json.load(file)
    records.append(record)
    with open(args.out, "w") as file:
        json.dump(records, file, indent=1)
    for rank, by_phase in sorted(peaks.items()):
        for name, values in by_phase.items():
            mb = {key: value * 1024 / 1e6 for key, value in values.items()}
            print(f"rank {rank} {name}: private {mb['private_kb']:.0f} MB, RSS "
                  f"{mb['rss_kb']:.0f} MB, RssAnon {mb['rss_anon_kb']:.0f} MB", file=sys.stderr)
    print(f"first step line at {phase['first_step_s']} s; steps {record['steps_wall_s']} s; "
          f"total {total:.1f} s; exit {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
