"""monitor: hold an environment's response-time target by starting and stopping workers."""
from __future__ import annotations

from invoke import Exit

from fabfile.flows import monitor as monitord
from fabfile.taskutil import load_config, task


@task(help={"env": "environment name",
            "once": "run one tick (probe, decide, act), print the decision, exit"})
def monitor(c, env=None, once=False):
    """Run the autoscaling monitor for an environment (foreground; Ctrl-C or SIGTERM stops it)."""
    cfg = load_config()
    code = monitord.run(cfg, cfg.env(env), once=once)
    if code:
        raise Exit(code=code)
