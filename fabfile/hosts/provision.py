"""What every booted host gets at first boot, whatever made it: booted's login user with booted's
public key (also root's, for the provider's own checks) and password-less sudo.

Shell text for the hosts' own first-boot scripts; each provider reads ``$user`` and ``$pubkey``
its own way (the local provider from files in the host's overlay, the libvirt provider from the
VM's seed disk) and then runs ``USER_SETUP``. Fixed text: no data is interpolated here.
"""
from __future__ import annotations

USER_SETUP = r"""if ! id -u "$user" >/dev/null 2>&1; then useradd -m -s /bin/bash -U "$user"; fi
home=$(getent passwd "$user" | cut -d: -f6)
install -d -m 700 -o "$user" -g "$user" "$home/.ssh"
printf '%s\n' "$pubkey" > "$home/.ssh/authorized_keys"
chown "$user:$user" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$user" > /etc/sudoers.d/booted
chmod 440 /etc/sudoers.d/booted
install -d -m 700 /root/.ssh
printf '%s\n' "$pubkey" > /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
"""
