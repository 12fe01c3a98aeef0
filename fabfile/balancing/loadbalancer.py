"""Load balancers: nginx on each load balancer host, its upstream generated from the inventory.

The config is rendered here from nginx/loadbalancer.conf, pushed over SSH in one command that
installs it, checks it with ``nginx -t`` (restoring the previous file if the check fails) and
reloads nginx gracefully (in-flight requests finish on the old workers).
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from fabfile.core import ssh, templates
from fabfile.core.config import Config, Environment
from fabfile.core.errors import BootedError, HostError
from fabfile.core.http import http_request
from fabfile.core.output import poll
from fabfile.core.state import PROJECT_ROOT
from fabfile.hosts.inventory import HostEntry, Inventory

TEMPLATE = PROJECT_ROOT / "nginx" / "loadbalancer.conf"
REMOTE_CONF = "/etc/nginx/conf.d/booted-lb.conf"
LB_LOG = "/var/log/nginx/booted-lb.log"

# While a reload is under way this file exists on the load balancer: nginx then answers with
# "Connection: close" (see nginx/loadbalancer.conf), so clients reconnect instead of sending on a
# keep-alive connection an old nginx worker is about to close.
CLOSING_FLAG = "/run/booted-lb.closing"
# How long clients get to finish the request they have under way and see "Connection: close"
# before the reload; a client idle longer than that may still send on a closing connection
# (RFC 9112 lets it retry then; wrk counts it as a read error).
RELOAD_GRACE_S = 0.5

# $1 closing flag, $2 grace seconds; stdin: the new config. Install, check, roll back on failure,
# start, or reload and wait until every old nginx worker has exited.
PUSH_SCRIPT = r"""
set -eu
flag="$1"; grace="$2"
conf=/etc/nginx/conf.d/booted-lb.conf
mkdir -p /etc/nginx/conf.d
cat > "$conf.new"
[ -e "$conf" ] && cp -p "$conf" "$conf.old"
mv "$conf.new" "$conf"
if ! out=$(nginx -t 2>&1); then
  if [ -e "$conf.old" ]; then mv "$conf.old" "$conf"; else rm -f "$conf"; fi
  # one line: the cause (nginx's last line only says the test failed)
  why=$(printf '%s\n' "$out" | grep -m1 -E '\[(emerg|alert|crit|error)\]' || printf '%s\n' "$out" | tail -n1)
  echo "nginx -t rejected the new config: $why" >&2
  exit 4
fi
rm -f "$conf.old"
# for the host's next boot: only the symlink (no reload, no SysV script sync: 0.3 s, 1.3 s loaded)
SYSTEMCTL_SKIP_SYSV=1 systemctl enable --quiet --no-reload nginx 2>/dev/null || true
if ! systemctl is-active --quiet nginx; then
  rm -f "$flag"
  systemctl restart nginx
  exit 0
fi
# reload is asynchronous: remember the old workers, and keep the flag until all of them are gone
old=$(pgrep -P "$(cat /run/nginx.pid)" || true)
trap 'rm -f "$flag"' EXIT
: > "$flag"
sleep "$grace"
systemctl reload nginx
tenths=0
for pid in $old; do
  while [ -e "/proc/$pid" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    tenths=$((tenths + 1))
    if [ "$tenths" -ge 300 ]; then echo "old nginx workers still serving 30s after the reload" >&2; exit 5; fi
    sleep 0.1
  done
done
"""

# Passive checks (see README "Reliability"): one failure takes a primary out for 3 s. One, not
# more: each failure of a powered-off worker costs a request a timeout first. The backups make a
# healthy worker taken out by mistake harmless.
MAX_FAILS = 1
FAIL_TIMEOUT = "3s"
# Idle connections to workers kept per nginx worker process.
UPSTREAM_KEEPALIVE = 32


def zone_size(peers: int) -> str:
    """The upstream zone for ``peers`` server lines: nginx keeps each one's run-time state in it
    and refuses the config when it is full ("ngx_slab_alloc() failed: no memory in upstream zone").
    Measured with nginx 1.22: 64k held 64 lines (32 workers with their backups), 128k 152, 256k
    320, about 0.76 KiB a line over 12 KiB; 1 KiB a line over 32 KiB, in 64k steps, leaves a third spare."""
    return f"{64 * -(-(32 + peers) // 64)}k"
# Every request's proxying, the same in the normal and the closing location.
PROXY_SETTINGS = """\
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        # Retried on the next worker: a refused, reset or timed-out connection, or a 502-504.
        # nginx never retries a POST it has already sent (no non_idempotent here): the worker may
        # have acted on it. A POST whose connection failed never reached a worker and is retried.
        proxy_next_upstream error timeout http_502 http_503 http_504;
        proxy_next_upstream_tries {tries};
        proxy_next_upstream_timeout 15s;
        # a powered-off worker must cost a request 1 s, not the 60 s default, before the retry;
        # a request already sent to it waits the read timeout (hello answers in milliseconds)
        proxy_connect_timeout 1s;
        proxy_send_timeout 3s;
        proxy_read_timeout 3s;"""


@dataclass(frozen=True)
class Upstream:
    address: str
    port: int
    down: bool = False


def upstream_name(env: Environment) -> str:
    return "booted_" + re.sub(r"[^a-z0-9_]", "_", env.name)


def render(env: Environment, upstreams: Iterable[Upstream]) -> tuple[str, str]:
    """The load balancer's config and its id (a hash of everything else in it, served at
    /booted-lb/config so booted can tell when a reload has taken effect)."""
    ups = sorted(set(upstreams), key=lambda u: (u.address, u.port))
    live = [u for u in ups if not u.down]
    if not ups:
        # nginx needs at least one server; an unroutable one makes requests fail fast with 502
        servers = "    server 127.0.0.1:9 down;  # no healthy workers"
    else:
        lines = [f"    server {u.address}:{u.port} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT}"
                 f"{' down' if u.down else ''};" for u in ups]
        lines += [f"    server {u.address}:{u.port} backup max_fails=0;" for u in live]
        servers = "\n".join(lines)
    values = {
        "env": env.name,
        "upstream": upstream_name(env),
        "zone_size": zone_size(len(ups) + len(live)),
        "servers": servers,
        "port": env.lb_port,
        "keepalive": UPSTREAM_KEEPALIVE,
        "closing_flag": CLOSING_FLAG,
        # every primary and every backup once
        "proxy_settings": PROXY_SETTINGS.format(tries=max(2, 2 * len(live))),
    }
    config_id = hashlib.sha256(templates.render(TEMPLATE, {**values, "config_id": ""}).encode()).hexdigest()[:16]
    return templates.render(TEMPLATE, {**values, "config_id": config_id}), config_id


def healthy_workers(cfg: Config, env: Environment) -> list[HostEntry]:
    return [e for e in Inventory().hosts(env=env.name, role="workers") if e.reachable is not False]


def loadbalancers(cfg: Config, env: Environment) -> list[HostEntry]:
    return [e for e in Inventory().hosts(env=env.name, role="loadbalancers") if e.reachable is not False]


def push(cfg: Config, lb: HostEntry, text: str) -> None:
    with ssh.connect(lb.address, cfg) as conn:
        # at least the deploy timeout: nginx's first start on a slow host (a VM under software
        # emulation, on a loaded machine) took more than 30 s
        ssh.run_with_input(conn, ["sh", "-c", PUSH_SCRIPT, "lb-push", CLOSING_FLAG, f"{RELOAD_GRACE_S:g}"],
                           text.encode(), sudo=True, timeout=max(60.0, float(cfg.deploy["timeout_s"])))


def update(cfg: Config, env: Environment, port: int, drain: Iterable[str] = (),
           workers: list[HostEntry] | None = None) -> list[str]:
    """Regenerate and push every load balancer's upstream; ``drain``: images marked down.

    Returns the load balancer URLs. Raises if no load balancer of the environment is known.
    """
    drain = set(drain)
    workers = healthy_workers(cfg, env) if workers is None else workers
    text, config_id = render(env, [Upstream(w.address, port, w.image in drain) for w in workers])
    lbs = loadbalancers(cfg, env)
    if not lbs:
        raise BootedError(f"environment {env.name} has no load balancer host in the inventory")
    # A load balancer already serving this very config is left alone: re-running env-start-all on
    # an environment that is up checks it (one HTTP request) instead of reloading nginx.
    stale = [lb for lb in lbs if serving_config(env, lb) != config_id]
    for lb in stale:
        push(cfg, lb, text)
    for lb in stale:
        wait_serving(env, lb, config_id)
    return [url(env, lb) for lb in lbs]


def serving_config(env: Environment, lb: HostEntry) -> str | None:
    """The config id the load balancer's nginx answers at /booted-lb/config (None: no answer)."""
    try:
        status, body = http_request(lb.address, env.lb_port, "GET", "/booted-lb/config", timeout=2)
    except OSError:
        return None
    return body.strip() if status == 200 else None


def wait_serving(env: Environment, lb: HostEntry, wanted: str, timeout: float = 10.0) -> None:
    """A reload only signals nginx; wait until its new workers answer with the new config."""
    if poll(lambda: serving_config(env, lb) == wanted, timeout=timeout):
        return
    raise HostError(lb.image, f"load balancer did not switch to the new config within {timeout:g}s")


def url(env: Environment, lb: HostEntry) -> str:
    return f"http://{lb.address}:{env.lb_port}/"


def check_through(env: Environment, lb: HostEntry, timeout: float = 5.0) -> str:
    """One request through the load balancer; returns the body or raises HostError."""
    try:
        status, body = http_request(lb.address, env.lb_port, "GET", "/", timeout=timeout)
    except OSError as err:
        raise HostError(lb.image, f"load balancer port {env.lb_port}: {err.strerror or err}") from None
    if status != 200:
        raise HostError(lb.image, f"GET / through the load balancer answered {status}")
    return body.strip()
