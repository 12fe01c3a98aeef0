"""Environments: bring a whole environment up, to its minimum, one worker, or down."""
from __future__ import annotations

from fabfile.core.errors import UsageError
from fabfile.core.fanout import raise_if_failed, summary
from fabfile.core.names import check
from fabfile.core.output import say, table
from fabfile.flows import environment
from fabfile.taskutil import load_config, task


def _report(report: environment.EnvReport) -> None:
    say("")
    say(table(["image", "roles", "address"], report.hosts))
    say(f"environment {report.env} is up at version {report.version}")
    for url in report.urls:
        say(f"load balancer: {url}    try: curl {url}   or   curl -d name=Ada {url}")


@task(help={"env": "environment name from environments.yaml"})
def env_start_all(c, env=None):
    """Start all images of an environment, deploy, balance, check."""
    cfg = load_config()
    e = cfg.env(env)
    _report(environment.bring_up(cfg, e, list(e.images)))


@task(help={"env": "environment name", "pick_randomly": "choose the load balancer and workers at random"})
def env_start_min(c, env=None, pick_randomly=False):
    """Start one load balancer and the minimum number of workers."""
    cfg = load_config()
    e = cfg.env(env)
    _report(environment.bring_up(cfg, e, environment.pick_min(e, pick_randomly)))


@task(positional=["image"], help={"image": "worker image", "env": "environment name (default: the image's)"})
def env_start_worker(c, image=None, env=None):
    """(Re)start one worker, deploy to it, add it to the load balancers."""
    cfg = load_config()
    say(environment.start_worker(cfg, _worker_env(cfg, image, env), image))


@task(positional=["image"], help={"image": "worker image", "env": "environment name (default: the image's)"})
def env_stop_worker(c, image=None, env=None):
    """Take one worker out of the load balancers, let its last requests finish, stop it."""
    cfg = load_config()
    e = _worker_env(cfg, image, env)
    if image not in e.workers:
        raise UsageError(f"{image} is not a worker of environment {e.name} (workers: {', '.join(e.workers)})")
    environment.stop_image(cfg, e, image)
    say(f"{image} drained and stopped")


def _worker_env(cfg, image, env):
    if not image:
        raise UsageError("--image NAME is required")
    check("image", image, "--image")
    e = cfg.env(env) if env else cfg.image_env(image)
    if e is None:
        raise UsageError(f"image {image!r} is in no environment; pass --env")
    return e


@task(help={"env": "environment name",
            "keep_nginx": "keep booted's nginx running even if no environment runs any more"})
def env_stop(c, env=None, keep_nginx=False):
    """Stop every image of an environment; its hosts leave the inventory; the last one out stops nginx."""
    cfg = load_config()
    e = cfg.env(env)
    results = environment.stop_images(cfg, e, list(e.images))
    say(summary(f"env-stop {e.name}", results))
    raise_if_failed(f"env-stop {e.name}", results)
    if not keep_nginx:
        say(environment.stop_nginx_if_idle(cfg))
