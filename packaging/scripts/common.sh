# Shared part of the steward-controlplane and steward-agent maintainer scripts, .deb and .rpm.
# build-packages.sh inlines it after setting STEWARD_PKG (steward-controlplane | steward-agent)
# and STEWARD_FORMAT (deb | rpm), followed by postinst.sh, prerm.sh or postrm.sh, which take
# Debian's arguments (the .rpm scriptlets translate theirs).
#
# Data in /var/lib/steward is never deleted by these scripts, not even on purge.

STEWARD_HOME=/var/lib/steward

steward_unit() {
    echo "$STEWARD_PKG.service"
}

steward_data_dir() {
    case "$STEWARD_PKG" in
        steward-agent) echo "$STEWARD_HOME/agent" ;;
        *) echo "$STEWARD_HOME/controlplane" ;;
    esac
}

steward_config() {
    case "$STEWARD_PKG" in
        steward-agent) echo /etc/steward/agent.toml ;;
        *) echo /etc/steward/controlplane.toml ;;
    esac
}

# systemd is the init system of this boot (not a chroot or a container without it).
steward_systemd_running() {
    [ -d /run/systemd/system ]
}

# The `steward` system user and group (home /var/lib/steward, not created, no login shell):
# the control plane runs as it. Kept on removal and purge, as Debian does with system users.
steward_create_user() {
    if getent passwd steward >/dev/null 2>&1; then
        return 0
    fi
    if [ "$STEWARD_FORMAT" = deb ]; then
        if getent group steward >/dev/null 2>&1; then
            adduser --system --ingroup steward --home "$STEWARD_HOME" --no-create-home --quiet steward
        else
            adduser --system --group --home "$STEWARD_HOME" --no-create-home --quiet steward
        fi
    else
        getent group steward >/dev/null 2>&1 || groupadd --system steward
        useradd --system --gid steward --home-dir "$STEWARD_HOME" --no-create-home \
            --shell /sbin/nologin --comment "Steward" steward
    fi
}

# /var/lib/steward (0755 root, so the postgres user can pass through to the agent's data) and
# this package's directory below it, mode 0750: the control plane's owned by steward:steward;
# the agent's by root:postgres (the agent runs as root, and PostgreSQL, running as postgres,
# must enter it to reach its data directories, which the agent gives to postgres).
steward_make_dirs() {
    dir=$(steward_data_dir)
    [ -d "$STEWARD_HOME" ] || install -d -m 0755 -o root -g root "$STEWARD_HOME"
    [ -d "$dir" ] || mkdir -m 0750 "$dir"
    case "$STEWARD_PKG" in
        steward-agent)
            if getent group postgres >/dev/null 2>&1; then
                chown root:postgres "$dir"
            else
                chown root:root "$dir"
                echo "$STEWARD_PKG: group 'postgres' not found: once PostgreSQL is installed, run" \
                    "'chgrp postgres $dir' so PostgreSQL can reach its data" >&2
            fi
            ;;
        *)
            chown steward:steward "$dir"
            ;;
    esac
    chmod 0750 "$dir"
}

steward_daemon_reload() {
    if steward_systemd_running; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
}

steward_stop() {
    if steward_systemd_running; then
        systemctl stop "$(steward_unit)" >/dev/null 2>&1 || true
    fi
}

# Removes the unit's enablement symlinks (works without a running systemd too).
steward_disable() {
    if command -v systemctl >/dev/null 2>&1; then
        systemctl disable "$(steward_unit)" >/dev/null 2>&1 || true
    fi
}

# Says what removal left behind. $1: remove or purge (a purge follows a remove).
steward_data_note() {
    dir=$(steward_data_dir)
    config=$(steward_config)
    if [ -d "$dir" ]; then
        echo "$STEWARD_PKG: data kept in $dir (delete it yourself once no longer needed)"
    fi
    if [ "$STEWARD_FORMAT" = rpm ]; then
        echo "$STEWARD_PKG: $config removed if unchanged, else kept as $config.rpmsave"
    elif [ "$1" = purge ]; then
        echo "$STEWARD_PKG: configuration $config removed; other files in /etc/steward kept"
    else
        echo "$STEWARD_PKG: configuration kept in $config (removed by a purge)"
    fi
    if [ "$STEWARD_PKG" = steward-agent ] && [ "$1" = remove ]; then
        echo "$STEWARD_PKG: any PostgreSQL instances the agent started keep running; stop one with" \
            "'runuser -u postgres -- pg_ctl stop -D $dir/clusters/<id>/pgdata'" \
            "(pg_ctl is in /usr/lib/postgresql/<version>/bin)"
    fi
}
