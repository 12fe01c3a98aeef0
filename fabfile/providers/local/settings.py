"""The settings `providers.local` takes in environments.yaml: {key: (types, default[, check])}."""
from __future__ import annotations

from typing import Any

from fabfile.core.config import positive, valid_ifname, valid_limit, valid_network


def valid_suite(value: Any) -> str | None:
    """A Debian suite name; it becomes a path under the image cache, so nothing like '../..'."""
    ok = 1 <= len(value) <= 32 and value.isascii() and value[0].isalpha() \
        and all(c.isalnum() or c == "-" for c in value)
    return None if ok else "must be a Debian suite name like bookworm (letters, digits, '-')"


SETTINGS = {
    "bridge": ((str,), "booted0", valid_ifname),
    "subnet": ((str,), "10.77.0.0/24", valid_network),
    "suite": ((str,), "bookworm", valid_suite),
    "boot_timeout_s": ((int, float), 60, positive),
    "stop_timeout_s": ((int, float), 30, positive),
    # per host, in its own cgroup: a runaway host cannot take the machine's memory or PIDs
    "memory_max": ((int, str), "1G", valid_limit(64 * 1024**2, "'1G' or '512M'")),
    "pids_max": ((int, str), 2048, valid_limit(64, "2048")),
}
