#!/usr/bin/env bash
# Check legato._native's NCCL all-reduce on a GPU machine, in one short command:
#   scripts/gpu_check.sh            (from the repository root; uses .venv if present)
# Builds the module, prints nccl_status(), runs tests/native/test_nccl.py and every test marked
# gpu (ScheduledOptimizer over torch's and legato's NCCL, the pipeline runtime), then times one
# all-reduce of a 64 MiB float32 gradient on one GPU (world=1), median of 20:
# torch.distributed NCCL (TorchCommBackend) against NativeNcclCommBackend.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "== build"
"$PY" setup.py build_ext --inplace -q 2>&1 | grep -vE "^(running|copying)" || true
echo "== nccl_status (after import torch, which loads its own NCCL and CUDA runtime)"
"$PY" -c "import torch, pprint, legato._native as n; pprint.pprint(n.nccl_status())"
echo "== tests"
failed=0
timeout 600 "$PY" -m pytest -q -rs -p no:cacheprovider tests/native/test_nccl.py \
    tests/adapters/torch/test_optimizer.py tests/adapters/torch/test_pipeline_runtime.py \
    -k "gpu or cuda or native or nccl" -m "gpu or not distributed" || failed=1
echo "== timing"
timeout 300 "$PY" - <<'EOF'
import os, statistics, sys, threading, time
import torch, torch.distributed as dist
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}): timing skipped")
from legato.adapters.torch.comm import NativeNcclCommBackend, TorchCommBackend
from legato.core.scheduler.plan import Chunk, Part

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
gloo = dist.new_group(backend="gloo")
grad = torch.randn(16 << 20, device="cuda")  # 64 MiB of float32
chunk = Chunk(0, 0, grad.numel() * 4, (Part(0, 0, grad.numel() * 4),))
backends = {"torch.distributed nccl": TorchCommBackend(lambda k: grad, dist.group.WORLD),
            "legato native nccl": NativeNcclCommBackend(lambda k: grad, gloo, 0)}
median_ms = {}
for name, backend in backends.items():
    times = []
    for i in range(25):  # 5 warm-up rounds
        done, errors = threading.Event(), []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backend.start(chunk, lambda e: (errors.append(e), done.set()))
        assert done.wait(60) and errors == [None], (name, errors)
        torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1e3)
    median_ms[name] = statistics.median(times)
    print(f"{name:24s} median {median_ms[name]:8.3f} ms  min {min(times):8.3f} ms  (n=20)")
base, ours = median_ms.values()
print(f"ratio native/torch {ours / base:.2f} on {torch.cuda.get_device_name(0)}, 64 MiB, world=1")
backends["legato native nccl"].close()
dist.destroy_process_group()
EOF
exit $failed
