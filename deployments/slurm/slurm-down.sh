#!/usr/bin/env bash
# Stop the single-node SLURM cluster that slurm-up.sh started, by the PIDs it recorded in its state dir.
#
#   sudo deployments/slurm/slurm-down.sh [--keep-munge]
#
# Only daemons whose PID file is in $STAMP_SLURM_STATE (default /tmp/stamp-slurm) are stopped: a munged that
# was running before slurm-up.sh is left alone. SIGTERM, then SIGKILL after 15 s. Idempotent.
set -uo pipefail

STATE="${STAMP_SLURM_STATE:-/tmp/stamp-slurm}"
keep_munge=0
[[ ${1:-} == --keep-munge ]] && keep_munge=1

stop() { # name
    local pidf="$STATE/$1.pid" pid
    [[ -s $pidf ]] || return 0
    pid="$(cat "$pidf")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            printf '[slurm-down] %s (pid %s) ignored SIGTERM: SIGKILL\n' "$1" "$pid" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
        printf '[slurm-down] stopped %s (pid %s)\n' "$1" "$pid" >&2
    fi
    rm -f "$pidf"
}

# cancel what is still queued or running, so no slurmstepd outlives slurmd (only when our slurmctld is up)
if [[ -s $STATE/slurmctld.pid ]] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    jobs="$(squeue -h -o %A 2>/dev/null)"
    if [[ -n $jobs ]]; then
        printf '[slurm-down] cancelling jobs %s\n' "$(echo $jobs)" >&2
        scancel $jobs 2>/dev/null
        for _ in $(seq 30); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
fi
stop slurmd
stop slurmctld
((keep_munge)) || stop munged
exit 0
