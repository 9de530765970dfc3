#!/usr/bin/env bash
# Issue 19 item 6: the scheduler benchmark with both ranks' compute on one GPU, on a machine
# where compute does not compete for two cores. One command, from the repository root:
#
#     bash benchmarks/gpu/scheduler_gpu.sh            # 3-4 minutes (estimated), 7 at most
#     bash benchmarks/gpu/scheduler_gpu.sh --dry-run  # the machine report and the commands only
#
# It needs no virtualenv and no network: the machine's python3 with torch (CUDA), and this
# checkout on PYTHONPATH (legato is pure Python; without its native module the pure-Python
# queue serves). It prints the card (nvidia-smi), torch and whether loopback shaping works,
# checks that legato on CUDA matches DDP (two GPU tests of tests/adapters/torch, about 30 s),
# then runs `legato bench scheduler -- --device cuda` once per rate: 2 gloo ranks sharing the
# GPU (gloo moves CUDA tensors through host memory), methods ddp, bytescheduler (untuned, the
# fixed defaults) and allreduce, VGG-style and Transformer, at 1000 Mbit/s (a private loopback
# shaped with tc, as root) and unshaped. Where unshare or tc fail it runs unshaped only, on
# the host's loopback, and says so. Each rate's JSON and the whole log go to $OUT when it is
# set (else benchmarks/results/); a summary table of every rate ends the output.
#
# Environment (defaults in brackets): DEVICE [cuda] (cpu exercises the script without a GPU),
# BACKEND [gloo], PYTHON [python3], MODELS [vgg,transformer], RATES [1000,unshaped],
# METHODS [ddp,bytescheduler,allreduce], STEPS [5], ROUNDS [4], WARMUP [3], BUDGET_S [420]:
# the wall-clock limit of all runs together (a rate not started within it is skipped).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
dry=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "scheduler_gpu.sh: unknown argument '$arg'; known: --dry-run, --help" >&2
           exit 2 ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 2
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
BACKEND="${BACKEND:-gloo}"
MODELS="${MODELS:-vgg,transformer}"
RATES="${RATES:-1000,unshaped}"
METHODS="${METHODS:-ddp,bytescheduler,allreduce}"
STEPS="${STEPS:-5}"
ROUNDS="${ROUNDS:-4}"
WARMUP="${WARMUP:-3}"
BUDGET_S="${BUDGET_S:-420}"
out="${OUT:-$root/benchmarks/results}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

main() {
echo "== scheduler benchmark on $DEVICE ($BACKEND), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
     "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
if command -v nvidia-smi >/dev/null; then
    echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
                  2>&1 | paste -sd ';')"
else
    echo "card: none (nvidia-smi not found)"
fi
echo "cores: $(nproc); kernel: $(uname -r); user id: $(id -u); python: $(command -v "$PY")"
if ! "$PY" - "$DEVICE" "$dry" <<'EOF'
import sys

try:
    import torch
    import torch.distributed as dist
except ImportError as err:
    sys.exit(f"scheduler_gpu.sh: {sys.executable} has no torch ({err}); set PYTHON to one "
             "that has")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}; CUDA {torch.version.cuda}; GPUs seen: "
      f"{torch.cuda.device_count() if cuda else 0}"
      + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
print(f"gloo: {dist.is_gloo_available()}; nccl: {dist.is_nccl_available()}")
try:
    from legato import _native  # noqa: F401
    print("legato._native: built (the native queue serves)")
except ImportError as err:
    print(f"legato._native: absent ({err}); the pure-Python queue serves")
if sys.argv[1] == "cuda" and not cuda:
    why = ("scheduler_gpu.sh: DEVICE=cuda but torch sees no CUDA device; run it on the GPU "
           "machine, or DEVICE=cpu to exercise the script")
    if sys.argv[2] == "1":
        print(why + " (dry run: going on)")
    else:
        sys.exit(why)
EOF
then
    return 2
fi

# Loopback shaping needs root, unshare -n, ip and tc with the tbf qdisc: try it once.
shaping=""
if [ "$(id -u)" != 0 ]; then
    shaping="not root"
elif ! command -v unshare >/dev/null || ! command -v tc >/dev/null \
        || ! command -v ip >/dev/null; then
    shaping="unshare, ip or tc (iproute2) is missing"
elif ! probe=$(timeout 20 unshare -n -- sh -c 'ip link set lo up && tc qdisc add dev lo root \
        tbf rate 1000mbit burst 256kb latency 100ms' 2>&1); then
    shaping="unshare -n with tc failed: $(echo "$probe" | head -c 300 | paste -sd ' ')"
fi
status=0
extra=()
if [ -n "$shaping" ]; then
    echo "loopback shaping: unavailable here ($shaping); running unshaped only, on the host's" \
         "loopback (--host-loopback)"
    RATES="unshaped"
    extra=(--host-loopback)
else
    echo "loopback shaping: works (private namespace, tc tbf)"
fi

# First, that legato on CUDA gradients matches DDP: two ranks sharing the GPU over gloo, and
# one rank over torch's NCCL (bit-identical parameters); the time counts against BUDGET_S.
if [ "$DEVICE" = cuda ]; then
    t=tests/adapters/torch/test_optimizer.py
    check=("$PY" -m pytest -q -p no:cacheprovider
           "$t::test_two_ranks_on_one_gpu_over_gloo_match_ddp"
           "$t::test_one_gpu_bytescheduler_matches_ddp_over_nccl[0]")
    echo "== correctness: ${check[*]}"
    if [ "$dry" = 0 ] && ! timeout -k 5 150 "${check[@]}"; then
        echo "== correctness: FAILED (the timings below are of a legato that differs from DDP)"
        status=1
    fi
fi

nmodels=$(echo "$MODELS" | tr ',' '\n' | grep -c .)
jsons=()
IFS=',' read -r -a rates <<< "$RATES"
remaining=${#rates[@]}
for rate in "${rates[@]}"; do
    # this rate's share of the time left: the rates still to run share it evenly
    limit=$(((BUDGET_S - SECONDS) / remaining))
    remaining=$((remaining - 1))
    json="$out/scheduler_gpu_${rate}.json"
    if [ "$limit" -lt 60 ]; then
        echo "== rate $rate: skipped, ${limit} s of BUDGET_S=$BUDGET_S for it"
        status=1
        continue
    fi
    cmd=("$PY" -m legato.cli bench scheduler -- --device "$DEVICE" --backend "$BACKEND"
         --models "$MODELS" --methods "$METHODS" --rates "$rate" --no-tune --steps "$STEPS"
         --rounds "$ROUNDS" --warmup "$WARMUP" --job-timeout $(((limit - 20) / nmodels))
         --rate-timeout $((limit - 10)) --json "$json" ${extra[@]+"${extra[@]}"})
    echo "== rate $rate (${limit} s at most): ${cmd[*]}"
    [ "$dry" = 1 ] && continue
    if timeout -k 5 "$limit" "${cmd[@]}"; then
        jsons+=("$json")
    else
        echo "== rate $rate: failed (exit $?)"
        status=1
    fi
done
[ "$dry" = 1 ] && { echo "(dry run: nothing run)"; return 0; }

if [ "${#jsons[@]}" -gt 0 ]; then
    "$PY" - "${jsons[@]}" <<'EOF'
import json
import sys

runs = [json.load(open(path)) for path in sys.argv[1:]]
rows = [row for run in runs for row in run["rows"]]
first = runs[0]
methods = list(dict.fromkeys(m for row in rows for m in row["median_ms"]))
print(f"\n== summary: {first['device']} ({first['card'] or 'no card'}), {first['backend']}, "
      f"torch {first['torch']}, {first['cores']} cores, loopback: {first['loopback']}, "
      f"{first['rounds']} rounds of {first['steps']} steps; median step ms (ratio = DDP / method)")
print(f"{'model':<12} {'rate':>9} " + " ".join(f"{m:>17}" for m in methods)
      + f" {'F+B':>7} {'C':>7} {'bound':>7}")
for row in rows:
    ddp = row["median_ms"].get("ddp")
    cells = []
    for m in methods:
        t = row["median_ms"].get(m)
        cells.append(f"{'-':>17}" if t is None else
                     f"{t:>8.1f}" + (f" ({ddp / t:.2f}x)" if ddp else "").rjust(9))
    rate = "unshaped" if row["rate"] == 0 else f"{row['rate']} Mb/s"
    tail = (f" {row['F_ms'] + row['B_ms']:>7.1f} {row['C_ms']:>7.1f} {row['bound_ms']:>7.1f}"
            if "bound_ms" in row else "")
    print(f"{row['model']:<12} {rate:>9} " + " ".join(cells) + tail)
EOF
fi
echo "== done in ${SECONDS} s (exit $status); log and JSON in $out"
return "$status"
}

if [ "$dry" = 1 ]; then
    main
    exit $?
fi
mkdir -p "$out" || exit 2
main 2>&1 | tee "$out/scheduler_gpu.log"
exit "${PIPESTATUS[0]}"
