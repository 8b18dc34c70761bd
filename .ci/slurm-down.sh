#!/usr/bin/env bash
# Stops what .ci/slurm-up.sh started: cancels every job of the test cluster, waits for them to end, then stops
# slurmd, slurmctld and munged by their pid files (SIGTERM, then SIGKILL after 10 s). Safe to run twice or when
# nothing runs. --quiet: say nothing when there was nothing to stop.
set -uo pipefail
DIR=${WSI_SLURM_DIR:-/var/lib/wsi-slurm}
quiet=${1:-}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/slurmctld.pid"; then
    # jobs first: their processes (slurmstepd and below) outlive slurmd if left running
    timeout 20 scancel --user=root 2>/dev/null || true
    for _ in $(seq 30); do
        [ -z "$(timeout 10 squeue -h -t RUNNING,PENDING,COMPLETING,CONFIGURING -o %i 2>/dev/null)" ] && break
        sleep 1
    done
fi

stopped=()
for name in slurmd slurmctld munge/munged; do
    pidfile="$DIR/$name.pid"
    alive "$pidfile" || continue
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
    stopped+=("${name#munge/} ($pid)")
done
if [ ${#stopped[@]} -gt 0 ] || [ "$quiet" != --quiet ]; then
    echo "slurm-down: stopped ${stopped[*]:-nothing (no daemon was running)}"
fi
