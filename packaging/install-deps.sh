#!/usr/bin/env bash
# Installs what building, testing and running Steward needs on Debian 12 (run as root, or with
# sudo available): PostgreSQL server binaries (14-17; Debian 12 ships 15), iproute2 for the
# network-namespace tests, python3 for the lab test's probes, a C compiler for the bundled
# SQLite, rpm (rpmbuild, for `make packages`), and schemathesis (in its own virtualenv) for the
# REST API fuzz test. Idempotent: installs only what is missing.
set -euo pipefail

# The REST fuzz test (tests/tests/rest_fuzz.rs) runs this schemathesis; keep both in step.
SCHEMATHESIS_VERSION=4.32.5
TEST_VENV=/opt/steward-test/venv
# Debian's interpreter (apt installs it): the virtualenv must not depend on a user's pyenv.
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

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
# Debian's python3 creates virtualenvs only with python3-venv (it carries ensurepip).
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
command -v make >/dev/null 2>&1 || missing+=(make)
# `make packages` and the packaging test: dpkg-deb comes with dpkg; rpmbuild comes with rpm.
command -v rpmbuild >/dev/null 2>&1 || missing+=(rpm)
# The Ansible test (tests/tests/ansible.rs) runs Debian's ansible-playbook against this machine.
command -v ansible-playbook >/dev/null 2>&1 || missing+=(ansible)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

install_packages() {
    if [ -n "$SUDO" ] && ! command -v sudo >/dev/null 2>&1; then
        echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
    command -v apt-get >/dev/null 2>&1 || {
        echo "install-deps: apt-get not found; install these yourself: ${missing[*]}" >&2
        exit 1
    }
    echo "install-deps: installing ${missing[*]}"
    # Keep the package's own 'main' cluster from being started: Steward's agents run PostgreSQL.
    local policy=/usr/sbin/policy-rc.d
    local made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod 755 "$policy"
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local status=0
    $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
    [ "$made_policy" = 1 ] && $SUDO rm -f "$policy"
    return "$status"
}

# schemathesis $SCHEMATHESIS_VERSION in $TEST_VENV, from PyPI, unless it is there already.
installed_something=0
install_schemathesis() {
    local have
    have=$("$TEST_VENV/bin/schemathesis" --version 2>/dev/null || true)
    if [ "$have" = "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
        return 0
    fi
    installed_something=1
    # python3 may have come with the packages just installed.
    [ -x /usr/bin/python3 ] && PYTHON=/usr/bin/python3
    echo "install-deps: installing schemathesis $SCHEMATHESIS_VERSION into $TEST_VENV (for the REST fuzz test)"
    $SUDO mkdir -p "$(dirname "$TEST_VENV")"
    [ -x "$TEST_VENV/bin/pip" ] || $SUDO "$PYTHON" -m venv "$TEST_VENV"
    $SUDO "$TEST_VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    have=$("$TEST_VENV/bin/schemathesis" --version 2>/dev/null || true)
    if [ "$have" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
        echo "install-deps: schemathesis did not install into $TEST_VENV (got: '$have')" >&2
        exit 1
    fi
}

if [ ${#missing[@]} -gt 0 ]; then
    installed_something=1
    install_packages
fi
install_schemathesis

if [ "$installed_something" = 0 ]; then
    echo "install-deps: everything needed is installed"
else
    echo "install-deps: done"
fi
