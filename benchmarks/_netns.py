"""Run a command in a private network namespace whose loopback is shaped to a rate.

`unshare -n` (as root) gives the command a loopback of its own; `tc qdisc add dev lo root tbf
rate R burst 256kb latency 100ms` shapes it (a burst below 64 KiB stalls connections). The
rate limits the sum of every rank's traffic, since all of it crosses the one loopback.
Rate 0 means an unshaped loopback, still in a namespace of its own.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path


def rate_label(rate: int) -> str:
    return "unshaped" if rate == 0 else f"{rate} Mbit/s"


def rate_tag(rate: int) -> str:
    """The rate in a file name: `unshaped` or `1000mbit`."""
    return "unshaped" if rate == 0 else f"{rate}mbit"


def trace_prefix(parser, value: str | None) -> str | None:
    """`--timeline PREFIX` as an absolute path (the jobs run elsewhere), its folder checked
    before any job starts (argparse's error, exit 2)."""
    if not value:
        return None
    prefix = Path(value).resolve()
    if not prefix.parent.is_dir():
        parser.error(f"--timeline {prefix}: its folder does not exist")
    return str(prefix)


def parse_rate(text: str) -> int:
    return 0 if text in ("0", "unshaped", "none") else int(text)


def shaping_problem() -> str | None:
    """Why this machine cannot shape a private loopback, or None."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("tc"):
        return ("needs root, unshare and tc (iproute2) to shape a private loopback; run as root "
                "on Linux")
    return None


def run_shaped(rate: int, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run `argv` inside a new network namespace with loopback at `rate` Mbit/s."""
    shape = (f"tc qdisc add dev lo root tbf rate {rate}mbit burst 256kb latency 100ms && "
             if rate else "")
    inner = " ".join(shlex.quote(a) for a in argv)
    cmd = ["unshare", "-n", "--", "sh", "-c", f"ip link set lo up && {shape}exec {inner}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def plot_step_times(rows: list[dict], methods, path, title: str = "{model}") -> None:
    """Median step time against the shaped rate, one panel per model, one line per method.

    `rows` have "model", "rate" (0: unshaped, left out) and "median_ms" {method: ms}.
    """
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = sorted((r for r in rows if r["model"] == model and r["rate"]),
                     key=lambda r: r["rate"])
        for m in methods:
            pts = [(r["rate"], r["median_ms"][m]) for r in sub if m in r["median_ms"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("loopback rate (Mbit/s, both ranks together)")
        ax.set_ylabel("median step time (ms)")
        ax.set_title(title.format(model=model))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
