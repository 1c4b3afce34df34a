#!/usr/bin/env bash
# Build the stack's images and push them to the local registry under their PRODUCTION names
# (images/production.json), so the stack runs offline exactly as users run it, with only
# --registry pointing at 127.0.0.1:
#
#   postgres   images/postgres15         PostgreSQL 15 from Debian, laid out like the official image
#   service    images/metaflow-service   the Metaflow service, built from upstream's release archives
#
#   1. installs buildah, docker-registry, debootstrap, skopeo, curl if missing
#   2. starts the local registry (scripts/local_registry.sh start)
#   3. makes the base image mfstack/debian:bookworm from a debootstrap minbase
#      rootfs (kept as a tarball in the cache)
#   4. fetches and verifies the upstream archives (scripts/upstream_sources.py)
#   5. builds each image and pushes it; a one-part name such as postgres:15.10-bookworm goes to
#      library/postgres:15.10-bookworm, where Docker Hub keeps it and where udocker looks
#
# An image is rebuilt only when the hash of its folder (Containerfile, pins and
# sources) differs from the label org.mfstack.source-hash of the image already
# in the registry, so a second run on the same machine takes seconds.
#
# Run as root, non-interactive. Environment:
#   MFSTACK_UPSTREAM_DIR    folder holding the upstream archives (a local mirror); default:
#                           ../shared/upstream beside the checkout when it holds them, else
#                           download them from the release URLs in images/metaflow-service/upstream.json
#   MFSTACK_CACHE           cache root (default /var/cache/mfstack): rootfs
#                           tarball, buildah storage, registry storage
#   MFSTACK_REGISTRY_PORT   local registry port (default 5000)
#   MFSTACK_DEBIAN_MIRROR   Debian mirror for debootstrap and apt in builds
#                           (default: the machine's configured Debian mirror,
#                           else http://deb.debian.org/debian)
#   MFSTACK_PIP_INDEX_URL   PyPI index used inside the builds (default: pypi.org)
#   MFSTACK_CA_BUNDLE       CA bundle handed to pip inside the builds
#                           (default: $PIP_CERT, else the system bundle)
#   MFSTACK_REBUILD=1       rebuild and push everything, ignoring the cache
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="${MFSTACK_CACHE:-/var/cache/mfstack}"
PORT="${MFSTACK_REGISTRY_PORT:-5000}"
REGISTRY="127.0.0.1:$PORT"
SUITE=bookworm
BASE_REF="mfstack/debian:$SUITE"
BASE_KEY="debian-$SUITE-minbase-1"
ROOTFS_TAR="$CACHE/rootfs/debian-$SUITE-minbase.tar"
HASH_LABEL="org.mfstack.source-hash"
# Bump when a change of this script changes what goes into the images.
RECIPE=3

production_ref() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
    "$ROOT/images/production.json" "$1"; }
# name | folder under images/ | reference (the production name)
IMAGES=(
    "postgres|postgres15|$(production_ref postgres)"
    "service|metaflow-service|$(production_ref service)"
)

# Where a reference lives in a registry: one-part names under library/, as on Docker Hub.
registry_path() {
    local name="${1%%:*}"
    [[ $name == */* ]] && echo "$1" || echo "library/$1"
}

T0="${EPOCHREALTIME/,/.}"
CURRENT_STEP="start"

elapsed() { awk -v a="$T0" -v b="${EPOCHREALTIME/,/.}" 'BEGIN { printf "%6.1f", b - a }'; }
step() { CURRENT_STEP="$*"; echo "[build_images $(elapsed)s] $*"; }
info() { echo "[build_images $(elapsed)s]   $*"; }
die() { echo "[build_images $(elapsed)s] ERROR: $*" >&2; exit 1; }
trap 'rc=$?; echo "[build_images $(elapsed)s] FAILED during: $CURRENT_STEP (line $LINENO, exit $rc)" >&2; exit $rc' ERR

[[ "$(id -u)" == 0 ]] || die "run as root (buildah with vfs storage and debootstrap need it)"

mkdir -p "$CACHE"
exec 9>"$CACHE/build.lock"
flock -w 1800 9 || die "another build_images.sh holds $CACHE/build.lock"

# --- tools ---------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    local policy=/usr/sbin/policy-rc.d created_policy=0
    command -v apt-get >/dev/null || die "apt-get not found; install by hand: $*"
    if [[ $APT_UPDATED == 0 ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    # Keep package scripts from starting services (the docker-registry
    # package would otherwise start a system registry on port 5000).
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        || { [[ $created_policy == 1 ]] && rm -f "$policy"; die "apt-get install $* failed"; }
    [[ $created_policy == 1 ]] && rm -f "$policy"
    return 0
}

step "checking tools"
missing=()
for pair in buildah:buildah docker-registry:docker-registry debootstrap:debootstrap \
    skopeo:skopeo curl:curl flock:util-linux tar:tar; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
[[ -s /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
    info "installing: ${missing[*]}"
    apt_install "${missing[@]}"
fi
for c in buildah docker-registry debootstrap skopeo curl; do
    command -v "$c" >/dev/null || die "$c still missing after apt-get install"
done
info "buildah $(buildah --version | awk '{print $3}'), skopeo $(skopeo --version | awk '{print $3}')"

BUILDAH_ROOT="$CACHE/buildah/storage"
BUILDAH_RUNROOT="$CACHE/buildah/run"
POLICY="$CACHE/buildah/policy.json"
mkdir -p "$BUILDAH_ROOT" "$BUILDAH_RUNROOT"
[[ -s "$POLICY" ]] || echo '{"default":[{"type":"insecureAcceptAnything"}]}' >"$POLICY"
bah() { buildah --root "$BUILDAH_ROOT" --runroot "$BUILDAH_RUNROOT" --storage-driver vfs "$@"; }

# --- Debian mirror ---------------------------------------------------------

# Prints "<debian mirror> <security mirror or empty>" from the apt sources.
detect_mirrors() {
    local main="" sec="" f uris
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        while read -r kind rest; do
            [[ $kind == deb ]] || continue
            rest="$(sed -E 's/\[[^]]*\]//' <<<"$rest")"
            [[ -n ${rest// /} ]] || continue
            set -- $rest
            case "$1" in
                */debian-security*) [[ -n $sec ]] || sec="$1" ;;
                */debian | */debian/) [[ -n $main ]] || main="${1%/}" ;;
            esac
        done <"$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -r $f ]] || continue
        uris="$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f")"
        for u in $uris; do
            case "$u" in
                */debian-security*) [[ -n $sec ]] || sec="$u" ;;
                */debian | */debian/) [[ -n $main ]] || main="${u%/}" ;;
            esac
        done
    done
    echo "${main:-http://deb.debian.org/debian} ${sec:-}"
}

read -r DETECTED_MIRROR DETECTED_SECURITY < <(detect_mirrors)
MIRROR="${MFSTACK_DEBIAN_MIRROR:-$DETECTED_MIRROR}"
SECURITY="${DETECTED_SECURITY:-}"
[[ -n ${MFSTACK_DEBIAN_MIRROR:-} ]] && SECURITY=""
if [[ -z $SECURITY && $MIRROR == http://deb.debian.org/debian ]]; then
    SECURITY=http://deb.debian.org/debian-security
fi

# --- registry ---------------------------------------------------------------

step "starting local registry on $REGISTRY"
MFSTACK_CACHE="$CACHE" MFSTACK_REGISTRY_PORT="$PORT" "$HERE/local_registry.sh" start 9>&- \
    || die "local registry did not start"

# --- base image -------------------------------------------------------------

make_rootfs_tar() {
    local work="$CACHE/rootfs/work.$$" target
    target="$work/rootfs"
    rm -rf "$work"
    mkdir -p "$target"
    info "debootstrap --variant=minbase $SUITE from $MIRROR"
    if ! debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$target" "$MIRROR" >"$CACHE/rootfs/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/rootfs/debootstrap.log" >&2
        rm -rf "$work"
        die "debootstrap failed (log: $CACHE/rootfs/debootstrap.log)"
    fi
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [[ -n $SECURITY ]] && echo "deb $SECURITY $SUITE-security main"
    } >"$target/etc/apt/sources.list"
    cat >"$target/etc/apt/apt.conf.d/90mfstack" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
    cat >"$target/etc/dpkg/dpkg.cfg.d/90mfstack-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
EOF
    chroot "$target" apt-get clean
    rm -rf "$target"/var/lib/apt/lists/* "$target"/var/cache/apt/*.bin \
        "$target"/var/log/*.log "$target"/etc/hostname "$target"/etc/resolv.conf
    : >"$target/etc/machine-id"
    tar --numeric-owner --xattrs -C "$target" -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$work"
}

step "base image $BASE_REF"
base_key_now="$(bah inspect --type image --format "{{index .Docker.Config.Labels \"org.mfstack.base-key\"}}" \
    "localhost/$BASE_REF" 2>/dev/null || true)"
if [[ "${MFSTACK_REBUILD:-0}" != 1 && "$base_key_now" == "$BASE_KEY" ]]; then
    info "present in buildah storage"
else
    mkdir -p "$CACHE/rootfs"
    if [[ "${MFSTACK_REBUILD:-0}" == 1 || ! -s "$ROOTFS_TAR" ]]; then
        make_rootfs_tar
        info "rootfs tarball $(du -h "$ROOTFS_TAR" | cut -f1)"
    else
        info "using cached rootfs $ROOTFS_TAR"
    fi
    ctr="$(bah from --name "mfstack-base-$$" scratch)"
    bah add "$ctr" "$ROOTFS_TAR" / >/dev/null
    bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env LANG=C.UTF-8 --cmd /bin/bash --os linux --arch amd64 \
        --label "org.mfstack.base-key=$BASE_KEY" \
        --label "org.opencontainers.image.title=$BASE_REF" \
        --label "org.opencontainers.image.description=Debian $SUITE minbase made with debootstrap" \
        "$ctr"
    bah commit --quiet --format docker --rm "$ctr" "localhost/$BASE_REF" >/dev/null
    info "committed localhost/$BASE_REF"
fi

# --- images -----------------------------------------------------------------

# Content hash of an image folder (relative paths and file contents) and
# of the recipe version of this script.
source_hash() {
    {
        echo "recipe $RECIPE base $BASE_KEY"
        (cd "$1" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -c1-32
}

remote_hash() {
    skopeo inspect --tls-verify=false --format "{{index .Labels \"$HASH_LABEL\"}}" \
        "docker://$REGISTRY/$1" 2>/dev/null || true
}

CA_BUNDLE="${MFSTACK_CA_BUNDLE:-${PIP_CERT:-}}"
if [[ -z $CA_BUNDLE ]]; then
    for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
        [[ -s $f ]] && { CA_BUNDLE="$f"; break; }
    done
fi

# Use only the local base image, never a registry (older buildah spells it --pull-never).
PULL_NEVER=--pull=never
buildah bud --help 2>/dev/null | grep -q -- '--pull string' || PULL_NEVER=--pull-never

# --- upstream archives ------------------------------------------------------

UPSTREAM_DIR="${MFSTACK_UPSTREAM_DIR:-}"
if [[ -z $UPSTREAM_DIR && -f "$ROOT/../shared/upstream/SHA256SUMS" ]]; then
    UPSTREAM_DIR="$(cd "$ROOT/../shared/upstream" && pwd)"
fi
UPSTREAM_STAGE="$CACHE/upstream"
step "upstream archives (${UPSTREAM_DIR:-download from the release URLs})"
mirror_args=()
[[ -n $UPSTREAM_DIR ]] && mirror_args=(--mirror "$UPSTREAM_DIR")
python3 "$HERE/upstream_sources.py" "$UPSTREAM_STAGE" "${mirror_args[@]}" | while read -r line; do info "$line"; done

# The folder buildah builds from: the image's own folder, plus the verified upstream archives
# for the service image (they are build inputs, never part of the repository).
build_context() {
    local folder="$1" ctx="$CACHE/context/$1"
    rm -rf "$ctx"
    mkdir -p "$ctx"
    cp -r "$ROOT/images/$folder/." "$ctx/"
    if [[ $folder == metaflow-service ]]; then
        mkdir -p "$ctx/upstream"
        cp "$UPSTREAM_STAGE"/*.tar.gz "$UPSTREAM_STAGE"/*.zip "$ctx/upstream/"
    fi
    echo "$ctx"
}

pushed=()
for entry in "${IMAGES[@]}"; do
    IFS='|' read -r name folder ref <<<"$entry"
    dir="$ROOT/images/$folder"
    [[ -f "$dir/Containerfile" ]] || die "missing $dir/Containerfile"
    # The folder's pins name the upstream archives by checksum, so its hash covers them too.
    hash="$(source_hash "$dir")"
    remote_ref="$(registry_path "$ref")"
    step "image $name: $ref (source hash $hash)"
    if [[ "${MFSTACK_REBUILD:-0}" != 1 && "$(remote_hash "$remote_ref")" == "$hash" ]]; then
        info "up to date in $REGISTRY, skipped"
        continue
    fi
    local_hash="$(bah inspect --type image --format "{{index .Docker.Config.Labels \"$HASH_LABEL\"}}" \
        "localhost/$remote_ref" 2>/dev/null || true)"
    if [[ "${MFSTACK_REBUILD:-0}" != 1 && "$local_hash" == "$hash" ]]; then
        info "already built in buildah storage"
    else
        args=(--isolation chroot --layers=false --format docker "$PULL_NEVER"
            --signature-policy "$POLICY"
            --build-arg "BASE_IMAGE=localhost/$BASE_REF"
            --label "$HASH_LABEL=$hash"
            -f "$dir/Containerfile" -t "localhost/$remote_ref")
        # Only builds that use it get the host CA bundle (the mount point stays
        # behind in the image as an empty file).
        if [[ -n $CA_BUNDLE && -s $CA_BUNDLE ]] && grep -q /run/host-ca.crt "$dir/Containerfile"; then
            args+=(--volume "$CA_BUNDLE:/run/host-ca.crt:ro")
        fi
        [[ -n ${MFSTACK_PIP_INDEX_URL:-} ]] && args+=(--build-arg "PIP_INDEX_URL=$MFSTACK_PIP_INDEX_URL")
        log="$CACHE/build-$name.log"
        info "buildah bud (log: $log)"
        ctx="$(build_context "$folder")"
        if ! bah bud "${args[@]}" "$ctx" >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            die "build of $ref failed (log: $log)"
        fi
    fi
    info "pushing to $REGISTRY/$remote_ref"
    bah push --quiet --tls-verify=false --format v2s2 --signature-policy "$POLICY" \
        "localhost/$remote_ref" "docker://$REGISTRY/$remote_ref" >/dev/null \
        || die "push of $ref to $REGISTRY failed"
    [[ "$(remote_hash "$remote_ref")" == "$hash" ]] || die "$REGISTRY/$remote_ref does not carry the expected $HASH_LABEL after push"
    pushed+=("$ref")
done

if ((${#pushed[@]})); then
    step "removing dangling images from buildah storage"
    bah rmi --prune >/dev/null 2>&1 || true
fi

step "done: ${#pushed[@]} image(s) pushed; registry $REGISTRY holds:"
for entry in "${IMAGES[@]}"; do
    IFS='|' read -r _ _ ref <<<"$entry"
    info "$REGISTRY/$(registry_path "$ref")  (pull with: --registry http://$REGISTRY, image $ref)"
done
