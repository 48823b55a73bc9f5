#!/usr/bin/env bash
# Regenerate the hashed locks (run from anywhere; needs python3 and the package index, ~5 min):
#
#   requirements/lock.sh                      # keep every pin, refresh hashes, add/drop what pyproject changed
#   requirements/lock.sh --upgrade            # re-resolve everything to the newest allowed releases
#   requirements/lock.sh --upgrade-package prefect==3.9.2 [--upgrade-package NAME ...]
#
# requirements/dev.lock      pyproject's dependencies + [dev] + build-system.requires at the versions pip's own
#                            resolver (pip-compile, this machine's pip configuration) picks: what
#                            `pip install -e '.[dev]'` installs here; universal markers, sha256 of every file.
# containers/locks/*.lock    the images (see containers/README.md, "Supply chain"), pinned to dev.lock's versions:
#   image[-EXTRAS].lock      the project's dependencies (+ the image's extras) without the torch family,
#                            universal (Python 3.11 Debian and 3.12 Ubuntu bases alike)
#   torch-VERSION.lock       one torch layer: torch + torchvision + what they need, for each TORCH_SPEC
#                            the Dockerfiles and build.sh use (2.13.0 = the +cpu wheel of /opt/wheels)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q pip-tools==7.7.0 uv==0.13.9
export CUSTOM_COMPILE_COMMAND="requirements/lock.sh" UV_CUSTOM_COMPILE_COMMAND="requirements/lock.sh"
export UV_CACHE_DIR="$tools/uv-cache"

# what to lock beside the project's dependencies: its build requirements (the project is installed
# with --no-build-isolation, so pip fetches nothing unhashed to build it)
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' \
    >"$tools/build.in"
uvc() { "$tools/venv/bin/uv" pip compile --quiet --generate-hashes --no-annotate "$@"; }

# drop the torch family (torch, torchvision, triton, nvidia-*, cuda-*): the torch layer brings it
without_torch() {
    python3 - "$1" <<'EOF'
import re, sys
path = sys.argv[1]
keep, out = True, []
for line in open(path):
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", line)
    if m:
        keep = not re.fullmatch(r"torch|torchvision|triton|nvidia-.*|cuda-.*", m[1].lower().replace("_", "-"))
    if keep or not (m or line.startswith(" ")):
        out.append(line)
open(path, "w").write("".join(out))
EOF
}

# dev.lock: the versions come from pip's own resolver (pip-compile, this machine's pip configuration;
# the current lock's pins are kept unless --upgrade*); uv then writes them universally (every Python >= 3.11
# and platform, e.g. async-timeout for 3.11.0-3.11.2) with the sha256 of every file of each pin
[[ ! -f requirements/dev.lock ]] || cp requirements/dev.lock "$tools/dev.pins"
"$tools/venv/bin/pip-compile" --quiet --extra dev --all-build-deps --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links "$@" -o "$tools/dev.pins" pyproject.toml
uvc --universal --python-version 3.11 --extra dev -c "$tools/dev.pins" -o requirements/dev.lock \
    pyproject.toml "$tools/build.in"

mkdir -p containers/locks
for extras in "" "plip,titan,fetch"; do
    out="containers/locks/image${extras:+-${extras//,/-}}.lock"
    extra_args=()
    for e in ${extras//,/ }; do extra_args+=(--extra "$e"); done
    uvc --universal --python-version 3.11 "${extra_args[@]}" -c requirements/dev.lock \
        -o "$out" pyproject.toml "$tools/build.in"
    without_torch "$out"
done

# torch layers, constrained to the image lock's versions of what they share (numpy, pillow, sympy, ...)
printf 'torch==2.14.1\ntorchvision==0.29.1\n' >"$tools/torch-2.14.1.in"
uvc --universal --python-version 3.11 -c containers/locks/image.lock -c requirements/dev.lock \
    -o containers/locks/torch-2.14.1.lock "$tools/torch-2.14.1.in"
# the CPU wheel of the local wheel dir (cp311, Linux x86_64 only) + PyPI's torchvision 0.28.0
printf 'torch==2.13.0+cpu\ntorchvision==0.28.0\n' >"$tools/torch-2.13.0.in"
uvc --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links "${STAMP_WHEELS_DIR:-/opt/wheels}" \
    -c containers/locks/image.lock -o containers/locks/torch-2.13.0.lock "$tools/torch-2.13.0.in"
