#!/usr/bin/env bash
# The time of `make test` on a fresh clone, as CI runs it: clones this checkout's HEAD into a temporary
# folder (with ../shared beside it where this checkout has one), runs `make install`, then
# `CI=true bash .ci/run` with pytest's --durations, and prints the install's, the suite's and the total
# seconds. Run it on an otherwise idle machine; the log keeps pytest's slowest tests.
#
#     bash experiments/benchmarks/suite_time.sh LOG
#
# Isolated: with --isolated, the suite runs instead in private network, PID and mount namespaces with
# its own /tmp (needs root and unshare), as the session notes compare.
set -u
log=${1:?usage: suite_time.sh LOG [--isolated]}
isolated=${2:-}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/suite-time.XXXX")
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/main"
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
cd "$work/main"
echo "commit $(git rev-parse --short HEAD), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), start $(date -u +%FT%TZ)" > "$log"
t0=$(date +%s)
CI=true make install >> "$log" 2>&1
echo "install: exit $?, $(($(date +%s) - t0)) s" >> "$log"
t1=$(date +%s)
if [ "$isolated" = --isolated ]; then
  unshare -n -p -f --mount-proc -m bash -c 'ip link set lo up && mount -t tmpfs tmpfs /tmp &&
    CI=true PYTEST_ADDOPTS="--durations=40" bash .ci/run' >> "$log" 2>&1
else
  CI=true PYTEST_ADDOPTS="--durations=40" bash .ci/run >> "$log" 2>&1
fi
echo "suite: exit $?, $(($(date +%s) - t1)) s; in all $(($(date +%s) - t0)) s" >> "$log"
tail -1 "$log"
