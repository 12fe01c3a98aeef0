"""Rolling a service out to workers: deploy, rollback, start/stop and test on every worker.

The work runs on the inventory's workers of the environments that run the service, in parallel
(``fan_out``); whether a deploy goes through a load balancer one worker at a time is the
environment flow's decision (``fabfile.flows.environment.deploy_balanced_or_parallel``).
"""
from __future__ import annotations

from dataclasses import dataclass

from fabfile.core import ssh
from fabfile.core.config import Config, Environment
from fabfile.core.errors import BootedError
from fabfile.core.fanout import HostResult, fan_out
from fabfile.hosts.inventory import HostEntry, Inventory
from fabfile.services import manifest as services
from fabfile.services import release


@dataclass(frozen=True)
class Target:
    entry: HostEntry
    env: Environment

    @property
    def label(self) -> str:
        return self.entry.image


def targets(cfg: Config, service: str, env_name: str | None = None, images: list[str] | None = None) -> list[Target]:
    """The workers in the inventory that run ``service`` (in ``env_name`` if given)."""
    envs = [cfg.env(env_name)] if env_name else [e for e in cfg.environments.values() if e.service == service]
    if env_name and envs[0].service != service:
        raise BootedError(f"environment {env_name!r} runs {envs[0].service}, not {service}")
    found = []
    for env in envs:
        for entry in Inventory().hosts(env=env.name, role="workers"):
            if entry.reachable is False or (images is not None and entry.image not in images):
                continue
            found.append(Target(entry, env))
    if not found:
        where = f"environment {env_name!r}" if env_name else f"any environment running {service}"
        raise BootedError(f"no workers of {where} in the inventory: start them (fab env-start-all --env E) "
                          "or refresh it (fab hosts-reset --yes)")
    return found


def deploy(cfg: Config, svc: services.Service, version: str | None, env_name: str | None,
           images: list[str] | None = None, quiet: bool = False) -> list[HostResult]:
    """Pack, test and ship ``version`` (default: each environment's) to the workers, in parallel."""
    hosts = targets(cfg, svc.name, env_name, images)
    releases = {}
    for t in hosts:
        v = version or t.env.version
        if v not in releases:
            releases[v] = release.prepare(svc, v)
    keep = cfg.deploy["keep_releases"]
    timeout = float(cfg.deploy["timeout_s"])

    def one(t: Target) -> str:
        with ssh.connect(t.entry.address, cfg) as conn:
            return release.deploy_to(conn, svc, releases[version or t.env.version], keep, timeout)

    results = fan_out(hosts, one, label=lambda t: t.label, parallel=cfg.deploy["parallel"], quiet=quiet)
    ok = {r.host for r in results if r.ok}
    release.record_many([(t.entry.address, svc.name, rel.version, rel.commit)
                         for t in hosts if t.label in ok for rel in [releases[version or t.env.version]]])
    return results


def rollback(cfg: Config, svc: services.Service, env_name: str | None,
             images: list[str] | None = None) -> list[HostResult]:
    timeout = float(cfg.deploy["timeout_s"])

    def one(t: Target) -> str:
        with ssh.connect(t.entry.address, cfg) as conn:
            return release.rollback_on(conn, svc, timeout)

    return fan_out(targets(cfg, svc.name, env_name, images), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])


def control(cfg: Config, svc: services.Service, env_name: str | None, action: str) -> list[HostResult]:
    timeout = float(cfg.deploy["timeout_s"])

    def one(t: Target) -> str:
        with ssh.connect(t.entry.address, cfg) as conn:
            return release.control(conn, svc, action, timeout)

    return fan_out(targets(cfg, svc.name, env_name), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])


def test(cfg: Config, svc: services.Service, env_name: str | None) -> list[HostResult]:
    deployed = release.deployed_versions(svc.name)  # one read of the record, not one per worker

    def one(t: Target) -> str:
        return release.check_service(t.entry.address, svc, deployed.get(t.entry.address))

    return fan_out(targets(cfg, svc.name, env_name), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])
