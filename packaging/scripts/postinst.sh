# postinst: configure [<old version>] | abort-upgrade | abort-remove | abort-deconfigure
case "$1" in
    configure)
        steward_create_user
        steward_make_dirs
        steward_daemon_reload
        if [ -n "$2" ]; then
            # Upgrade: a running service restarts on the new binary (the agent's PostgreSQL
            # instances keep running through it). prerm left it running.
            if steward_systemd_running; then
                systemctl try-restart "$(steward_unit)" >/dev/null 2>&1 || true
            fi
        else
            # Not started on installation: the first start settles things that are hard to
            # change later (the control plane's Raft group and CA; the agent's join), so the
            # configuration comes first.
            echo "$STEWARD_PKG: review $(steward_config), then: systemctl enable --now $(steward_unit)"
        fi
        ;;
    abort-upgrade | abort-remove | abort-deconfigure) ;;
esac
exit 0
