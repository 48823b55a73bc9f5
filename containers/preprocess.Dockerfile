# STAMP preprocess stage: tiling (OpenSlide) and tile-feature extraction (torch, timm, encoder extras).
# Build: containers/build.sh preprocess [--cpu] [--encoders "uni2 virchow2"]   (context = repo root)
# Run:   podman run --rm --device nvidia.com/gpu=all -v CFG:/cfg:ro -v SLIDES:/slides:ro -v OUT:/out \
#          localhost/stamp-preprocess:VERSION stamp -c /cfg/config.yaml preprocess
# The CUDA base only brings the OS and the NVIDIA container env: the torch wheels carry their own
# CUDA libraries, so the small `base` flavour suffices (any CUDA image can be passed).
ARG BASE_IMAGE=docker.io/nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# the same lines serve Debian and Ubuntu bases, whose package versions differ (DL3008)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --create-home --home-dir /home/stamp --shell /bin/bash stamp

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Python packages come from the hashed locks of containers/locks/ (written by requirements/lock.sh) and
# are installed with --require-hashes: a file whose sha256 is not in the lock is refused.
COPY containers/locks /opt/stamp/containers/locks
# torch first (its own layer), from containers/locks/torch-<version of TORCH_SPEC>.lock: PyPI's CUDA build
# by default; the CPU variant (build.sh --cpu) sets TORCH_SPEC to the +cpu wheel of WHEELS_DIR (a mounted
# local wheel dir). With TORCH_INDEX_URL set, torch, torchvision and their dependencies come from that
# index alone (--index-url, never an extra index), pinned by version only: see containers/README.md.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=""
ARG WHEELS_DIR=""
ARG PIP_CERT_FILE=""
# TORCH_SPEC holds pinned requirements, split on purpose (SC2086); hadolint cannot see the pins (DL3013)
# hadolint ignore=SC2086,DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && if [ -n "$WHEELS_DIR" ]; then export PIP_FIND_LINKS="$WHEELS_DIR"; fi \
    && python3 -m venv /opt/venv \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" $TORCH_SPEC; \
    else \
        version="${TORCH_SPEC%% *}" && version="${version#torch==}" \
        && lock="/opt/stamp/containers/locks/torch-${version%%+*}.lock" \
        && for req in $TORCH_SPEC; do \
            grep -Eq "^${req}[+ ]" "$lock" \
                || { echo "no hashed lock pins $req ($lock): run requirements/lock.sh" >&2; exit 1; }; \
        done \
        && pip install --require-hashes -r "$lock"; \
    fi

# the project's dependencies (+ STAMP_EXTRAS), from containers/locks/image[-EXTRAS].lock (extras joined
# by "-"): the torch layer above already satisfies their torch requirements
ARG STAMP_EXTRAS="plip,titan,fetch"
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$PIP_CERT_FILE" ]; then export PIP_CERT="$PIP_CERT_FILE"; fi \
    && extras="$(echo "$STAMP_EXTRAS" | tr , -)" \
    && pip install --require-hashes -r "/opt/stamp/containers/locks/image${extras:+-$extras}.lock"

# the project, from the build context, at /opt/stamp: deployments (deployments/prefect.yaml) run
# flows/<stage>.py from there; the packages are installed into the venv from the same files
COPY pyproject.toml README.m[d] /opt/stamp/
COPY stamp /opt/stamp/stamp
COPY tasks /opt/stamp/tasks
COPY flows /opt/stamp/flows
COPY containers/torchvision_shim.py /opt/stamp/containers/
# a local project path, not a PyPI name (DL3013), without dependencies (the locks brought them) and
# built with the locked setuptools (no build isolation: nothing unhashed is fetched); `pip check`
# fails the build when the locks and the project disagree. The shim makes PyPI's torchvision import
# beside the CPU torch (a no-op where its ops load); pip-freeze.txt records every installed version.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps --no-build-isolation /opt/stamp \
    && pip check \
    && rm -rf /opt/stamp/build /opt/stamp/*.egg-info \
    && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && cp /opt/stamp/containers/torchvision_shim.py "$site/stamp_torchvision_shim.py" \
    && echo "import stamp_torchvision_shim" > "$site/stamp_torchvision_shim.pth" \
    && pip freeze > /opt/stamp/pip-freeze.txt

# encoder weights, baked from the lock and verified by stamp.encoders;
# the HF token is a build secret (tmpfs during this RUN only), never an ARG or ENV
COPY containers/weights.lock.json containers/bake_weights.py /opt/stamp/containers/
ARG BAKE_ENCODERS=""
RUN --mount=type=secret,id=hf_token,required=false \
    python /opt/stamp/containers/bake_weights.py --lock /opt/stamp/containers/weights.lock.json \
        --weights-dir /opt/stamp/weights "$BAKE_ENCODERS"

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    STAMP_WEIGHTS_DIR=/opt/stamp/weights STAMP_WEIGHTS_LOCK=/opt/stamp/containers/weights.lock.json \
    STAMP_HOME=/tmp/stamp STAMP_CACHE_DIR=/tmp/stamp-cache PREFECT_HOME=/tmp/prefect \
    MPLCONFIGDIR=/tmp/matplotlib MPLBACKEND=Agg DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# smoke check; leaves nothing under /tmp (PREFECT_HOME etc. must be created by the run-time user)
RUN python -c "import stamp, openslide, torch, timm, transformers, prefect" && stamp --help > /dev/null \
    && rm -rf /tmp/prefect /tmp/matplotlib /tmp/stamp /tmp/stamp-cache

ARG BASE_IMAGE
ARG BASE_DIGEST=unresolved
ARG STAMP_VERSION=0.1.0
ARG GIT_REVISION=unknown
ARG WEIGHTS_LOCK_SHA256=unknown
LABEL org.opencontainers.image.title="stamp-preprocess" \
      org.opencontainers.image.description="STAMP preprocessing: tiling and tile features" \
      org.opencontainers.image.version="${STAMP_VERSION}" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}" \
      io.stamp.stage="preprocess" \
      io.stamp.torch="${TORCH_SPEC}" \
      io.stamp.weights.lock.sha256="${WEIGHTS_LOCK_SHA256}" \
      io.stamp.weights.baked="${BAKE_ENCODERS}"

USER 10001
WORKDIR /home/stamp
CMD ["stamp", "--help"]
