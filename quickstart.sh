#!/usr/bin/env bash
# booted quick start: `./quickstart.sh up` brings up the `local` environment; `./quickstart.sh test`
# runs the whole test suite. Both install what they need first (Debian 12, as root):
# apt packages from the mirror apt already uses, Python packages pinned in pyproject.toml into .venv.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(systemd-container debootstrap nginx-light iproute2 openssh-client git curl wrk
              python3 python3-venv python3-pip pxelinux syslinux-common ca-certificates
              libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system
              qemu-system-x86 qemu-utils libvirt-dev pkg-config gcc python3-dev e2fsprogs busybox-static)

die() { echo "quickstart: $*" >&2; exit 1; }

setup() {
    [ "$(id -u)" = 0 ] || die "run as root (local hosts are systemd-nspawn containers and need it)"
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "quickstart: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "booted needs Python 3.11 or newer as python3; found $(python3 --version 2>&1)"
    local stamp=.venv/.booted-installed want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "quickstart: installing booted's Python packages into .venv (pinned)"
        python3 -m venv .venv
        .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
        echo "$want" > "$stamp"
    fi
    export PATH="$PWD/.venv/bin:$PATH"
}

case "${1:-}" in
    up)
        setup
        fab env-start-min --env local
        ;;
    test)
        setup
        shift
        python -m pytest -q "$@"
        ;;
    *)
        echo "usage: $0 up|test" >&2
        exit 2
        ;;
esac
