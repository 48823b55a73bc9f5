#!/usr/bin/env bash
# Install (if missing) and start a PostgreSQL instance for the Prefect server: 127.0.0.1 only, its own
# state dir, role + database `prefect` with pg_trgm, password in a 0600 pgpass file. Idempotent.
#
#   sudo deployments/postgres/postgres-up.sh     # last stdout line: postgresql+asyncpg://prefect@127.0.0.1:5433/prefect
#   sudo PGPASSFILE=/var/lib/stamp-postgres/pgpass stamp server --database "$(tail -1 /var/lib/stamp-postgres/url)"
#   sudo deployments/postgres/postgres-down.sh   # stops it (pg_ctl stop); --purge also deletes the state dir
#
# The URL holds no password: asyncpg (Prefect's PostgreSQL driver) reads it from the file named by
# PGPASSFILE (libpq's pgpass format, `host:port:db:user:password`, which must be mode 0600), or from
# PGPASSWORD, or ~/.pgpass. So it is never on a command line, in `ps`, or in the server's log.
#
# Environment:
#   STAMP_POSTGRES_STATE  state dir                                   default /var/lib/stamp-postgres
#   STAMP_POSTGRES_PORT   TCP port on 127.0.0.1                       default 5433 (5432 is Debian's own cluster)
#   STAMP_POSTGRES_DB     database (created if missing, with pg_trgm) default prefect
#   STAMP_POSTGRES_ROLE   login role owning it                        default prefect
#
# State dir layout (root-owned, mode 0710 group postgres: the server, running as `postgres`, may only
# traverse it to its data; no other user can enter it):
#   data/      the cluster (postgres, 0700)       run/   the unix socket (postgres, 0700)
#   log/       apt.log, initdb.log, server/postgresql.log         password, pgpass, url   (root, 0600)
# An existing state dir is used only if it is a real directory owned by the user running this script
# and not writable by group or others.
#
# Needs root (apt, runuser). Debian/Ubuntu (apt-get); PostgreSQL >= 14.9 (Prefect's minimum); tested on
# Debian 12 with PostgreSQL 15. PostgreSQL refuses to run as root: initdb/pg_ctl/psql run as `postgres`.
set -euo pipefail

STATE="${STAMP_POSTGRES_STATE:-/var/lib/stamp-postgres}"
PORT="${STAMP_POSTGRES_PORT:-5433}"
DB="${STAMP_POSTGRES_DB:-prefect}"
ROLE="${STAMP_POSTGRES_ROLE:-prefect}"
MARKER=".stamp-postgres"

log() { printf '[postgres-up] %s\n' "$*" >&2; }
die() {
    printf '[postgres-up] ERROR: %s\n' "$*" >&2
    exit 1
}

[[ $EUID -eq 0 ]] || die "run as root (it installs packages and starts PostgreSQL as the postgres user)"
[[ $PORT =~ ^[0-9]+$ ]] && ((PORT > 0 && PORT < 65536)) || die "STAMP_POSTGRES_PORT must be a TCP port, got '$PORT'"
for name in "$DB" "$ROLE"; do
    [[ $name =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "database/role names must match [a-z_][a-z0-9_]*, got '$name'"
done
[[ $STATE == /* ]] || die "STAMP_POSTGRES_STATE must be an absolute path, got '$STATE'"
cd /
t0=$(date +%s)

# --- 1. the state dir: ours, private ---------------------------------------------------------------
if [[ -L $STATE ]]; then
    die "$STATE is a symbolic link: give the real directory"
elif [[ -e $STATE ]]; then
    [[ -d $STATE ]] || die "$STATE exists and is not a directory"
    [[ "$(stat -c %u "$STATE")" == "$(id -u)" ]] ||
        die "$STATE is owned by uid $(stat -c %u "$STATE"), not by $(id -un): refusing to use it"
    mode="$(stat -c %a "$STATE")"
    ((8#$mode & 8#022)) && die "$STATE is writable by group or others (mode $mode): refusing to use it"
else
    mkdir -m 0700 -p "$STATE"
fi
chmod 0700 "$STATE" # until the postgres group is known (below)
mkdir -p -m 0700 "$STATE/log"
touch "$STATE/$MARKER"

# --- 2. packages -----------------------------------------------------------------------------------
find_bin() { compgen -G '/usr/lib/postgresql/*/bin/initdb' | sort -V | tail -1 | xargs -r dirname; }
BIN="$(find_bin || true)"
if [[ -z $BIN ]] || ! getent passwd postgres >/dev/null ||
    [[ -z "$(compgen -G '/usr/share/postgresql/*/extension/pg_trgm.control')" ]]; then
    command -v apt-get >/dev/null || die "apt-get not found: install PostgreSQL (>= 14.9, with pg_trgm) by hand"
    log "installing postgresql postgresql-contrib (apt; log: $STATE/log/apt.log)"
    export DEBIAN_FRONTEND=noninteractive
    # postgresql-contrib is a metapackage: on Debian 12 pg_trgm ships in postgresql-15 itself
    apt-get install -y -q --no-install-recommends postgresql postgresql-contrib >"$STATE/log/apt.log" 2>&1 || {
        apt-get update -q >>"$STATE/log/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends postgresql postgresql-contrib >>"$STATE/log/apt.log" 2>&1 ||
            die "apt-get install postgresql postgresql-contrib failed: see $STATE/log/apt.log"
    }
    BIN="$(find_bin || true)"
    [[ -n $BIN ]] || die "no /usr/lib/postgresql/*/bin/initdb after installing postgresql"
fi
t_install=$(($(date +%s) - t0))
getent passwd postgres >/dev/null || die "user 'postgres' missing (the postgresql-common package creates it)"
version="$("$BIN/postgres" --version | sed -nE 's/.*\(PostgreSQL\) ([0-9]+(\.[0-9]+)?).*/\1/p')"
IFS=. read -r major minor _ <<<"$version"
((major > 14 || (major == 14 && ${minor:-0} >= 9))) || die "PostgreSQL $version is older than 14.9 (Prefect's minimum)"

DATA="$STATE/data"
RUN="$STATE/run"
chown root:postgres "$STATE" "$STATE/log" && chmod 0710 "$STATE" "$STATE/log"
install -d -m 0700 -o postgres -g postgres "$RUN"
install -d -m 0700 -o postgres -g postgres "$STATE/log/server"
as_pg() { runuser -u postgres -- "$@"; }

# --- 3. the cluster --------------------------------------------------------------------------------
if [[ ! -s $DATA/PG_VERSION ]]; then
    [[ -e $DATA ]] && [[ -n "$(ls -A "$DATA")" ]] && die "$DATA is not empty but holds no cluster: move it away"
    install -d -m 0700 -o postgres -g postgres "$DATA"
    log "initdb $DATA (PostgreSQL $version)"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C.UTF-8 --auth-local=peer \
        --auth-host=scram-sha-256 >"$STATE/log/initdb.log" 2>&1 || die "initdb failed: see $STATE/log/initdb.log"
    printf "\n# added by stamp deployments/postgres/postgres-up.sh\ninclude_if_exists = 'stamp.conf'\n" |
        as_pg tee -a "$DATA/postgresql.conf" >/dev/null
fi
[[ "$(cat "$DATA/PG_VERSION")" == "$major" ]] ||
    die "$DATA is a PostgreSQL $(cat "$DATA/PG_VERSION") cluster but the installed server is $major: upgrade it (pg_upgrade) or use another STAMP_POSTGRES_STATE"

# settings this script owns; a change restarts a running server
conf_new="$(
    cat <<EOF
# written by stamp deployments/postgres/postgres-up.sh: edits are overwritten on its next run
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$RUN'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
max_connections = 200
EOF
)"
hba_new="$(
    cat <<EOF
# written by stamp deployments/postgres/postgres-up.sh: edits are overwritten on its next run
# TYPE  DATABASE  USER      ADDRESS         METHOD
local   all       postgres                  peer
host    all       $ROLE     127.0.0.1/32    scram-sha-256
EOF
)"
changed=0
if [[ "$(cat "$DATA/stamp.conf" 2>/dev/null)" != "$conf_new" ]]; then
    printf '%s\n' "$conf_new" | as_pg tee "$DATA/stamp.conf" >/dev/null
    changed=1
fi
if [[ "$(cat "$DATA/pg_hba.conf" 2>/dev/null)" != "$hba_new" ]]; then
    printf '%s\n' "$hba_new" | as_pg tee "$DATA/pg_hba.conf" >/dev/null
    changed=1
fi

# --- 4. start (pg_ctl validates the PID in postmaster.pid) ------------------------------------------
pg_ctl() { as_pg "$BIN/pg_ctl" -D "$DATA" -l "$STATE/log/server/postgresql.log" -w -t 60 "$@"; }
if pg_ctl status >/dev/null 2>&1; then
    if ((changed)); then
        log "settings changed: restarting PostgreSQL"
        pg_ctl -m fast restart >/dev/null || die "restart failed: see $STATE/log/server/postgresql.log"
    fi
else
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        die "port $PORT on 127.0.0.1 is in use by another program: choose another STAMP_POSTGRES_PORT"
    fi
    log "starting PostgreSQL on 127.0.0.1:$PORT"
    pg_ctl start >/dev/null || die "PostgreSQL did not start: see $STATE/log/server/postgresql.log"
fi

# --- 5. password, role, database, pg_trgm ------------------------------------------------------------
if [[ ! -s $STATE/password ]]; then
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$STATE/password.new")
    mv "$STATE/password.new" "$STATE/password"
fi
chmod 0600 "$STATE/password"
PASSWORD="$(cat "$STATE/password")"
[[ $PASSWORD =~ ^[0-9a-f]{48}$ ]] || die "$STATE/password is not what this script writes: remove it (a new one is generated)"

psql_su() { as_pg env PGOPTIONS="-c client_min_messages=warning" "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$RUN" -p "$PORT" -v role="$ROLE" -v db="$DB" "$@"; }
# the password travels on stdin, never on a command line
psql_su -d postgres >/dev/null <<EOF || die "creating role $ROLE / database $DB failed"
SELECT format('CREATE ROLE %I LOGIN', :'role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '$PASSWORD';
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'db', :'role', 'UTF8')
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT ALL ON DATABASE :"db" TO :"role";
EOF
psql_su -d "$DB" -c 'CREATE EXTENSION IF NOT EXISTS pg_trgm' >/dev/null || die "CREATE EXTENSION pg_trgm failed"

(umask 077 && printf '127.0.0.1:%s:*:%s:%s\n' "$PORT" "$ROLE" "$PASSWORD" >"$STATE/pgpass.new")
mv "$STATE/pgpass.new" "$STATE/pgpass"
URL="postgresql+asyncpg://$ROLE@127.0.0.1:$PORT/$DB"
(umask 077 && printf '%s\n' "$URL" >"$STATE/url.new")
mv "$STATE/url.new" "$STATE/url"

# the role can log in over TCP with the password (what the Prefect server will do)
PGPASSFILE="$STATE/pgpass" "$BIN/psql" -X -q -w -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "$DB" \
    -c "SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'" -At | grep -qx 1 ||
    die "$ROLE cannot log in to $DB over 127.0.0.1:$PORT with the password in $STATE/pgpass"

t_total=$(($(date +%s) - t0))
printf 'install_s=%s\nup_s=%s\n' "$t_install" "$t_total" >"$STATE/timings"
log "up: PostgreSQL $version on 127.0.0.1:$PORT, database $DB (pg_trgm), role $ROLE; install ${t_install}s, total ${t_total}s"
log "use: PGPASSFILE=$STATE/pgpass stamp server --database $URL"
echo "$URL"
