#!/usr/bin/env bash
# Set up rootful podman where no Docker engine runs (CI VMs, sandboxes).
#
#   eval "$(containers/podman-setup.sh)"     # installs what is missing, prints the env to export
#
# * installs podman, buildah, runc and debootstrap with apt-get when missing (needs root);
# * writes containers.conf and storage.conf into a private state dir ($STAMP_PODMAN_STATE; default
#   /var/lib/stamp-podman for root, ${XDG_STATE_HOME:-~/.local/state}/stamp-podman otherwise), made with
#   mode 0700; an existing one that another user owns or can write (or a folder above it) is refused, since
#   it holds the storage config, the image store and build.sh's cached base image. Touches no system file;
# * prints `export CONTAINERS_CONF=... CONTAINERS_STORAGE_CONF=...` on stdout (logs go to stderr).
#
# Why these settings (see containers/README.md): crun fails here on rlimits and on the hybrid
# cgroup layout, so the runtime is runc with cgroupfs and explicit nofile/nproc ulimits below the
# sandbox's hard limits. Storage is overlay when the kernel allows it, else vfs
# ($STAMP_PODMAN_DRIVER forces one).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/../deployments/lib/state-dir.sh
. "$HERE/../deployments/lib/state-dir.sh"
if ((EUID == 0)); then
    STATE=${STAMP_PODMAN_STATE:-/var/lib/stamp-podman}
else
    STATE=${STAMP_PODMAN_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/stamp-podman}
fi
log() { echo "podman-setup: $*" >&2; }
die() {
    echo "podman-setup: ERROR: $*" >&2
    exit 1
}
ensure_state_dir "$STATE" 700 STAMP_PODMAN_STATE

need=()
for bin in podman buildah runc debootstrap; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if ((${#need[@]})); then
    if [[ $(id -u) != 0 ]]; then
        log "missing ${need[*]}; run as root or install them: apt-get install -y podman buildah runc debootstrap"
        exit 1
    fi
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends podman buildah runc debootstrap \
        ca-certificates uidmap iptables >&2
fi

write_file "$STATE/containers.conf" 644 <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

write_storage() {
    write_file "$STATE/storage.conf" 644 <<EOF
[storage]
driver = "$1"
runroot = "$STATE/run-$1"
graphroot = "$STATE/store-$1"
EOF
}

export CONTAINERS_CONF="$STATE/containers.conf" CONTAINERS_STORAGE_CONF="$STATE/storage.conf"
driver=${STAMP_PODMAN_DRIVER:-}
if [[ -z $driver ]]; then
    driver=overlay
    write_storage overlay
    if ! podman info --format '{{.Store.GraphDriverName}}' >/dev/null 2>&1; then
        log "overlay storage is not usable here; falling back to vfs (slower, uses more disk)"
        driver=vfs
    fi
fi
write_storage "$driver"
podman info --format '{{.Store.GraphDriverName}} {{.Host.OCIRuntime.Name}}' >/dev/null
log "podman $(podman --version | awk '{print $3}'), storage $driver, state $STATE"
echo "export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf"
