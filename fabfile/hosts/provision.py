"""What every booted host gets at first boot, whatever made it: booted's login user with booted's
public key (also root's, for the provider's own checks) and password-less sudo.

Shell text for the hosts' own first-boot scripts; each provider reads ``$user`` and ``$pubkey``
its own way (the local provider from files in the host's overlay, the libvirt provider from the
VM's seed disk) and then runs ``USER_SETUP``. Fixed text: no data is interpolated here.
"""
from __future__ import annotations

# Shell builtins where they do: under TCG every process a VM starts at first boot costs a tenth of a
# second or more (three booting VMs share two cores). New files and folders are private (umask);
# ones already there are made so.
# (sh has no local variables: the function's own names must not be the including script's.)
USER_SETUP = r"""home_of() {
    home=""
    while IFS=: read -r passwd_name _ _ _ _ passwd_home _; do
        if [ "$passwd_name" = "$1" ]; then home=$passwd_home; return 0; fi
    done < /etc/passwd
    return 1
}
home_of "$user" || { useradd -m -s /bin/bash -U "$user"; home_of "$user"; }
umask 077
mkdir -p "$home/.ssh" /root/.ssh
printf '%s\n' "$pubkey" > "$home/.ssh/authorized_keys"
printf '%s\n' "$pubkey" > /root/.ssh/authorized_keys
chown -R "$user:$user" "$home/.ssh"
chmod -R go= "$home/.ssh" /root/.ssh
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$user" > /etc/sudoers.d/booted
chmod 440 /etc/sudoers.d/booted
umask 022
"""
