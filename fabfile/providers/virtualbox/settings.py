"""The settings `providers.virtualbox` takes in environments.yaml: {key: (types, default[, check])}."""
from __future__ import annotations

from fabfile.core.config import positive, valid_ifname, valid_ipv4, valid_sha256

SETTINGS = {
    "cpus": ((int,), 1, positive),
    "memory_mb": ((int,), 2048, lambda v: None if v >= 512 else "must be at least 512"),
    "disk_mb": ((int,), 20480, lambda v: None if v >= 4096 else "must be at least 4096"),
    "os_type": ((str,), "RedHat9_64"),
    "hostonly_adapter": ((str,), "vboxnet0", valid_ifname),
    "host_address": ((str,), "192.168.56.1", valid_ipv4),
    "nic_type": ((str,), "82540EM"),
    "iso": ((str,), "iso/install.iso"),
    "iso_sha256": ((str,), "", valid_sha256),
    "build_timeout_s": ((int, float), 3600, positive),
    "stop_timeout_s": ((int, float), 90, positive),
    "boot_timeout_s": ((int, float), 300, positive),
}
