"""monitor: hold an environment's response-time target by starting and stopping workers."""
from __future__ import annotations

from .errors import NotAvailable
from .taskutil import task


@task(help={"env": "environment name", "once": "evaluate once, print the decision, exit"})
def monitor(c, env=None, once=False):
    """Run the autoscaling monitor for an environment (foreground; Ctrl-C stops it)."""
    raise NotAvailable("monitor (autoscaling)")
