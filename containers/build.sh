#!/usr/bin/env bash
# Build one stage image with podman (or docker: STAMP_BUILDER=docker).
#
#   containers/build.sh STAGE [--cpu] [--encoders "uni conch"] [--base IMAGE] [--tag TAG]
#   containers/build.sh base                  # only create the local Debian base image
#
# STAGE is preprocess, modeling or report. Tags localhost/stamp-<stage>:<version>[-cpu].
#
# --cpu     base = a local Debian bookworm image made with debootstrap (cached as a tar under
#           $STAMP_PODMAN_STATE/base, the private state dir of podman-setup.sh, so a second run skips
#           debootstrap; a state dir others could change is refused), torch = the CPU wheel
#           from $STAMP_WHEELS_DIR (default /opt/wheels) mounted read-only at build time.
# GPU       base = $STAMP_CUDA_BASE (default: the CUDA base image named in the Dockerfile), torch from PyPI.
# weights   --encoders (or $STAMP_BAKE_ENCODERS) names encoders of containers/weights.lock.json to bake;
#           default none. The HF token is passed as the build secret `hf_token` from
#           $HF_TOKEN_FILE or $HF_TOKEN (never as a build argument, so it lands in no layer).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=SCRIPTDIR/../deployments/lib/state-dir.sh
. "$REPO/deployments/lib/state-dir.sh"
if ((EUID == 0)); then
    STATE=${STAMP_PODMAN_STATE:-/var/lib/stamp-podman}
else
    STATE=${STAMP_PODMAN_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/stamp-podman}
fi
BUILDER=${STAMP_BUILDER:-podman}
CPU_BASE=${STAMP_CPU_BASE:-localhost/stamp-base:debian-bookworm}
SUITE=bookworm
log() { echo "build.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

usage() { sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

STAGE=${1:-}
[[ -n $STAGE && $STAGE != -h && $STAGE != --help ]] || {
    usage
    exit 2
}
shift
CPU=0
ENCODERS=${STAMP_BAKE_ENCODERS:-}
BASE=""
TAG=""
while (($#)); do
    case $1 in
    --cpu) CPU=1 ;;
    --encoders) ENCODERS=$2 && shift ;;
    --base) BASE=$2 && shift ;;
    --tag) TAG=$2 && shift ;;
    -h | --help) usage && exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

if [[ $BUILDER == podman && -z ${CONTAINERS_CONF:-} ]]; then
    eval "$("$HERE/podman-setup.sh")"
fi

debian_mirror() {
    local m
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -n $m ]] || m=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    echo "${m:-http://deb.debian.org/debian}"
}

# The local CPU base: debootstrap minbase -> tar (cached) -> podman import.
ensure_cpu_base() {
    if $BUILDER image exists "$CPU_BASE" 2>/dev/null; then
        return
    fi
    # the cached tar becomes every CPU image's root filesystem: only from a folder no other user can change
    ensure_state_dir "$STATE" 700 STAMP_PODMAN_STATE
    ensure_state_dir "$STATE/base" 700 STAMP_PODMAN_STATE
    local tar="$STATE/base/debian-$SUITE-minbase.tar"
    if [[ ! -s $tar ]]; then
        command -v debootstrap >/dev/null || die "debootstrap is missing: run containers/podman-setup.sh as root"
        local root="$STATE/base/rootfs.$$" t0=$SECONDS
        rm -rf "$root"
        log "debootstrap --variant=minbase $SUITE ($(debian_mirror)) ..."
        debootstrap --variant=minbase "$SUITE" "$root" "$(debian_mirror)" >"$STATE/base/debootstrap.log" 2>&1 ||
            die "debootstrap failed, see $STATE/base/debootstrap.log"
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
        rm -rf "$root"
        log "debootstrap done in $((SECONDS - t0)) s -> $tar"
    fi
    $BUILDER import -q --change 'CMD ["/bin/bash"]' \
        --change "LABEL org.opencontainers.image.description=debian-$SUITE-minbase-debootstrap" \
        "$tar" "$CPU_BASE" >/dev/null
    log "imported $tar as $CPU_BASE"
}

[[ $STAGE == base ]] && {
    ensure_cpu_base
    exit 0
}
case $STAGE in
preprocess | modeling | report) ;;
*) die "unknown stage '$STAGE': choose preprocess, modeling or report" ;;
esac
DOCKERFILE="$HERE/$STAGE.Dockerfile"
[[ -f $DOCKERFILE ]] || die "$DOCKERFILE is missing"

VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -1)
GIT_REV=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $GIT_REV != unknown && -n $(git -C "$REPO" status --porcelain 2>/dev/null) ]]; then
    GIT_REV="$GIT_REV-dirty"
fi
LOCK_SHA=$(sha256sum "$HERE/weights.lock.json" | cut -d' ' -f1)

args=(--network host --layers)
# podman writes OCI images by default, which drop SHELL (pipefail): use the docker format.
[[ $BUILDER != podman ]] || args+=(--format docker)
args+=(
    --build-arg "STAMP_VERSION=$VERSION" --build-arg "GIT_REVISION=$GIT_REV"
    --build-arg "WEIGHTS_LOCK_SHA256=$LOCK_SHA")
if grep -q '^ARG BAKE_ENCODERS' "$DOCKERFILE"; then
    args+=(--build-arg "BAKE_ENCODERS=$ENCODERS")
elif [[ -n $ENCODERS ]]; then
    die "the $STAGE image runs no encoder: it bakes no weights (drop --encoders)"
fi
if ((CPU)); then
    if [[ -z $BASE ]]; then
        ensure_cpu_base
        BASE=$CPU_BASE
    fi
    # the local CPU wheel + PyPI's torchvision (made importable by containers/torchvision_shim.py)
    args+=(--build-arg "TORCH_SPEC=torch==2.13.0 torchvision==0.28.0" --build-arg TORCH_INDEX_URL=)
    WHEELS=${STAMP_WHEELS_DIR:-/opt/wheels}
    if [[ -d $WHEELS ]]; then
        args+=(-v "$WHEELS:/wheels:ro" --build-arg WHEELS_DIR=/wheels)
    else
        log "no local wheel dir $WHEELS: torch comes from the index (set STAMP_WHEELS_DIR for the CPU wheel)"
    fi
    TAG=${TAG:-localhost/stamp-$STAGE:$VERSION-cpu}
else
    BASE=${BASE:-${STAMP_CUDA_BASE:-}}
    TAG=${TAG:-localhost/stamp-$STAGE:$VERSION}
fi
if [[ -n $BASE ]]; then
    args+=(--build-arg "BASE_IMAGE=$BASE")
    digest=$($BUILDER image inspect --format '{{.Digest}}' "$BASE" 2>/dev/null || echo unresolved)
    args+=(--build-arg "BASE_DIGEST=$digest")
fi
# pip behind a TLS-intercepting proxy needs the host's CA bundle; mounted, never baked in.
HOST_CA=${STAMP_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
if [[ -s $HOST_CA ]]; then
    args+=(-v "$HOST_CA:/run/host-ca.crt:ro" --build-arg PIP_CERT_FILE=/run/host-ca.crt)
fi

# The HF token travels only as a build secret (tmpfs at /run/secrets/hf_token during one RUN).
secret_tmp=""
cleanup() { [[ -z $secret_tmp ]] || rm -f "$secret_tmp"; }
trap cleanup EXIT
if [[ -n ${HF_TOKEN_FILE:-} ]]; then
    args+=(--secret "id=hf_token,src=$HF_TOKEN_FILE")
elif [[ -n ${HF_TOKEN:-} ]]; then
    secret_tmp=$(mktemp)
    chmod 600 "$secret_tmp"
    printf '%s' "$HF_TOKEN" >"$secret_tmp"
    args+=(--secret "id=hf_token,src=$secret_tmp")
fi

log "building $TAG from $DOCKERFILE (base ${BASE:-Dockerfile default}, encoders: ${ENCODERS:-none})"
t0=$SECONDS
$BUILDER build "${args[@]}" -f "$DOCKERFILE" -t "$TAG" "$REPO"
log "built $TAG in $((SECONDS - t0)) s"
echo "$TAG"
