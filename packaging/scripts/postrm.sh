# postrm: remove | purge | upgrade <new version> | failed-upgrade | abort-install | ...
# Never deletes /var/lib/steward, nor anything in /etc/steward but this package's conffile
# (which dpkg removes on purge). The steward user stays too.
case "$1" in
    remove | purge)
        steward_daemon_reload
        steward_data_note "$1"
        ;;
esac
exit 0
