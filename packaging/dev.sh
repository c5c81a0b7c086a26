#!/usr/bin/env bash
# `make dev`: runs the development stack (one control-plane node, three agents, PostgreSQL
# under each) until Ctrl-C. PostgreSQL runs as the `postgres` user when started as root, so the
# data directory must be reachable by that user; if the checkout is not (e.g. under /root), the
# data goes to /var/lib/steward-dev instead and this script says so.
set -euo pipefail
bin="$1"
data_dir="${2:-./.steward}"
mkdir -p "$data_dir"
if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1; then
    if ! runuser -u postgres -- test -x "$(cd "$data_dir" && pwd)"; then
        fallback=/var/lib/steward-dev
        echo "dev: user 'postgres' cannot reach $data_dir; using $fallback instead" >&2
        data_dir="$fallback"
        mkdir -p "$data_dir"
    fi
fi
exec "$bin" dev --data-dir "$data_dir"
