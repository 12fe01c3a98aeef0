"""Environments: bring a whole environment up, to its minimum, one worker, or down."""
from __future__ import annotations

from .errors import NotAvailable
from .taskutil import task


@task(help={"env": "environment name from environments.yaml"})
def env_start_all(c, env=None):
    """Start every image of an environment, deploy its service, configure its load balancers."""
    raise NotAvailable("env-start-all (environments)")


@task(help={"env": "environment name", "pick_randomly": "choose workers at random"})
def env_start_min(c, env=None, pick_randomly=False):
    """Start one load balancer and the minimum number of workers."""
    raise NotAvailable("env-start-min (environments)")


@task(help={"image": "worker image", "env": "environment name (default: the image's)"})
def env_start_worker(c, image=None, env=None):
    """(Re)start one worker image, deploy the service to it, add it to the load balancers."""
    raise NotAvailable("env-start-worker (environments)")


@task(help={"env": "environment name"})
def env_stop(c, env=None):
    """Stop every image of an environment; their hosts leave the inventory."""
    raise NotAvailable("env-stop (environments)")
