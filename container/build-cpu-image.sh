#!/usr/bin/env bash
# Build the CPU container image with no registry of base images: Debian's own packages make the root
# filesystem (mmdebstrap), podman imports it, and pip installs torch, darkhorse and its deps from wheels
# collected on the host. Three layers, each cached under a key of what it was built from:
#   base  localhost/darkhorse-cpu-base:KEY   Debian + python3 (key: suite, package list)
#   deps  localhost/darkhorse-cpu-deps:KEY   venv with torch and every dependency (key: base, TORCH_SPEC,
#                                            extras, pyproject.toml, constraints.txt)
#   final $IMAGE                             darkhorse itself (rebuilt every time: seconds)
# so a rerun after a source change only redoes the last layer. Needs root (mmdebstrap, podman), a host
# Python of the image's minor version (wheels are resolved for it) and the Debian mirror and PyPI.
#
#   container/build-cpu-image.sh          (make image: TORCH_SPEC and PYTHON come from the Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/darkhorse-cpu:latest}
TORCH_SPEC=${TORCH_SPEC:?set TORCH_SPEC, as make image does}
PYTHON=${PYTHON:-.venv/bin/python}
EXTRAS=${DARKHORSE_EXTRAS:-serve}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
CONTAINER_PYTHON=3.11  # bookworm's python3
CONSTRAINTS=constraints.txt
VENV=/opt/darkhorse
# runc refuses podman's default rlimits (above this machine's hard limits), so every run names its own.
RUN=(podman run --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)

log() { printf '== [%4ds] %s\n' "$SECONDS" "$*" >&2; }  # seconds since the start
key() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
have_image() { podman image exists "$1"; }
# Keep only the current tag of a cache layer: old keys are dead weight (each deps layer is ~1 GB).
prune_other_tags() {
    local repo=$1 keep=$2 tag
    for tag in $(podman images --noheading --format '{{.Repository}}:{{.Tag}}' "$repo"); do
        [[ $tag == "$repo:$keep" ]] || podman rmi "$tag" >/dev/null || true
    done
}
# Run a command in a new container from $1 and commit the result as $2 (podman run --rm can't commit);
# options for podman run come before `--`, the command after it.
commit_step() {
    local from=$1 to=$2 args=()
    shift 2
    while [[ $1 != -- ]]; do args+=("$1"); shift; done
    shift
    "${RUN[@]}" --name "$builder" "${args[@]}" "$from" "$@"
    podman commit -q "${COMMIT_CHANGES[@]}" "$builder" "$to" >/dev/null
    podman rm "$builder" >/dev/null
}

[[ $EUID -eq 0 ]] || { echo "build-cpu-image: run as root (mmdebstrap --mode=root, podman's system store)" >&2; exit 1; }
for tool in mmdebstrap podman runc; do
    command -v "$tool" >/dev/null || { echo "build-cpu-image: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
host_python=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[[ $host_python == "$CONTAINER_PYTHON" ]] || {
    echo "build-cpu-image: $PYTHON is Python $host_python but the image's is $CONTAINER_PYTHON (wheels must match)" >&2
    exit 1
}
work=$(mktemp -d)
builder=darkhorse-build-$$
trap 'podman rm -f "$builder" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

base_key=$(key "$SUITE" "$PACKAGES")
base=localhost/darkhorse-cpu-base:$base_key
if have_image "$base"; then
    log "base $base (cached)"
else
    log "base: mmdebstrap $SUITE with $PACKAGES"
    mmdebstrap --quiet --mode=root --variant=minbase --include="$PACKAGES" "$SUITE" "$work/base.tar"
    podman import -q "$work/base.tar" "$base" >/dev/null
    rm "$work/base.tar"
    prune_other_tags localhost/darkhorse-cpu-base "$base_key"
fi

deps_key=$(key "$base_key" "$TORCH_SPEC" "$EXTRAS" "$(sha256sum pyproject.toml "$CONSTRAINTS")")
deps=localhost/darkhorse-cpu-deps:$deps_key
if have_image "$deps"; then
    log "deps $deps (cached)"
else
    log "deps: collecting wheels for $TORCH_SPEC and darkhorse[$EXTRAS] on the host"
    "$PYTHON" -m pip wheel -q -c "$CONSTRAINTS" -w "$work/wheels" "$TORCH_SPEC" ".[$EXTRAS]"
    rm "$work"/wheels/darkhorse-*.whl
    log "deps: installing $(ls "$work/wheels" | wc -l) wheels into $VENV"
    COMMIT_CHANGES=()
    commit_step "$base" "$deps" --network none -v "$work/wheels:/wheels:ro" -- sh -ec \
        "python3 -m venv $VENV && $VENV/bin/pip install -q --no-cache-dir --no-index --no-deps /wheels/*.whl"
    prune_other_tags localhost/darkhorse-cpu-deps "$deps_key"
fi

log "darkhorse: building the wheel and installing it as $IMAGE"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/dist" .
COMMIT_CHANGES=(
    --change "ENV PATH=$VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    --change "ENV PYTHONUNBUFFERED=1"
    --change "WORKDIR /work"
    --change 'ENTRYPOINT ["darkhorse"]'
    --change 'CMD ["--help"]'
)
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
commit_step "$deps" "$IMAGE" --network none -v "$work/dist:/dist:ro" -- sh -ec \
    "$VENV/bin/pip install -q --no-cache-dir --no-index --no-deps /dist/darkhorse-*.whl && $VENV/bin/pip check >/dev/null
    mkdir -p /work"
# The image this one replaced is now untagged: drop it unless a container still uses it.
[[ -z $previous || $previous == "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]] || podman rmi "$previous" >/dev/null 2>&1 || true
log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) uncompressed)"
