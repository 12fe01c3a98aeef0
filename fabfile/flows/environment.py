"""Environments end to end: start images, wait for them to call home, deploy, balance, check.

The functions here serve the env-* tasks and the monitor alike: ``start_worker`` and
``stop_image`` are what the monitor's scaling steps call.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fabfile.balancing import loadbalancer
from fabfile.core import ssh
from fabfile.core.config import Config, Environment
from fabfile.core.errors import BootedError, WaitTimeout
from fabfile.core.fanout import HostResult, fan_out, raise_if_failed
from fabfile.core.http import http_request
from fabfile.core.output import host_line, poll, progress, say, wait_until
from fabfile.flows import discovery, plans, rollout
from fabfile.hosts import endpoint as nginxctl
from fabfile.hosts.inventory import Inventory
from fabfile.providers import Provider, get_provider
from fabfile.services import manifest as services
from fabfile.services import release


@dataclass
class EnvReport:
    env: str
    version: str
    hosts: list[tuple[str, str, str]] = field(default_factory=list)  # image, roles, address
    urls: list[str] = field(default_factory=list)


def provider_of(cfg: Config, env: Environment) -> Provider:
    return get_provider(env.provider, cfg)


def ensure_nginx(cfg: Config) -> None:
    """booted's nginx must run for hosts to call home; start it (without rotating) if it doesn't."""
    reach, installers = discovery.endpoint_addresses(cfg), discovery.installer_networks(cfg)
    if not nginxctl.status(cfg).running or nginxctl.running_config_differs(cfg, reach, installers):
        action, _ = nginxctl.restart(cfg, rotate=False, reach=reach, installers=installers)
        progress(f"booted nginx {action} on port {cfg.nginx['port']}")


def build_image(cfg: Config, prov: Provider, image: str, env: Environment | None):
    """``prov.build``, with booted's nginx running for the whole build if the provider's installer needs it
    (its kickstart); nginx-stop and env-stop leave it running until the build ends."""
    if not prov.build_needs_endpoint:
        return prov.build(image, env)
    ensure_nginx(cfg)
    with nginxctl.serving(image):
        return prov.build(image, env)


def stop_nginx(force: bool = False) -> str:
    """Stop booted's nginx unless an image install needs it (``force``: even then); says what happened."""
    busy = nginxctl.users()
    if busy and not force:
        raise BootedError(f"booted's nginx is serving the install of {', '.join(busy)}; not stopped "
                          "(wait for the build, or pass --force)")
    return "booted nginx stopped" if nginxctl.stop() else "booted nginx was not running"


def running_environments(cfg: Config) -> list[str]:
    """Environments with at least one running image (providers that are not installed run nothing)."""
    running = []
    for provider_name in sorted({e.provider for e in cfg.environments.values()}):
        prov = get_provider(provider_name, cfg)
        if not prov.installed():
            continue
        up = {m.name for m in prov.list() if m.running}
        running += [e.name for e in cfg.environments.values() if e.provider == provider_name and up & set(e.images)]
    return sorted(running)


def stop_nginx_if_idle(cfg: Config) -> str:
    """After an environment stopped: stop booted's nginx if no environment runs and no install needs it."""
    try:
        others = running_environments(cfg)
    except BootedError as err:
        return f"booted nginx kept running: could not tell whether other environments run ({err})"
    if others:
        return f"booted nginx kept running for {', '.join(others)}"
    busy = nginxctl.users()
    if busy:
        return f"booted nginx kept running for the install of {', '.join(busy)}"
    return ("booted nginx stopped (no environment runs; --keep-nginx keeps it)" if nginxctl.stop()
            else "booted nginx is not running")


def boot_timeout(cfg: Config, env: Environment) -> float:
    return float(cfg.provider_settings(env.provider)["boot_timeout_s"]) + 30.0


# ---------------------------------------------------------------------------- images up and down
def start_images(cfg: Config, env: Environment, images: list[str],
                 on_up: Callable[[str, float], None] | None = None) -> dict[str, float | None]:
    """Start ``images`` in parallel (building any that don't exist yet).

    Returns ``{image: start time}`` for images this call booted, ``None`` for ones already running.
    ``on_up(image, start time)`` runs as soon as an image this call booted is up, while the others
    still boot. Raises if any image failed to start, after reporting each one.
    """
    prov = provider_of(cfg, env)
    plan = plans.plan_start(images, {m.name: m for m in prov.list()})
    started: dict[str, float | None] = {}

    def one(image: str) -> str:
        if image in plan.running:
            started[image] = None
            return "already running"
        if image in plan.build:
            build_image(cfg, prov, image, env)
        started[image] = started_at = time.time()
        machine = prov.start(image)
        if on_up is not None:
            on_up(image, started_at)
        return f"started ({', '.join(machine.addresses) or 'address pending'})"

    # All at once, as plain systemd-nspawn would: a start mostly waits for the host to boot, and
    # a bound here made 31 hosts boot in four waves.
    results = fan_out(images, one, label=lambda i: i, parallel=len(images))
    raise_if_failed("start", results)
    return started


_log_reader = threading.Lock()  # held by the one thread reading the booted log into the inventory
_log_read_at: dict[Path, tuple[int, int]] = {}  # the log's (inode, size) when that thread last read it


# How often a waiting thread looks for calls home: a host calls within ~0.3 s of answering SSH, and
# a look at a log that has not grown costs a stat and an inventory read (0.3 ms).
CALLHOME_POLL_S = 0.1


def _not_called_home(cfg: Config, env: Environment, started: dict[str, float | None]) -> list[str]:
    """Read what the booted log gained, then the images of ``started`` still to hear from.

    Many threads ask at once while an environment comes up (one per booting worker): one of them
    reads the log at a time, the others look at the inventory it keeps updating."""
    if _log_reader.acquire(blocking=False):
        try:
            path = discovery.log_path()
            try:
                seen = path.stat()
            except FileNotFoundError:
                seen = None
            # a log that has not grown holds no new call (a read and a record cost ~3 ms; polled often)
            if seen is not None and _log_read_at.get(path) != (seen.st_ino, seen.st_size):
                discovery.record(cfg, discovery.read_log(cfg, path))
                _log_read_at[path] = (seen.st_ino, seen.st_size)
        finally:
            _log_reader.release()
    return plans.not_called_home(started, {e.image: e for e in Inventory().hosts(env=env.name)})


def wait_called_home(cfg: Config, env: Environment, started: dict[str, float | None]) -> None:
    """Wait until every started image has called home (and every running one is in the inventory)."""
    inv = Inventory()
    path = discovery.log_path()

    def missing() -> list[str]:
        return plans.not_called_home(started, {e.image: e for e in inv.hosts(env=env.name)})

    try:
        wait_until(lambda: not _not_called_home(cfg, env, started), timeout=boot_timeout(cfg, env),
                   what=f"{env.name} hosts to call home", interval=CALLHOME_POLL_S, report_every=10)
    except WaitTimeout:
        # Hosts that were already running called home before the last rotation or clear: re-read it all.
        if path.exists():
            discovery.record(cfg, discovery.read_log(cfg, path, full=True))
        gone = missing()
        if gone:
            raise WaitTimeout(f"no call home from {', '.join(gone)} within {boot_timeout(cfg, env):g}s; "
                              f"check booted's nginx (fab restart-nginx) and the hosts' console") from None


def probe(cfg: Config, env: Environment, images: list[str]) -> None:
    """SSH reachability of the environment's hosts; fix clone hostnames. Raises if one is down."""
    down = [i for i in refresh_reachability(cfg, env) if i in images]
    if down:
        raise BootedError(f"not answering on SSH: {', '.join(down)}")
    discovery.fix_hostnames(cfg)


def stop_images(cfg: Config, env: Environment, images: list[str]) -> list[HostResult]:
    prov = provider_of(cfg, env)
    plan = plans.plan_stop(images, {m.name: m for m in prov.list()})

    def one(image: str) -> str:
        if plan[image] == "stop":
            prov.stop(image)
        if plan[image] != "not built":
            Inventory().remove(image)
        return "stopped" if plan[image] == "stop" else plan[image]

    return fan_out(images, one, label=lambda i: i, parallel=len(images))


# ---------------------------------------------------------------------------- service and balancing
def service_of(env: Environment) -> services.Service:
    return services.get(env.service)


def converge_service(cfg: Config, env: Environment, images: list[str], version: str | None = None,
                     loadbalancer_live: bool | None = None, booted: Collection[str] = ()) -> list[HostResult]:
    """Deploy the environment's version to the workers among ``images`` that don't serve it yet.

    ``loadbalancer_live``: whether users are served through a load balancer, if the caller already
    asked (None: ask now). ``booted``: images the caller just booted (see ``serving_after_boot``)."""
    svc = service_of(env)
    version = version or env.version
    workers = [e for e in Inventory().hosts(env=env.name, role="workers") if e.image in images]
    recorded = release.deployed_versions(svc.name) if booted else {}
    with ThreadPoolExecutor(max_workers=max(1, min(len(workers), 32))) as pool:
        answers = pool.map(lambda e: serving_after_boot(e.address, svc, version, e.image in booted,
                                                        recorded.get(e.address)), workers)
        serving = dict(zip([e.image for e in workers], answers))
    stale = plans.stale_workers(serving, version)
    for image in serving:
        if image not in stale:
            say(host_line(image, True, f"already serving {version}"))
    if loadbalancer_live is None:
        loadbalancer_live = bool(stale) and has_live_loadbalancer(cfg, env)
    mode = plans.converge_mode(stale, loadbalancer_live)
    if mode == plans.ROLLING:
        # users are being served: replace the stale workers one at a time behind the balancer
        return rolling_deploy(cfg, env, version, images=stale)
    if mode == plans.PARALLEL:
        return rollout.deploy(cfg, svc, version, env.name, images=stale)
    return []


def serving_version(address: str, port: int) -> str | None:
    """What a worker's ``/version`` answers (None: no answer)."""
    try:
        status, body = http_request(address, port, "GET", "/version", timeout=2)
    except OSError:
        return None
    return body.strip() if status == 200 else None


# How long a worker this run booted gets to start, by itself, the version booted last deployed there
# before it is redeployed: its service starts seconds after the call home (python under TCG), and a
# redeploy behind a live load balancer drains it first (about 10 s a worker).
RESTART_GRACE_S = 20.0


def serving_after_boot(address: str, svc: services.Service, version: str, just_booted: bool,
                       recorded: str | None) -> str | None:
    """``serving_version``, waiting up to RESTART_GRACE_S for a restarted worker's own service.
    ``recorded``: the version booted last deployed there (``release.deployed_versions``)."""
    current = serving_version(address, svc.port)
    if not plans.may_come_back(current, recorded, version, just_booted):
        return current
    seen = [current]

    def serves() -> bool:
        seen[0] = serving_version(address, svc.port)
        return seen[0] == version

    poll(serves, timeout=RESTART_GRACE_S, interval=0.25)
    return seen[0]


# How long a drained worker gets to finish the requests it has before it is changed or stopped
# (hello itself also finishes in-flight requests on SIGTERM).
DRAIN_TIMEOUT_S = 10


def drain_wait(conn, svc: services.Service, image: str) -> None:
    """After a worker left the load balancers: wait until nothing is connected to its service."""
    left = release.wait_idle(conn, svc, DRAIN_TIMEOUT_S)
    if left:
        progress(f"{image}: {left} connections still open {DRAIN_TIMEOUT_S}s after draining; going on")


class _WorkerSteps:
    """The real steps of a rolling change (``plans.roll`` drives them)."""

    def __init__(self, cfg: Config, env: Environment, change, workers):
        self.cfg, self.env, self.svc, self.workers = cfg, env, service_of(env), workers
        self.by_image = {w.image: w for w in workers}
        self._change = change

    def drain(self, image: str) -> None:
        loadbalancer.update(self.cfg, self.env, self.svc.port, drain={image}, workers=self.workers)

    def change(self, image: str) -> str:
        entry = self.by_image[image]
        with ssh.connect(entry.address, self.cfg) as conn:
            drain_wait(conn, self.svc, image)
            return self._change(conn, entry)

    def check(self, image: str) -> None:
        address = self.by_image[image].address
        release.check_service(address, self.svc, release.deployed_version(address, self.svc.name))

    def restore(self) -> None:
        loadbalancer.update(self.cfg, self.env, self.svc.port, workers=self.workers)


def rolling(cfg: Config, env: Environment, change, images: list[str] | None = None) -> list[HostResult]:
    """Change a running, balanced environment one worker at a time: drain it (marked down, its
    in-flight requests finished), ``change(conn, entry)`` (returns a one-line detail and records
    the version it now serves), check it answers as that version (readiness), put it back.

    ``images`` limits it to some workers (the others keep serving throughout). A failure leaves
    that worker drained, so users never reach it, and stops the rollout (``plans.roll``)."""
    refresh_reachability(cfg, env)
    workers = loadbalancer.healthy_workers(cfg, env)
    order = [w.image for w in workers if images is None or w.image in images]
    started = time.monotonic()
    results: list[HostResult] = []

    def report(image: str, ok: bool, detail: str) -> None:
        nonlocal started
        result = HostResult(image, ok, detail)
        result.seconds = time.monotonic() - started
        started = time.monotonic()
        say(host_line(image, ok, detail))
        results.append(result)

    plans.roll(order, _WorkerSteps(cfg, env, change, workers), report)
    return results


def rolling_deploy(cfg: Config, env: Environment, version: str | None = None,
                   images: list[str] | None = None) -> list[HostResult]:
    """Deploy ``version`` (default: the environment's) worker by worker behind the load balancers."""
    svc = service_of(env)
    rel = release.prepare(svc, version or env.version)

    def change(conn, entry) -> str:
        detail = release.deploy_to(conn, svc, rel, cfg.deploy["keep_releases"], float(cfg.deploy["timeout_s"]))
        release.record(entry.address, svc.name, rel.version, rel.commit)
        return detail

    return rolling(cfg, env, change, images)


def rolling_rollback(cfg: Config, env: Environment) -> list[HostResult]:
    """Switch every worker back to its previous release, one at a time behind the load balancers."""
    svc = service_of(env)
    return rolling(cfg, env, lambda conn, entry: release.rollback_on(conn, svc, float(cfg.deploy["timeout_s"])))


def _balanced_or_parallel(cfg: Config, svc: services.Service, env_name: str | None, what: str,
                          balanced, parallel) -> list[HostResult]:
    """Environments whose load balancer is up get ``balanced(env)`` (one worker at a time, users
    see no failed request); the others ``parallel(env_name, images)`` (all workers at once)."""
    results: list[HostResult] = []
    by_env: dict[str, list[rollout.Target]] = {}
    for t in rollout.targets(cfg, svc.name, env_name):
        by_env.setdefault(t.env.name, []).append(t)
    for name, group in by_env.items():
        env = cfg.env(name)
        if has_live_loadbalancer(cfg, env):
            say(f"== {name}: {what} behind its load balancer, one worker at a time")
            results += balanced(env)
        else:
            results += parallel(name, [t.entry.image for t in group])
    return results


def deploy_balanced_or_parallel(cfg: Config, svc: services.Service, version: str | None,
                                env_name: str | None) -> list[HostResult]:
    """hello-deploy: rolling behind a live load balancer, else on all workers at once."""
    return _balanced_or_parallel(cfg, svc, env_name, "rolling deploy",
                                 lambda env: rolling_deploy(cfg, env, version),
                                 lambda name, images: rollout.deploy(cfg, svc, version, name, images=images))


def rollback_balanced_or_parallel(cfg: Config, svc: services.Service, env_name: str | None) -> list[HostResult]:
    """hello-rollback: rolling behind a live load balancer, else on all workers at once."""
    return _balanced_or_parallel(cfg, svc, env_name, "rolling rollback",
                                 lambda env: rolling_rollback(cfg, env),
                                 lambda name, images: rollout.rollback(cfg, svc, name, images=images))


def refresh_reachability(cfg: Config, env: Environment) -> list[str]:
    """Re-probe the environment's hosts on SSH; returns the images that stopped answering."""
    results = discovery.probe_inventory(env.name, timeout=1.5)
    return [e.image for e in Inventory().hosts(env=env.name) if not results.get(e.address)]


def has_live_loadbalancer(cfg: Config, env: Environment) -> bool:
    for lb in loadbalancer.loadbalancers(cfg, env):
        try:
            status, _ = http_request(lb.address, env.lb_port, "GET", "/booted-lb/healthz", timeout=1)
            if status == 200:
                return True
        except OSError:
            continue
    return False


def balance(cfg: Config, env: Environment) -> list[str]:
    """Point every load balancer at the environment's healthy workers; check a request through each."""
    svc = service_of(env)
    urls = loadbalancer.update(cfg, env, svc.port)
    for lb in loadbalancer.loadbalancers(cfg, env):
        body = loadbalancer.check_through(env, lb)
        say(host_line(lb.image, True, f"load balancer answers: {body}"))
    return urls


# ---------------------------------------------------------------------------- whole flows
def deploy_once_called_home(cfg: Config, env: Environment, svc: services.Service, image: str,
                            started_at: float, prepared: Future | None = None) -> list[HostResult] | None:
    """Deploy a worker this run just booted as soon as it called home, while other hosts still boot.

    ``prepared``: the release being packed and tested meanwhile (``release.prepare``). None leaves it
    to the deploy after every host is up: the release failed its tests (reported there), the worker
    did not call home in time, it is a clone still to be renamed (its SSH host keys are about to
    change), or a load balancer now serves users (then workers change one at a time behind it)."""
    if prepared is not None and prepared.exception() is not None:
        return None
    if not poll(lambda: not _not_called_home(cfg, env, {image: started_at}), timeout=boot_timeout(cfg, env),
                interval=CALLHOME_POLL_S):
        return None
    entry = next((e for e in Inventory().hosts(env=env.name) if e.image == image), None)
    if entry is None or not entry.hostname_ok:
        return None
    recorded = release.deployed_version(entry.address, svc.name)
    if serving_after_boot(entry.address, svc, env.version, True, recorded) == env.version:
        return [HostResult(image, True, f"already serving {env.version}")]
    if has_live_loadbalancer(cfg, env):
        return None
    return rollout.deploy(cfg, svc, env.version, env.name, images=[image], quiet=True)


def bring_up(cfg: Config, env: Environment, images: list[str]) -> EnvReport:
    """Start ``images`` of ``env`` and make the environment serve: the body of env-start-*."""
    ensure_nginx(cfg)
    svc = service_of(env)
    say(f"== starting {len(images)} images of {env.name} ({env.provider})")
    with ThreadPoolExecutor(max_workers=len(images) + 2) as pool:
        # A worker deploys the moment it is up and called home, not once the slowest host is.
        early: dict[str, Future] = {}
        # The release is packed and tested while the first booted worker boots (seconds of a test
        # gate that used to start only once it called home); nothing is packed when none boots.
        prepared: list[Future] = []
        first = threading.Lock()

        def deploy_early(image: str, started_at: float) -> None:
            if image in env.workers:
                with first:
                    if not prepared:
                        prepared.append(pool.submit(release.prepare, svc, env.version))
                early[image] = pool.submit(deploy_once_called_home, cfg, env, svc, image, started_at, prepared[0])

        started = start_images(cfg, env, images, on_up=deploy_early)
        say("== waiting for hosts to call home")
        wait_called_home(cfg, env, started)
        probe(cfg, env, images)
        if prepared:
            prepared[0].result()  # a release that failed its tests stops here, before any upload
        live = has_live_loadbalancer(cfg, env)
        say(f"== deploying {svc.name} {env.version}")
        # Nobody is served through a load balancer that is not up yet: its config goes out while the
        # workers deploy (it used to wait for them); the request through it is checked below.
        lb_config = None if live else pool.submit(loadbalancer.update, cfg, env, svc.port)
        results: list[HostResult] = []
        for future in early.values():
            for result in future.result() or []:
                say(host_line(result.host, result.ok, result.detail))
                results.append(result)
        done = {r.host for r in results}
        results += converge_service(cfg, env, [i for i in images if i not in done], loadbalancer_live=live,
                                    booted={i for i, at in started.items() if at is not None})
        raise_if_failed(f"{svc.name}-deploy", results)
        say(f"== testing {svc.name}")
        raise_if_failed(f"{svc.name}-test", rollout.test(cfg, svc, env.name))
        if lb_config is not None:
            lb_config.result()  # its failure, if any, is reported here
    say("== configuring load balancers")
    urls = balance(cfg, env)  # a load balancer already serving this config is only checked
    report = EnvReport(env.name, env.version, urls=urls)
    for e in Inventory().hosts(env=env.name):
        report.hosts.append((e.image, ",".join(e.roles), e.address))
    return report


def start_worker(cfg: Config, env: Environment, image: str) -> str:
    """(Re)start one worker, deploy the environment's version to it, add it to the load balancers."""
    if image not in env.workers:
        raise BootedError(f"{image} is not a worker of environment {env.name} (workers: {', '.join(env.workers)})")
    ensure_nginx(cfg)
    prov = provider_of(cfg, env)
    machine = prov.get(image)
    if machine is not None and machine.running:
        prov.stop(image)
        Inventory().remove(image)
    started = start_images(cfg, env, [image])
    wait_called_home(cfg, env, started)
    probe(cfg, env, [image])
    raise_if_failed("deploy", converge_service(cfg, env, [image], booted=[image]))
    if loadbalancer.loadbalancers(cfg, env):
        loadbalancer.update(cfg, env, service_of(env).port)
    return f"{image} serving {env.version}"


def stop_image(cfg: Config, env: Environment, image: str) -> None:
    """Take one image out of the load balancers, let its last requests finish, then stop it and
    forget it (the monitor's scale-down and env-stop-worker)."""
    svc = service_of(env)
    if image in env.workers and loadbalancer.loadbalancers(cfg, env):
        entries = loadbalancer.healthy_workers(cfg, env)
        loadbalancer.update(cfg, env, svc.port, workers=[w for w in entries if w.image != image])
        for entry in (w for w in entries if w.image == image):
            try:
                with ssh.connect(entry.address, cfg, timeout=3) as conn:   # a dead worker is often why
                    drain_wait(conn, svc, image)
            except BootedError as err:  # unreachable: nothing to drain, stop it all the same
                progress(f"{image}: not drained ({err})")
    prov = provider_of(cfg, env)
    machine = prov.get(image)
    if machine is not None and machine.running:
        prov.stop(image)
    Inventory().remove(image)


def forget_lost(cfg: Config, env: Environment, images: list[str]) -> dict:
    """Images lost with their machine leave the inventory, then the load balancers (that still answer)
    are pointed at the workers left. Returns the environment's inventory entries after."""
    inv = Inventory()
    for image in images:
        inv.remove(image)
        progress(f"{image}: lost with the machine running it; out of the inventory")
    if loadbalancer.loadbalancers(cfg, env):
        try:
            loadbalancer.update(cfg, env, service_of(env).port)
        except BootedError as err:  # their passive checks skip the lost workers meanwhile
            progress(f"load balancers of {env.name} not updated after the loss: {err}")
    return {e.image: e for e in inv.hosts(env=env.name)}


def pick_min(env: Environment, randomly: bool, rng: random.Random | None = None) -> list[str]:
    """One load balancer and ``min_workers`` workers, in order or at random (an image may be both)."""
    rng = rng or random.Random()
    lbs = list(env.loadbalancers)
    workers = list(env.workers)
    lb = rng.choice(lbs) if randomly else lbs[0]
    chosen_workers = rng.sample(workers, env.min_workers) if randomly else workers[: env.min_workers]
    images = [lb] + [w for w in chosen_workers if w != lb]
    return [i for i in env.images if i in images]
