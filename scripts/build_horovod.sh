#!/usr/bin/env bash
# Build Horovod 0.28.1 from its source package into a virtualenv, with PyTorch and TensorFlow over
# Gloo (no MPI, no MXNet), applying the fixes in scripts/patch_horovod.py.
#
# Usage: scripts/build_horovod.sh VENV [CONSTRAINTS]
# The source package is cached in .cache/horovod/; every build runs in a fresh source tree, since
# reusing an old build/ folder breaks CMake. A full build takes 4 to 6 minutes on 2 cores.
set -euo pipefail

HOROVOD_VERSION=0.28.1
venv=${1:?usage: scripts/build_horovod.sh VENV [CONSTRAINTS]}
constraints=${2:-requirements/constraints.txt}
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(cd "$venv" 2>/dev/null && pwd) || { echo "build_horovod: virtualenv $1 not found; create it first (make .stamps/venv)" >&2; exit 1; }
case "$constraints" in /*) ;; *) constraints="$here/$constraints" ;; esac
py="$venv/bin/python"
cache="$here/.cache/horovod"
log="$cache/build.log"

die() { echo "build_horovod: $*" >&2; exit 1; }

[ -x "$py" ] || die "$py not found; create the virtualenv first (make .venv)"
"$py" -c "import torch, tensorflow" 2>/dev/null \
    || die "torch and tensorflow must import in $venv before Horovod is built (make .venv)"
command -v cmake >/dev/null 2>&1 || "$venv/bin/pip" install -q cmake \
    || die "cmake is missing and could not be installed; apt-get install cmake"
export PATH="$venv/bin:$PATH"

mkdir -p "$cache"
sdist="$cache/horovod-$HOROVOD_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
    echo "build_horovod: fetching horovod==$HOROVOD_VERSION source package"
    "$venv/bin/pip" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$cache" \
        || die "could not download the horovod==$HOROVOD_VERSION source package from the package index"
fi

src=$(mktemp -d "$cache/src.XXXXXX")
trap 'rm -rf "$src"' EXIT
tar -xzf "$sdist" -C "$src"
tree="$src/horovod-$HOROVOD_VERSION"
"$py" "$here/scripts/patch_horovod.py" "$tree" || die "patching failed (see above)"

echo "build_horovod: building (log: $log); this takes 4 to 6 minutes"
if ! (cd "$tree" && \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_MXNET=1 \
      MAKEFLAGS="-j$(nproc)" \
      "$venv/bin/pip" install -v --no-build-isolation --no-deps --no-cache-dir \
          -c "$constraints" . ) >"$log" 2>&1; then
    grep -n -m 20 -E "error|Error|ERROR" "$log" >&2 || true
    die "pip install of horovod==$HOROVOD_VERSION failed; full log in $log"
fi

check=$(cd / && TF_CPP_MIN_LOG_LEVEL=3 "$py" - 2>&1 <<'PY'
import horovod
import horovod.torch as hvd_torch
import horovod.tensorflow as hvd_tf
assert hvd_torch.gloo_built(), "horovod.torch was built without Gloo"
assert hvd_tf.gloo_built(), "horovod.tensorflow was built without Gloo"
print("build_horovod: horovod", horovod.__version__, "works with torch and tensorflow over gloo")
PY
) || { echo "$check" >&2; die "Horovod installed but does not work (see above; build log: $log)"; }
echo "$check" | grep "^build_horovod:"
