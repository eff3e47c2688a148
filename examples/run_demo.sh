#!/usr/bin/env bash
# `make run`: two agents on loopback (two "nodes"), one 2 x 2 job in which global rank 3
# fails, the merged output and the failure report, then the agents are stopped.
set -euo pipefail
BIN=${BIN:-.venv/bin}
work=$(mktemp -d "${TMPDIR:-/tmp}/rankd-demo.XXXXXX")
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

addresses=()
for node in 0 1; do
    "$BIN/rankd-agent" --port 0 --log-dir "$work/node$node" --log-level WARNING \
        >"$work/agent$node.out" 2>"$work/agent$node.err" &
    pids+=("$!")
    for _ in $(seq 100); do  # up to 10 s for "listening on HOST:PORT"
        grep -q '^listening on ' "$work/agent$node.out" 2>/dev/null && break
        sleep 0.1
    done
    line=$(head -n 1 "$work/agent$node.out")
    [[ $line == "listening on "* ]] || { echo "agent $node did not start:"; cat "$work/agent$node.err"; exit 2; }
    addresses+=("${line#listening on }")
done
nodes=$(IFS=,; echo "${addresses[*]}")
echo "agents: $nodes   (logs under $work)"
echo "+ rankd launch --nodes $nodes --nproc-per-node 2 --kill-timeout 5 -- python examples/demo_job.py"
rc=0
"$BIN/rankd" launch --nodes "$nodes" --nproc-per-node 2 --kill-timeout 5 \
    -- "$BIN/python" examples/demo_job.py || rc=$?
echo "rankd launch exited with $rc (1 = the job failed, as this demo means it to)"
[[ $rc == 1 ]]
