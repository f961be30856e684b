#!/bin/sh
# modelfleet preremove. deb: "remove" | "upgrade NEW" | ...; rpm: 0 (erase) or 1 (upgrade).
# On removal (not on upgrade), stop and disable the services before their files go.
set -e

case "$1" in
    remove|0)
        if [ -d /run/systemd/system ]; then
            systemctl --no-reload disable --now modelfleet-agent.service modelfleet-hub.service \
                >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
