"""Run PipeDream's own partition optimizer, unmodified, on the shipped profiles and keep its
answers (not its code) as golden data for legato's `--mode pipedream`.

    python scripts/pipedream_golden.py --pipedream /path/to/pipedream \
        --python /path/to/venv/bin/python --out tests/data/pipedream_golden.json

`--pipedream` is a checkout of https://github.com/msr-fiddle/pipedream (its `optimizer/` and
`graph/` folders); `--python` an interpreter with numpy and the `graphviz` package (PipeDream's
graph module imports it). PipeDream renders a drawing of each partition with Graphviz's `dot`;
when `dot` is not installed a stand-in that does nothing is put on PATH (the drawing is not
used). Runs under PYTHONHASHSEED=0, which makes PipeDream's tie-breaking repeatable.

For each profile and configuration the file holds: the command, the time per stage (PipeDream's
"Time per stage in pipeline"), the data-parallel time it compares against, each stage's
replication factor and nodes (from the partitioned graph it writes with -o), or the error when
PipeDream gives no answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = [
    {"n": [2], "b": [1e9]}, {"n": [4], "b": [1e9]}, {"n": [8], "b": [1e9]},
    {"n": [16], "b": [1e9]}, {"n": [4, 4], "b": [1e10, 1.25e9]},
]
ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT.parent / "shared" / "data" / "pipedream-profiles"


def _number(text: str, label: str) -> float | None:
    match = re.search(re.escape(label) + r"\s*([0-9.eE+-]+)", text)
    return float(match.group(1)) if match else None


def run_one(pipedream: Path, python: str, profile: Path, config: dict, env: dict,
            timeout_s: float, memory_bytes: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["-f", str(profile), "-n", *[str(n) for n in config["n"]],
                "-b", *[repr(int(b)) for b in config["b"]],
                "--activation_compression_ratio", "1", "-o", out]
        command = ["optimizer_graph_hierarchical.py", *args[:-2]]
        record = {"profile": profile.parent.name, "n": config["n"], "b": config["b"],
                  "command": "PYTHONHASHSEED=0 python " + " ".join(
                      a if not a.startswith("/") else Path(a).parent.name + "/graph.txt"
                      for a in command)}
        def cap_memory() -> None:  # its tables grow with the square of the states
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

        try:
            proc = subprocess.run([python, "optimizer_graph_hierarchical.py", *args],
                                  cwd=pipedream / "optimizer", env=env, capture_output=True,
                                  text=True, timeout=timeout_s, preexec_fn=cap_memory)
        except subprocess.TimeoutExpired:
            record["error"] = f"no answer within {timeout_s:g} s"
            return record
        if proc.returncode != 0:
            record["error"] = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
                               )[-1][:300]
            return record
        text = proc.stdout
        record["time_per_stage_s"] = _number(text, "Time per stage in pipeline:")
        record["single_machine_s"] = _number(text, "Time taken by single-stage pipeline:")
        blocks = text.split("(Split start, split end) / compute time taken per stage / "
                            "replication factor per stage:")
        record["levels"] = []
        for block in blocks[1:]:
            rows = re.findall(r"^\((\d+), (\d+)\) ([0-9.eE+-]+) (\d+)$", block, re.MULTILINE)
            record["levels"].append([[int(a), int(b), float(t), int(r)] for a, b, t, r in rows])
        total = 1
        for n in config["n"]:
            total *= n
        stages: dict[int, list[str]] = {}
        for line in Path(out, f"gpus={total}.txt").read_text().splitlines():
            match = re.match(r"^(node\d+) -- .* -- stage_id=(\d+)$", line)
            if match:
                stages.setdefault(int(match.group(2)), []).append(match.group(1))
        record["stages"] = [sorted(stages[s], key=lambda x: int(x[4:])) for s in sorted(stages)]
        return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipedream", required=True, type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--profiles", type=Path, default=PROFILES)
    parser.add_argument("--out", type=Path, required=True,
                        help="written after each configuration; configurations already in it "
                             "are kept, not run again")
    parser.add_argument("--timeout-s", type=float, default=900.0,
                        help="how long one configuration may run (recorded as no answer)")
    parser.add_argument("--memory-gib", type=float, default=6.0,
                        help="address-space cap of one run (PipeDream's tables grow with the "
                             "square of its states: Inception-v3's would not fit)")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONHASHSEED="0")
    shim = None
    if shutil.which("dot") is None:
        shim = tempfile.mkdtemp()
        Path(shim, "dot").write_text("#!/bin/sh\nexit 0\n")
        os.chmod(Path(shim, "dot"), 0o755)
        env["PATH"] = shim + os.pathsep + env.get("PATH", "")
    commit = subprocess.run(["git", "-C", str(args.pipedream), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    records = []
    if args.out.exists():
        records = json.loads(args.out.read_text())["records"]
    done = {(r["profile"], tuple(r["n"])) for r in records}
    # a profile PipeDream could not solve on 2 workers (memory, time: its cost grows with its
    # states, not with the workers) is not run again for the other configurations
    hopeless = {r["profile"]: r["error"] for r in records if r["n"] == [2] and "error" in r}
    # every profile's single-level configurations first: the hierarchical ones take longest
    for config in CONFIGS:
        for profile in sorted(args.profiles.glob("*/graph.txt")):
            if (profile.parent.name, tuple(config["n"])) in done:
                continue
            if profile.parent.name in hopeless:
                record = {"profile": profile.parent.name, "n": config["n"], "b": config["b"],
                          "error": f"not run: on 2 workers, {hopeless[profile.parent.name]}"}
            else:
                record = run_one(args.pipedream, args.python, profile, config, env,
                                 args.timeout_s, int(args.memory_gib * 2**30))
                if config["n"] == [2] and "error" in record:
                    hopeless[profile.parent.name] = record["error"]
            print(record["profile"], record["n"], record.get("time_per_stage_s",
                                                               record.get("error")), flush=True)
            records.append(record)
            data = {"source": "https://github.com/msr-fiddle/pipedream optimizer/"
                              "optimizer_graph_hierarchical.py, unmodified",
                    "pipedream_commit": commit,
                    "regenerate": "python scripts/pipedream_golden.py --pipedream PIPEDREAM "
                                  "--python PYTHON --out tests/data/pipedream_golden.json",
                    "records": records}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(args.out)
    if shim is not None:
        shutil.rmtree(shim, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
