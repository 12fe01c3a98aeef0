"""The settings `providers.local` takes in environments.yaml: {key: (types, default[, check])}."""
from __future__ import annotations

from fabfile.core.config import positive, valid_ifname, valid_limit, valid_network

SETTINGS = {
    "bridge": ((str,), "booted0", valid_ifname),
    "subnet": ((str,), "10.77.0.0/24", valid_network),
    "suite": ((str,), "bookworm"),
    "boot_timeout_s": ((int, float), 60, positive),
    "stop_timeout_s": ((int, float), 30, positive),
    # per host, in its own cgroup: a runaway host cannot take the machine's memory or PIDs
    "memory_max": ((int, str), "1G", valid_limit(64 * 1024**2, "'1G' or '512M'")),
    "pids_max": ((int, str), 2048, valid_limit(64, "2048")),
}
