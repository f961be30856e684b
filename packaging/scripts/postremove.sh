#!/bin/sh
# modelfleet postremove. deb: "remove" | "purge" | "upgrade NEW" | ...; rpm: 0 (erase) or 1.
# Kept on purpose, even on purge: /var/lib/modelfleet (agent identity, bundle cache, the hub's
# registry, CA and TUF keys) and the modelfleet users. install.md says how to remove them.
set -e

case "$1" in
    remove|purge|0)
        # Byte code a CLI run as root may have written beside the package's files.
        rm -rf /opt/modelfleet
        if [ -d /run/systemd/system ]; then
            systemctl daemon-reload || true
        fi
        ;;
esac
exit 0
