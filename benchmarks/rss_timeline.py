"""Resident memory of a command over time, with the stage it was in: where a compile's peak comes from.

    python benchmarks/rss_timeline.py --out results/rss_sd15_minmax -- \
        qcompile unet.onnx --recipe minmax --calib calib -o out/minmax.onnx

Samples VmRSS of the process and its children from /proc every ``--interval`` seconds and tags
each sample with the last ``[i/n] pass ...`` line the command printed. Writes ``OUT.json`` (the
samples and each stage's peak) and ``OUT.png`` (RSS over time, stages shaded), and prints a table.
The peak here is sampled; ``/usr/bin/time -v`` (bench_scale.py) gives the exact one.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import threading
import time
from pathlib import Path

STAGE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) \.\.\.")


def _tree_rss(pid: int) -> int:
    """VmRSS in bytes of ``pid`` and its descendants (0 for processes that are gone)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
        todo += [int(child) for child in children]
    return total


def record(command: list[str], interval: float) -> tuple[list[dict], int]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stage = {"name": "load"}
    samples: list[dict] = []
    started = time.perf_counter()

    def read_output():
        for line in process.stdout:
            print(line, end="", flush=True)
            match = STAGE.match(line.strip())
            if match:
                stage["name"] = match.group(3)
            elif line.startswith("wrote ") or "target:" in line:
                stage["name"] = "save + report"

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    while process.poll() is None:
        samples.append({"t": round(time.perf_counter() - started, 2), "rss": _tree_rss(process.pid),
                        "stage": stage["name"]})
        time.sleep(interval)
    reader.join(timeout=5)
    return samples, process.returncode


def stage_peaks(samples: list[dict]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for sample in samples:
        peaks[sample["stage"]] = max(peaks.get(sample["stage"], 0), sample["rss"])
    return peaks


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    times = [s["t"] for s in samples]
    ax.plot(times, [s["rss"] / 2**30 for s in samples], color="black", linewidth=1)
    colours = plt.get_cmap("tab10")
    start, index = 0, 0
    for i in range(1, len(samples) + 1):
        if i == len(samples) or samples[i]["stage"] != samples[start]["stage"]:
            ax.axvspan(times[start], times[i - 1], alpha=0.15, color=colours(index % 10),
                       label=samples[start]["stage"])
            start, index = i, index + 1
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.json and OUT.png are written")
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    samples, code = record(command, args.interval)
    peaks = stage_peaks(samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"command": command, "exit_code": code, "stage_peak_rss": peaks,
                                                    "samples": samples}, indent=1))
    plot(samples, Path(f"{args.out}.png"), " ".join(Path(c).name if "/" in c else c for c in command)[:120])
    print("| stage | peak RSS GiB (sampled) |\n|---|---|")
    for name, peak in peaks.items():
        print(f"| {name} | {peak / 2**30:.2f} |")


if __name__ == "__main__":
    main()
