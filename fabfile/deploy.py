"""Services: the {service}-{op} tasks (deploy, rollback, start, stop, test) for each service/<name>/.

A service is a folder under service/ with a service.yaml manifest; every declared service gets the
same five tasks (``hello-deploy``, ``hello-start``, ...). The work runs on the inventory's workers
of the environments that run that service.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import release, services, ssh
from .config import Config, Environment
from .errors import BootedError
from .fanout import HostResult, fan_out, raise_if_failed, summary
from .inventory import HostEntry, Inventory
from .output import say
from .taskutil import load_config, task


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


def deploy_balanced_or_parallel(cfg: Config, svc: services.Service, version: str | None,
                                env_name: str | None) -> list[HostResult]:
    """hello-deploy: environments whose load balancer is up get a rolling deploy (users see no
    failed request); workers without a live load balancer are deployed all at once."""
    from . import environment

    results: list[HostResult] = []
    by_env: dict[str, list[Target]] = {}
    for t in targets(cfg, svc.name, env_name):
        by_env.setdefault(t.env.name, []).append(t)
    for name, group in by_env.items():
        env = cfg.env(name)
        if environment.has_live_loadbalancer(cfg, env):
            say(f"== {name}: rolling deploy behind its load balancer, one worker at a time")
            results += environment.rolling_deploy(cfg, env, version)
        else:
            results += deploy(cfg, svc, version, name, images=[t.entry.image for t in group])
    return results


def rollback(cfg: Config, svc: services.Service, env_name: str | None) -> list[HostResult]:
    timeout = float(cfg.deploy["timeout_s"])

    def one(t: Target) -> str:
        with ssh.connect(t.entry.address, cfg) as conn:
            return release.rollback_on(conn, svc, timeout)

    return fan_out(targets(cfg, svc.name, env_name), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])


def control(cfg: Config, svc: services.Service, env_name: str | None, action: str) -> list[HostResult]:
    timeout = float(cfg.deploy["timeout_s"])

    def one(t: Target) -> str:
        with ssh.connect(t.entry.address, cfg) as conn:
            return release.control(conn, svc, action, timeout)

    return fan_out(targets(cfg, svc.name, env_name), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])


def test(cfg: Config, svc: services.Service, env_name: str | None) -> list[HostResult]:
    def one(t: Target) -> str:
        return release.check_service(t.entry.address, svc, release.deployed_version(t.entry.address, svc.name))

    return fan_out(targets(cfg, svc.name, env_name), one, label=lambda t: t.label, parallel=cfg.deploy["parallel"])


# ---------------------------------------------------------------------------- the tasks
_OPS = {
    "deploy": "Deploy a version of {service} to the workers (tested first).",
    "rollback": "Switch {service} back to the previous release on the workers.",
    "start": "(Re)start {service} on every worker.",
    "stop": "Stop {service} on every worker.",
    "test": "Check {service} on every worker over HTTP.",
}


def _finish(what: str, results: list[HostResult]) -> None:
    say(summary(what, results))
    raise_if_failed(what, results)


def _make(service: str, op: str):
    def body(c, version=None, env=None):
        cfg = load_config()
        svc = services.get(service)
        if op == "deploy":
            _finish(f"{service}-deploy", deploy_balanced_or_parallel(cfg, svc, version, env))
        elif op == "rollback":
            _finish(f"{service}-rollback", rollback(cfg, svc, env))
        elif op == "test":
            _finish(f"{service}-test", test(cfg, svc, env))
        else:
            _finish(f"{service}-{op}", control(cfg, svc, env, op))

    body.__doc__ = _OPS[op].format(service=service)
    body.__name__ = f"{service}_{op}"
    helps = {"env": "only this environment's workers"}
    if op == "deploy":
        helps["version"] = "git tag or commit in the service's repo (default: the environment's version)"
        return task(name=f"{service}-{op}", help=helps)(body)

    def without_version(c, env=None):
        return body(c, None, env)

    without_version.__doc__ = body.__doc__
    without_version.__name__ = body.__name__
    return task(name=f"{service}-{op}", help=helps)(without_version)


def tasks():
    return [_make(name, op) for name in services.names() for op in _OPS]
