#!/bin/sh
# modelfleet postinstall. deb: "configure [OLD-VERSION]"; rpm: 1 (install) or 2 (upgrade).
# Creates the service users and state directories, and nothing more: no service is enabled or
# started. An agent must be enrolled first, then enabled by an administrator (install.md).
set -e

upgrade=no
case "$1" in
    configure) [ -z "$2" ] || upgrade=yes ;;
    2) upgrade=yes ;;
    1) ;;
    *) exit 0 ;;  # deb abort-* paths: nothing was changed
esac

if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers /usr/lib/sysusers.d/modelfleet.conf
else
    # No systemd (a container image): the same users by hand.
    for spec in "modelfleet:/var/lib/modelfleet/agent:modelfleet agent" \
                "modelfleet-hub:/var/lib/modelfleet/hub:modelfleet hub"; do
        name=${spec%%:*}; rest=${spec#*:}; home=${rest%%:*}; gecos=${rest#*:}
        getent group "$name" >/dev/null || groupadd --system "$name"
        getent passwd "$name" >/dev/null || useradd --system --gid "$name" --no-create-home \
            --home-dir "$home" --shell /usr/sbin/nologin --comment "$gecos" "$name"
    done
fi

if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/modelfleet.conf
else
    install -d -m 0755 -o root -g root /var/lib/modelfleet
    install -d -m 0700 -o modelfleet -g modelfleet /var/lib/modelfleet/agent
    install -d -m 0700 -o modelfleet-hub -g modelfleet-hub /var/lib/modelfleet/hub
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ "$upgrade" = yes ]; then
        # The new code runs only after a restart. try-restart touches only running services,
        # so an agent that was never enabled stays stopped.
        systemctl try-restart modelfleet-agent.service modelfleet-hub.service || true
    fi
fi
exit 0
