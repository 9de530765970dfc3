#!/usr/bin/env bash
# Run legato's whole test suite: the mxnet tier inside .venv-mxnet, everything else in .venv.
# Extra arguments go to both pytest runs. Exits non-zero if either run fails or collects nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

run() {
    local venv=$1; shift
    "$venv/bin/python" -m pytest "$@"
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "run_tests: pytest in $venv collected no tests; that is a failure" >&2
        return 1
    fi
    return "$rc"
}

echo "=== tests marked mxnet, in .venv-mxnet ==="
run .venv-mxnet -m mxnet "$@"
mx=$?
echo "=== all other tests, in .venv ==="
run .venv -m "not mxnet" "$@"
main=$?
if [ "$mx" -ne 0 ] || [ "$main" -ne 0 ]; then
    echo "run_tests: FAILED (mxnet tier exit $mx, main suite exit $main)" >&2
    exit 1
fi
