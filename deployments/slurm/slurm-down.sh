#!/usr/bin/env bash
# Stop the single-node SLURM cluster that slurm-up.sh started, by the PIDs it recorded in its state dir.
#
#   sudo deployments/slurm/slurm-down.sh [--keep-munge]
#
# Only daemons whose PID file is in $STAMP_SLURM_STATE (default /var/lib/stamp-slurm) are stopped: a munged
# that was running before slurm-up.sh is left alone. SIGTERM, then SIGKILL after 15 s. Idempotent.
# A state dir another user owns or can write is refused. A PID file is trusted only when it holds one
# number > 1 whose process is the daemon it names (/proc/PID/comm); otherwise nothing is signalled and the
# exit status is 1.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib/state-dir.sh
. "$HERE/../lib/state-dir.sh"
STATE="${STAMP_SLURM_STATE:-/var/lib/stamp-slurm}"
keep_munge=0
[[ ${1:-} == --keep-munge ]] && keep_munge=1
status=0

die() { printf '[slurm-down] ERROR: %s\n' "$*" >&2; exit 1; }
[[ -e $STATE || -L $STATE ]] || exit 0 # nothing was started with this state dir
why="$(state_dir_problem "$STATE")"
[[ -z $why ]] || die "unsafe state dir $STATE: $why; its PID files are not trusted (remove it or set STAMP_SLURM_STATE)"

# the PIDs of our running daemons, from their PID files (a bad PID file is reported once, and left alone)
declare -A PIDS=()
for name in slurmctld slurmd munged; do
    pidf="$STATE/$name.pid"
    [[ -e $pidf || -L $pidf ]] || continue
    if ! pid="$(pid_from "$pidf")"; then
        printf '[slurm-down] ERROR: %s holds %q, not a PID > 1: nothing signalled (remove the file)\n' \
            "$pidf" "$(head -c 40 -- "$pidf" 2>/dev/null)" >&2
        status=1
    elif ! is_process "$pid" "$name"; then
        printf '[slurm-down] pid %s from %s is not %s (it exited): left alone\n' "$pid" "$pidf" "$name" >&2
        rm -f -- "$pidf"
    else
        PIDS[$name]=$pid
    fi
done

stop() { # name
    local pid=${PIDS[$1]:-}
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 150); do is_process "$pid" "$1" || break; sleep 0.1; done
    if is_process "$pid" "$1"; then
        printf '[slurm-down] %s (pid %s) ignored SIGTERM: SIGKILL\n' "$1" "$pid" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
    printf '[slurm-down] stopped %s (pid %s)\n' "$1" "$pid" >&2
    rm -f -- "$STATE/$1.pid"
}

# cancel what is still queued or running, so no slurmstepd outlives slurmd (only when our slurmctld is up)
if [[ -n ${PIDS[slurmctld]:-} ]]; then
    mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
    if ((${#jobs[@]})); then
        printf '[slurm-down] cancelling jobs %s\n' "${jobs[*]}" >&2
        scancel "${jobs[@]}" 2>/dev/null
        for _ in $(seq 30); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.5; done
    fi
fi
stop slurmd
stop slurmctld
((keep_munge)) || stop munged
exit "$status"
