#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine (as root) for running the stack offline and its tests:
# system packages, a virtual environment in .venv with the project and its test tools,
# and the project's images in a local registry on 127.0.0.1.
#
#   MFSTACK_VENV   where the virtual environment goes (default: <repo>/.venv)
#
#   setup_host.sh --check   exit 0, in a few milliseconds, when a finished setup is still current
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${MFSTACK_VENV:-$ROOT/.venv}"
STAMP="$VENV/.mfstack-setup"

say() { echo "[setup] $*"; }

# proot runs the containers; postgresql-15 and chromium are for the tests
# (snapshot tests drive a native server, page tests a real browser, fuse3 mounts the Drive-like test file system).
PACKAGES=(proot buildah docker-registry skopeo debootstrap umoci curl postgresql-15 postgresql-contrib chromium fuse3 libfuse3-3)

# Everything a finished setup was made from: a change to any of it means setting up again.
setup_key() {
    {
        echo "$ROOT|$VENV|${PACKAGES[*]}"
        cat "$ROOT/pyproject.toml" "$HERE/setup_host.sh" "$HERE/build_images.sh" "$HERE/local_registry.sh" \
            "$HERE/upstream_sources.py"
        find "$ROOT/images" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    } | sha256sum | cut -d' ' -f1
}

if [[ "${1:-}" == "--check" ]]; then
    [[ -x "$VENV/bin/python" && -s "$STAMP" && "$(cat "$STAMP")" == "$(setup_key)" ]] || exit 1
    installed="$(dpkg-query -W -f='${Status}\n' "${PACKAGES[@]}" 2>/dev/null | grep -c "install ok installed" || true)"
    [[ "$installed" == "${#PACKAGES[@]}" ]] || exit 1
    exit 0
fi

[[ "$(id -u)" == 0 ]] || { echo "[setup] run as root (apt-get, buildah and the registry need it)" >&2; exit 1; }
rm -f "$STAMP"
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Keep package scripts from starting system services (PostgreSQL, a registry on port 5000).
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f $policy' EXIT; fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the virtual environment $VENV"
    python3 -m venv "$VENV"
fi
say "installing the project and its test tools into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,notebook]"

"$HERE/build_images.sh"

# Colab ships Python 3.12: the first-run test runs the whole first run under it too.
python312="$(command -v python3.12 || ls -1 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n1 || true)"
if [[ -z "$python312" ]] && apt-cache show python3.12-venv >/dev/null 2>&1; then
    say "installing Python 3.12"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.12 python3.12-venv
    python312="$(command -v python3.12 || true)"
fi
if [[ -n "$python312" ]]; then
    say "Python 3.12 for the first-run test: $python312"
else
    say "WARNING: no Python 3.12 here (not in PATH, not under ~/.pyenv, not in apt): the first-run test" \
        "under 3.12 will fail; install it (pyenv install 3.12) or set MFSTACK_PYTHON312"
fi
setup_key >"$STAMP"
say "ready"
