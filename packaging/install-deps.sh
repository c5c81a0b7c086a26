#!/usr/bin/env bash
# Installs what building, testing and running Steward needs on Debian 12 (run as root, or with
# sudo available): PostgreSQL server binaries (14-17; Debian 12 ships 15), iproute2 for the
# network-namespace tests, python3 for the lab test's probes, and a C compiler for the bundled
# SQLite. Idempotent: installs only what is missing.
set -euo pipefail

have_pg_server() {
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/postgres" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && return 0
    done
    command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ] && return 0
    return 1
}

missing=()
have_pg_server || missing+=(postgresql-15 postgresql-client-15)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# The network-namespace lab test serves and probes HTTP/UDP from inside namespaces with python3.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || missing+=(make)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-deps: everything needed is installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
command -v apt-get >/dev/null 2>&1 || {
    echo "install-deps: apt-get not found; install these yourself: ${missing[*]}" >&2
    exit 1
}

echo "install-deps: installing ${missing[*]}"
# Keep the package's own 'main' cluster from being started: Steward's agents run PostgreSQL.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=1
fi
trap '[ "$made_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "install-deps: done"
