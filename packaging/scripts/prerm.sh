# prerm: remove | upgrade <new version> | deconfigure ... | failed-upgrade <old version>
case "$1" in
    remove | deconfigure)
        # For the agent this stops the agent only: PostgreSQL keeps running (KillMode=process).
        steward_stop
        steward_disable
        ;;
    upgrade | failed-upgrade)
        # The new version's postinst restarts the running service.
        ;;
esac
exit 0
