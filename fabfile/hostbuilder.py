"""Images: build, clone, list, start, stop and delete machines through their provider."""
from __future__ import annotations

from fabfile.core.errors import BootedError, ProviderError
from fabfile.core.output import progress, say, table
from fabfile.flows import environment
from fabfile.providers import NAMES as PROVIDER_NAMES
from fabfile.providers import UNREACHABLE
from fabfile.taskutil import confirm, load_config, provider_for, resolve_image, task

PROVIDER_HELP = " or ".join(PROVIDER_NAMES)


@task(positional=["image"], help={"image": "image name", "provider": PROVIDER_HELP + " (default: the image's environment's)"})
def image_build(c, image=None, provider=None):
    """Build an image unattended (VirtualBox: kickstart install; local: Debian container)."""
    cfg = load_config()
    image, env, prov = resolve_image(cfg, image, provider, new=True)
    machine = environment.build_image(cfg, provider_for(cfg, prov), image, env)
    say(f"built {machine.name} ({prov}): {machine.state}")


@task(positional=["image"], help={"image": "the source image", "name": "the new image's name", "provider": PROVIDER_HELP})
def image_clone(c, image=None, name=None, provider=None):
    """Clone an image (linked clone, fresh MAC addresses and identity)."""
    cfg = load_config()
    image, env, prov = resolve_image(cfg, image, provider)
    new, new_env, _ = resolve_image(cfg, name, prov, flag="--name")
    machine = provider_for(cfg, prov).clone(image, new, new_env or env)
    say(f"cloned {image} -> {machine.name} ({prov}); MACs: {', '.join(machine.macs) or '-'}")


@task(help={"provider": "list only this provider's images"})
def image_list(c, provider=None):
    """List images: provider, environment, state, MACs, addresses and the hypervisor running each (libvirt)."""
    cfg = load_config()
    wanted = [provider] if provider else sorted({e.provider for e in cfg.environments.values()})
    rows, failures, unreachable, skipped = [], [], [], []
    for name in wanted:
        try:
            prov = provider_for(cfg, name)
            if provider is None and not prov.installed():  # e.g. VirtualBox on a machine without it
                skipped.append(name)
                continue
            machines = prov.list()
        except BootedError as err:
            failures.append(f"{name}: {err}")
            continue
        for m in sorted(machines, key=lambda m: m.name):
            if m.state == UNREACHABLE and m.detail.get("unreachable") not in unreachable:
                unreachable.append(m.detail.get("unreachable") or f"{m.name}: its machine does not answer")
            env = cfg.image_env(m.name)
            rows.append([m.name, m.provider, env.name if env else "-", m.state, ",".join(m.macs) or "-",
                         ",".join(m.addresses) or "-", m.detail.get("hypervisor") or "-"])
    say(table(["image", "provider", "env", "state", "macs", "addresses", "hypervisor"], rows, empty="no images"))
    for name in skipped:
        progress(f"{name}: not installed or not running here, so not listed (`fab image-list --provider {name}` says why)")
    if failures:
        raise ProviderError("; ".join(failures))
    if unreachable:  # listed from booted's records; the machine holding them did not answer
        raise BootedError("; ".join(unreachable), code=2)


@task(positional=["image"], help={"image": "image name", "provider": PROVIDER_HELP})
def image_start(c, image=None, provider=None):
    """Start an image headless; returns once it is running."""
    cfg = load_config()
    image, env, prov = resolve_image(cfg, image, provider)
    machine = provider_for(cfg, prov).start(image)
    say(f"{machine.name}: {machine.state}" + (f" ({', '.join(machine.addresses)})" if machine.addresses else ""))


@task(positional=["image"], help={"image": "image name", "force": "power off at once", "provider": PROVIDER_HELP})
def image_stop(c, image=None, force=False, provider=None):
    """Stop an image: clean shutdown with a timeout, then power off (--force: at once)."""
    cfg = load_config()
    image, env, prov = resolve_image(cfg, image, provider)
    machine = provider_for(cfg, prov).stop(image, force=force)
    say(f"{machine.name}: {machine.state}")


@task(positional=["image"], help={"image": "image name", "yes": "do not ask", "provider": PROVIDER_HELP})
def image_del(c, image=None, yes=False, provider=None):
    """Delete an image and its disks (refuses a running image)."""
    cfg = load_config()
    image, env, prov = resolve_image(cfg, image, provider)
    prv = provider_for(cfg, prov)
    machine = prv.require(image)
    if machine.running:
        raise ProviderError("is running; stop it first (fab image-stop --image NAME)", image=image)
    confirm(f"delete image {image} and its disks?", yes)
    prv.delete(image)
    say(f"deleted {image}")
