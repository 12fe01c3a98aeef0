"""USER_SETUP, the first-boot shell every provider's hosts run inside their own script: what it
assigns must not change what the script around it uses (sh has no local variables; a loop variable
named ``dir`` once made the local provider's script delete the user's home instead of its own
folder). Its behaviour on real hosts is the local and libvirt tiers'."""
from __future__ import annotations

import re

import pytest

from fabfile.hosts.provision import USER_SETUP
from fabfile.providers.libvirt.image import SEED_SCRIPT, VM_PROVISION
from fabfile.providers.local.provider import HOST_PROVISION


def assigned(script: str) -> set[str]:
    """Shell variables ``script`` sets: ``name=...`` and the names ``read`` fills."""
    names = set(re.findall(r"(?:^|[\s;{(])([A-Za-z_]\w*)=", script))
    for words in re.findall(r"\bread\s+(?:-r\s+)?([\w\s]+?)\s*(?:;|<|$)", script, flags=re.M):
        names.update(w for w in words.split() if w != "_")
    return names


def test_assigned_finds_assignments_and_read_targets():
    assert assigned('x=1; IFS=: read -r a _ b _; f() { y="$1"; }') == {"x", "IFS", "a", "b", "y"}


@pytest.mark.parametrize("script", [HOST_PROVISION, VM_PROVISION], ids=["local", "libvirt"])
def test_user_setup_sets_nothing_the_surrounding_script_uses(script):
    around = script.replace(USER_SETUP, "")
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", around))
    # $user and $pubkey are its inputs, $home its result
    clobbered = (assigned(USER_SETUP) - {"IFS", "home"}) & used
    assert not clobbered, f"USER_SETUP overwrites {sorted(clobbered)} of the script around it"


def test_the_vm_provisioning_sourced_by_the_seed_script_sets_nothing_else_it_uses():
    """booted-seed sources VM_PROVISION (a shell less at every first boot): the provisioning may set
    the user, key and hostname the seed handed it, and nothing else the seed script reads."""
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", SEED_SCRIPT))
    clobbered = (assigned(VM_PROVISION) - {"IFS", "user", "pubkey", "hostname"}) & used
    assert ". /usr/local/lib/booted/provision" in SEED_SCRIPT and not clobbered, sorted(clobbered)
