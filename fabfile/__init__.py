"""booted: one machine as a small private cloud for a web service."""
import atexit
import gc
import sys

from fabfile.hosts import reach

# `fab hosts-filter` waits one probe timeout for the hosts that do not answer: begin its probe now,
# so that importing the rest (a fifth of that timeout) happens during the wait, not before it.
reach.begin_for(sys.argv)

from invoke import Collection  # noqa: E402  (after the probe began)

# Interpreter shutdown tears down every module and collects cycles; freezing first skips most of it.
atexit.register(gc.freeze)

from fabfile import deploy, envmanager, hostbuilder, hostmanager, monitor, taskutil  # noqa: E402  (after gc.freeze's registration)

# `fab` (or `inv`) is the program loading this collection: give it booted's usage rules (TASK --help, exit 2).
for _main in ("fabric.main", "invoke.main"):
    if getattr(sys.modules.get(_main), "program", None) is not None:
        taskutil.install_usage_errors(sys.modules[_main].program)

ns = Collection()
for _task in (
    envmanager.env_start_all, envmanager.env_start_min, envmanager.env_start_worker, envmanager.env_stop_worker,
    envmanager.env_stop,
    hostbuilder.image_build, hostbuilder.image_clone, hostbuilder.image_del, hostbuilder.image_list,
    hostbuilder.image_start, hostbuilder.image_stop,
    hostmanager.hosts_clear, hostmanager.hosts_filter, hostmanager.hosts_list, hostmanager.hosts_logged,
    hostmanager.hosts_reset, hostmanager.restart_nginx, hostmanager.nginx_stop, hostmanager.hosts_forget,
    monitor.monitor,
    *deploy.tasks(),
):
    ns.add_task(_task)
