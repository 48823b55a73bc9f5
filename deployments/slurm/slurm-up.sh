#!/usr/bin/env bash
# Install (if missing) and start a single-node SLURM cluster on this host: munged, slurmctld, slurmd.
#
#   sudo deployments/slurm/slurm-up.sh          # idempotent; prints the state dir at the end
#   sudo deployments/slurm/slurm-down.sh        # stops what this script started, by PID
#
# Environment:
#   STAMP_SLURM_STATE   state dir (PIDs, logs, spool, a copy of slurm.conf)   default /var/lib/stamp-slurm
#                       made root-owned, mode 0711; an existing one (or a folder above it) that another
#                       user owns or can write is refused: slurm.conf is written there before /etc/slurm
#   STAMP_SLURM_MEM_MB  RealMemory given to the node                          default 85 % of `slurmd -C`
#   STAMP_SLURM_FORCE=1 overwrite an /etc/slurm/slurm.conf this script did not write
#   STAMP_SLURM_GPUS    GRES gpu count: `auto` (default) = the /dev/nvidia[0-9]* devices present (0 here);
#                       N > 0 with no NVIDIA device declares N *placeholder* GPUs (File=/dev/null) so that
#                       `--gpus`/`--gres` requests can be scheduled and tested on a CPU-only host.
#
# Partitions: `cpu` (default) and `gpu`, both on this one node (see deployments/slurm/README.md).
# Needs root (apt, munge key, daemons). Debian/Ubuntu only (apt-get); tested on Debian 12 with Slurm 22.05.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib/state-dir.sh
. "$HERE/../lib/state-dir.sh"
STATE="${STAMP_SLURM_STATE:-/var/lib/stamp-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="# written by stamp deployments/slurm/slurm-up.sh"
HOST="$(hostname -s)"

log() { printf '[slurm-up] %s\n' "$*" >&2; }
die() { printf '[slurm-up] ERROR: %s\n' "$*" >&2; exit 1; }
alive() { # PIDFILE NAME: the PID in PIDFILE is a running NAME
    local pid
    pid="$(pid_from "$1")" && is_process "$pid" "$2"
}

[[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts munged/slurmctld/slurmd)"
t0=$(date +%s)
# slurmctld runs as user slurm: it must traverse the state dir (to ctld/ and log/), not list or write it
ensure_state_dir "$STATE" 711 STAMP_SLURM_STATE

# --- 1. packages ---------------------------------------------------------------------------------
need=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${pair%%:*}" ]] || need+=("${pair##*:}")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "apt-get not found: install ${need[*]} by hand"
    log "installing ${need[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${need[@]}" >"$STATE/apt.log" 2>&1 || {
        apt-get update -q >>"$STATE/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends "${need[@]}" >>"$STATE/apt.log" 2>&1 ||
            die "apt-get install ${need[*]} failed: see $STATE/apt.log"
    }
fi
t_install=$(($(date +%s) - t0))

for d in slurmctld slurmd; do
    if ! alive "$STATE/$d.pid" "$d" && other="$(pgrep -x "$d" | head -1)" && [[ -n $other ]]; then
        die "$d pid $other is running but was not started with state dir $STATE: stop it (slurm-down.sh with its STAMP_SLURM_STATE) first"
    fi
done
getent group slurm >/dev/null || die "user 'slurm' missing (the slurmctld package creates it)"
mkdir -p "$STATE"/{log,ctld,spool}
chmod 755 "$STATE/log"
chown slurm:slurm "$STATE/ctld" "$STATE/log"

# --- 2. slurm.conf for this host -----------------------------------------------------------------
read -r -a hw < <(/usr/sbin/slurmd -C | head -1)
declare -A H
for kv in "${hw[@]}"; do H["${kv%%=*}"]="${kv#*=}"; done
mem="${STAMP_SLURM_MEM_MB:-$((H[RealMemory] * 85 / 100))}"
mapfile -t nv < <(compgen -G '/dev/nvidia[0-9]*' | sort -V)
gpus="${STAMP_SLURM_GPUS:-auto}"
[[ $gpus == auto ]] && gpus=${#nv[@]}
[[ $gpus =~ ^[0-9]+$ ]] || die "STAMP_SLURM_GPUS must be 'auto' or a number, got '$gpus'"
gres_node="" gres_types=""
if ((gpus > 0)); then
    gres_node=" Gres=gpu:$gpus" gres_types="GresTypes=gpu"
    if ((${#nv[@]} >= gpus)); then
        files="$(printf '%s\n' "${nv[@]:0:gpus}" | paste -sd,)"
        gres_line="NodeName=$HOST Name=gpu File=$files"
    else
        log "declaring $gpus placeholder GPU(s) (File=/dev/null): jobs get CUDA_VISIBLE_DEVICES but no device"
        gres_line="$(for _ in $(seq "$gpus"); do echo "NodeName=$HOST Name=gpu File=/dev/null"; done)"
    fi
fi
new_conf="$STATE/slurm.conf"
write_file "$new_conf" 644 <<EOF
$MARKER (state: $STATE)
ClusterName=stamp
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
# no cgroups (no systemd here; hybrid cgroup layouts are a risk)
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
MinJobAge=3600
$gres_types
NodeName=$HOST CPUs=${H[CPUs]} Boards=${H[Boards]} SocketsPerBoard=${H[SocketsPerBoard]} CoresPerSocket=${H[CoresPerSocket]} ThreadsPerCore=${H[ThreadsPerCore]} RealMemory=$mem$gres_node State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF
printf '%s\n%s\n' "$MARKER" "${gres_line:-# no GPUs}" | write_file "$new_conf.gres" 644
if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${STAMP_SLURM_FORCE:-0} != 1 ]]; then
    die "$CONF exists and was not written by this script (set STAMP_SLURM_FORCE=1 to replace it)"
fi
GRES_CONF=/etc/slurm/gres.conf
if [[ -s $GRES_CONF ]] && ! grep -qF "$MARKER" "$GRES_CONF" && [[ ${STAMP_SLURM_FORCE:-0} != 1 ]]; then
    die "$GRES_CONF exists and was not written by this script (set STAMP_SLURM_FORCE=1 to replace it)"
fi
if ! cmp -s "$new_conf" "$CONF" 2>/dev/null || ! cmp -s "$new_conf.gres" "$GRES_CONF" 2>/dev/null; then
    if alive "$STATE/slurmctld.pid" slurmctld || alive "$STATE/slurmd.pid" slurmd; then
        log "slurm.conf changed: restarting the daemons"
        "$HERE/slurm-down.sh" --keep-munge
    fi
    mkdir -p /etc/slurm
    install -m 644 "$new_conf" "$CONF"
    install -m 644 "$new_conf.gres" "$GRES_CONF"
fi

# --- 3. munged -----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating the munge key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
fi
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if alive "$STATE/munged.pid" munged; then
    :
elif alive /run/munge/munged.pid munged; then
    log "munged already running (pid $(pid_from /run/munge/munged.pid)), not started by us: left alone"
else
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do alive /run/munge/munged.pid munged && break; sleep 0.1; done
    alive /run/munge/munged.pid munged || die "munged did not start (see /var/log/munge/munged.log)"
    pid_from /run/munge/munged.pid | write_file "$STATE/munged.pid" 644
fi
munge -n | unmunge >/dev/null || die "munge -n | unmunge failed: munged is not usable"

# --- 4. slurmctld, slurmd ------------------------------------------------------------------------
start_daemon() { # name
    local name=$1 pidf="$STATE/$1.pid"
    alive "$pidf" "$name" && return 0
    rm -f "$pidf"
    "/usr/sbin/$name" || die "$name failed to start: see $STATE/log/$name.log"
    for _ in $(seq 100); do alive "$pidf" "$name" && return 0; sleep 0.1; done
    die "$name did not write $pidf: see $STATE/log/$name.log"
}
start_daemon slurmctld
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
start_daemon slurmd

# --- 5. wait for the node --------------------------------------------------------------------------
state=""
for i in $(seq 120); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)"
    case "$state" in
        idle | mixed | allocated) break ;;
        down* | drain* | *drain) ((i % 10 == 5)) && scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
[[ $state =~ ^(idle|mixed|allocated) ]] || die "node $HOST is '$state' after 60 s: see $STATE/log/"
t_total=$(($(date +%s) - t0))
printf 'install_s=%s\nup_s=%s\n' "$t_install" "$t_total" | write_file "$STATE/timings" 644
log "up: node $HOST $state (${H[CPUs]} CPUs, $mem MB, $gpus GPU(s)), partitions cpu (default) and gpu; install ${t_install}s, total ${t_total}s"
echo "$STATE"
