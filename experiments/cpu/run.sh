#!/usr/bin/env bash
# The CPU study (cifar10_exact.yaml) into OUT, recording each sitting: the command, the commit, the
# machine, when it started and ended and how. A rerun with the same OUT resumes where the last one
# stopped (finished stages are kept; training continues after its last finished epoch).
#   bash experiments/cpu/run.sh experiments/results/DATE_cpu-2core_COMMIT
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: bash experiments/cpu/run.sh OUT}
mkdir -p "$out"
robint=${ROBINT:-robint}
command=(study experiments/cpu/cifar10_exact.yaml --out "$out")
started=$(date -u +%FT%TZ)
"$robint" "${command[@]}"
status=$?
python3 - "$out/sittings.jsonl" "$started" "$status" "robint ${command[*]}" <<'PY'
import json, os, platform, subprocess, sys, datetime
path, started, status, command = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
row = {
    "command": command,
    "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "started": started,
    "ended": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "exit_status": int(status),
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
}
with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
PY
exit $status
