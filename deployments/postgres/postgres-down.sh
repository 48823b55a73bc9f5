#!/usr/bin/env bash
# Stop the PostgreSQL instance that postgres-up.sh started (pg_ctl stop -m fast on its data dir).
#
#   sudo deployments/postgres/postgres-down.sh [--purge]
#
# pg_ctl reads the PID from the cluster's postmaster.pid and checks it is that cluster's postmaster
# before signalling it, so nothing else is ever killed. --purge then deletes the state dir (only one
# that postgres-up.sh made: it holds its marker file). Idempotent.
set -euo pipefail

STATE="${STAMP_POSTGRES_STATE:-/var/lib/stamp-postgres}"
purge=0
[[ ${1:-} == --purge ]] && purge=1

log() { printf '[postgres-down] %s\n' "$*" >&2; }
die() {
    printf '[postgres-down] ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "run as root"
[[ $STATE == /* && ! -L $STATE ]] || die "STAMP_POSTGRES_STATE must be an absolute path, not a link: '$STATE'"
[[ -d $STATE ]] || {
    log "no state dir $STATE: nothing to stop"
    exit 0
}
[[ -e $STATE/.stamp-postgres ]] || die "$STATE was not made by postgres-up.sh (no .stamp-postgres marker): not touching it"
[[ "$(stat -c %u "$STATE")" == "$(id -u)" ]] || die "$STATE is not owned by $(id -un): not touching it"
cd /

DATA="$STATE/data"
if [[ -s $DATA/PG_VERSION ]]; then
    BIN="/usr/lib/postgresql/$(cat "$DATA/PG_VERSION")/bin"
    [[ -x $BIN/pg_ctl ]] || die "$BIN/pg_ctl missing: cannot stop the cluster in $DATA"
    if runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null ||
            die "pg_ctl stop failed: see $STATE/log/server/postgresql.log"
        log "stopped PostgreSQL ($DATA)"
    fi
fi
if ((purge)); then
    rm -rf --one-file-system -- "$STATE"
    log "removed $STATE"
fi
exit 0
