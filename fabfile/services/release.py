"""Releases of a service on hosts: pack and test once, ship to each host, switch, restart, check.

Layout on a host (Capistrano's)::

    /opt/booted/<service>/releases/<version>/   unpacked release (+ VERSION, .booted-commit)
    /opt/booted/<service>/current -> releases/<version>   switched atomically (rename)
    /opt/booted/<service>/shared/                 survives releases (e.g. delay_ms)
    /opt/booted/<service>/history                 one version per line, in switch order
    /etc/systemd/system/booted-<service>.service

Each host costs one SSH connection and one command: the tarball streams into the command's stdin.
The scripts are fixed text; every value reaches them as a quoted positional argument.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fabfile.core import names, ssh
from fabfile.core.errors import BootedError, ConfigError, HostError
from fabfile.core.http import http_request
from fabfile.core.output import poll, progress
from fabfile.core.state import atomic_write, atomic_write_json, locked, read_json, state_path
from fabfile.services import manifest as services
from fabfile.services import repo as servicerepo

REMOTE_ROOT = "/opt/booted"

# Sourced first by the scripts that change a service's releases: one at a time per service and host
# (another controller, the monitor, a second terminal), waiting up to 120 s. $1 is the service.
_REMOTE_LOCK = r"""
set -eu
root="/opt/booted/$1"
[ -d "$root/releases" ] && [ -d "$root/shared" ] || mkdir -p "$root/releases" "$root/shared"
exec 9>"$root/.deploy.lock"
flock -w 120 9 || { echo "another deploy or rollback of $1 on this host did not finish within 120s" >&2; exit 4; }
"""

# $1 service, $2 version, $3 commit, $4 unit text, $5 releases to keep. stdin: the release .tar.gz
# Shell builtins where they do (read, test, for): every worker runs this at every deploy, and on a
# VM still booting under TCG each process costs a tenth of a second (a first deploy started 20
# processes, now 14; a later one 19, now 10).
DEPLOY_SCRIPT = _REMOTE_LOCK + r"""
svc="$1"; version="$2"; commit="$3"; unit="$4"; keep="$5"
rel="$root/releases/$version"
# under the lock nothing else is unpacking: any .incoming.* is what an interrupted deploy left
for left in "$root/releases"/.incoming.*; do
  [ ! -e "$left" ] || rm -rf -- "$left"
done
shipped=""
if [ -r "$rel/.booted-commit" ]; then read -r shipped < "$rel/.booted-commit" || true; fi
if [ "$shipped" = "$commit" ]; then
  cat >/dev/null
else
  tmp=$(mktemp -d "$root/releases/.incoming.XXXXXX")
  tar -xzf - -C "$tmp"
  printf '%s\n' "$version" > "$tmp/VERSION"
  printf '%s\n' "$commit" > "$tmp/.booted-commit"
  chmod 755 "$tmp"
  [ ! -e "$rel" ] || rm -rf -- "$rel"
  mv "$tmp" "$rel"
fi
ln -sfn "releases/$version" "$root/.current.$$"
mv -T "$root/.current.$$" "$root/current"
printf '%s\n' "$version" >> "$root/history"
unitfile="/etc/systemd/system/booted-$svc.service"
installed=""
if [ -r "$unitfile" ]; then
  while IFS= read -r line || [ -n "$line" ]; do installed="$installed$line
"; done < "$unitfile"
fi
if [ "$installed" != "$unit
" ]; then
  printf '%s\n' "$unit" > "$unitfile.$$.new"
  mv "$unitfile.$$.new" "$unitfile"
  # systemd reads a unit it has not loaded yet from disk when asked for it (`show` asks); only a
  # loaded one whose file changed needs the reload (which reruns every generator: 0.1 s on a host)
  if [ "$(systemctl show -P NeedDaemonReload "booted-$svc.service")" != no ]; then systemctl daemon-reload; fi
fi
# what `systemctl enable` makes for the unit's WantedBy=multi-user.target
[ -L "/etc/systemd/system/multi-user.target.wants/booted-$svc.service" ] ||
  systemctl enable --quiet --no-reload "booted-$svc.service" 2>/dev/null || true
systemctl restart "booted-$svc.service"
# keep the newest $keep releases (never the current one)
cd "$root/releases"
kept=0
for old in *; do [ ! -e "$old" ] || kept=$((kept + 1)); done
if [ "$kept" -gt "$keep" ]; then
  ls -1t | tail -n +"$((keep + 1))" | while read -r old; do
    [ "$old" = "$version" ] || rm -rf -- "$old"
  done
fi
echo "deployed $version"
"""

# $1 service. Switch current to the release before it in history, restart.
ROLLBACK_SCRIPT = _REMOTE_LOCK + r"""
svc="$1"
cur=$(readlink "$root/current" 2>/dev/null || true); cur="${cur#releases/}"
[ -n "$cur" ] || { echo "nothing deployed" >&2; exit 3; }
prev=""
for v in $(tac "$root/history"); do
  if [ "$v" != "$cur" ] && [ -d "$root/releases/$v" ]; then prev="$v"; break; fi
done
[ -n "$prev" ] || { echo "no earlier release kept on this host" >&2; exit 3; }
ln -sfn "releases/$prev" "$root/.current.$$"
mv -T "$root/.current.$$" "$root/current"
printf '%s\n' "$prev" >> "$root/history"
systemctl restart "booted-$svc.service"
echo "$prev"
"""

# $1 service, $2 action (start|stop)
CONTROL_SCRIPT = r"""
set -eu
svc="$1"; unit="booted-$svc.service"
[ -e "/etc/systemd/system/$unit" ] || { echo "$svc is not deployed on this host" >&2; exit 3; }
case "$2" in
  start) systemctl enable --quiet --no-reload "$unit" 2>/dev/null || true; systemctl restart "$unit" ;;
  stop) systemctl stop "$unit" ;;
esac
readlink "/opt/booted/$svc/current" | sed 's#^releases/##'
"""


# $1 port, $2 seconds. Wait until no TCP connection to the port is established (the load
# balancers' nginx workers that still used this host are gone); print how many are left.
WAIT_IDLE_SCRIPT = r"""
set -eu
port="$1"; tenths=$(( $2 * 10 ))
while :; do
  n=$(ss -Htn state established "( sport = :$port )" | wc -l)
  if [ "$n" -eq 0 ] || [ "$tenths" -le 0 ]; then echo "$n"; exit 0; fi
  tenths=$((tenths - 1))
  sleep 0.1
done
"""


@dataclass(frozen=True)
class Release:
    """A packed, tested version of a service, ready to ship."""

    service: str
    version: str
    commit: str
    tarball: Path

    @property
    def data(self) -> bytes:
        return self.tarball.read_bytes()


def unit_text(service: services.Service) -> str:
    """The systemd unit for a service (the same on every host; it changes only with the manifest)."""
    root = f"{REMOTE_ROOT}/{service.name}"
    argv = " ".join(_systemd_quote(a, command=True) for a in service.run_argv)
    env_lines = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n" for k, v in sorted(service.env.items()))
    return (
        "[Unit]\n"
        f"Description=booted service {service.name}\n"
        "After=network.target\n"
        # deploys restart it on purpose, possibly several times a minute: no start rate limit
        "StartLimitIntervalSec=0\n\n"
        "[Service]\n"
        "Type=simple\n"
        "DynamicUser=yes\n"
        f"WorkingDirectory={root}/current\n"
        f"Environment={service.name.upper()}_SHARED_DIR={root}/shared\n"
        f"Environment={service.name.upper()}_PORT={service.port}\n"
        f"{env_lines}"
        f"ExecStart={argv}\n"
        "Restart=on-failure\n"
        "RestartSec=1\n"
        "TimeoutStopSec=15\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target"
    )


def _systemd_quote(word: str, *, command: bool = False) -> str:
    """``word`` as one double-quoted systemd value (systemd.syntax(7) quoting, systemd.unit(5)
    specifiers): backslash and quote escaped, ``%`` doubled; in a command line (systemd.service(5)
    ``ExecStart=``) ``$`` doubled too, so no variable is substituted. A control character (a newline
    would start a new unit line) is refused: the manifest check stops it before this."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in word):
        raise BootedError(f"refusing a control character in a systemd unit value: {word[:40]!r}")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if command:
        escaped = escaped.replace("$", "$$")
    return f'"{escaped}"'


def prepare(service: services.Service, version: str) -> Release:
    """Pack ``version`` from the service's repo and run its tests on the packed tree (once per commit)."""
    names.check("version", version)
    folder = state_path("releases", service.name, ".keep").parent
    # held while another process packs and tests (fetch, then the test gate): wait that long
    with locked(f"release-{service.name}", timeout=servicerepo.FETCH_TIMEOUT_S + service.test_timeout_s + 120):
        if services.uses_default_repo(service):
            servicerepo.ensure_local_repo(service)
        commit = servicerepo.resolve(service, version)
        tarball = folder / f"{commit}.tar.gz"
        if not tarball.exists():
            servicerepo.pack(service, version, tarball)
        gate = folder / f"{commit}.tested"
        if not gate.exists():
            progress(f"{service.name} {version}: running its tests on the packed release")
            ok, output = servicerepo.test_packed(service, tarball)
            if not ok:
                last = [line for line in output.strip().splitlines() if line.strip()][-3:]
                raise BootedError(
                    f"{service.name} {version} failed its tests; nothing was uploaded: " + " | ".join(last)
                )
            atomic_write(gate, f"{version}\n")
        return Release(service.name, version, commit, tarball)


def deploy_to(conn, service: services.Service, release: Release, keep: int, timeout: float) -> str:
    """Ship and activate ``release`` on one host; return once the service answers with the version.

    One deploy per host at a time from this machine (a lock per host; the host's own lock in the
    script covers other machines)."""
    with locked(f"deploy-{service.name}-{conn.host}", timeout=timeout + 60):
        return _deploy_to(conn, service, release, keep, timeout)


def _deploy_to(conn, service: services.Service, release: Release, keep: int, timeout: float) -> str:
    ssh.run_with_input(
        conn, ["sh", "-c", DEPLOY_SCRIPT, "deploy", service.name, release.version, release.commit,
               unit_text(service), str(keep)],
        release.data, sudo=True, timeout=timeout,
    )
    wait_for_version(conn.host, service, release.version, timeout=timeout)
    return f"{release.version} ({release.commit[:8]})"


def rollback_on(conn, service: services.Service, timeout: float) -> str:
    result = ssh.run(conn, ["sh", "-c", ROLLBACK_SCRIPT, "rollback", service.name], sudo=True, timeout=timeout)
    version = result.stdout.strip().splitlines()[-1]
    wait_for_version(conn.host, service, version, timeout=timeout)
    record(conn.host, service.name, version, None)
    return f"rolled back to {version}"


def control(conn, service: services.Service, action: str, timeout: float) -> str:
    result = ssh.run(conn, ["sh", "-c", CONTROL_SCRIPT, "control", service.name, action], sudo=True, timeout=timeout)
    version = result.stdout.strip()
    if action == "start":
        wait_for_version(conn.host, service, version, timeout=timeout)
        return f"running {version}"
    return f"stopped ({version})"


def wait_idle(conn, service: services.Service, seconds: int) -> int:
    """Wait up to ``seconds`` until nobody is connected to the service on this host (a drained
    worker's last requests are done); returns how many connections are still open."""
    result = ssh.run(conn, ["sh", "-c", WAIT_IDLE_SCRIPT, "wait-idle", str(int(service.port)), str(int(seconds))],
                     timeout=seconds + 30)
    return int(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- HTTP checks
def wait_for_version(address: str, service: services.Service, version: str, timeout: float) -> None:
    """Poll ``/version`` until it names ``version`` (the restart is done and the service is up)."""
    last = "no answer"

    def serving() -> bool:
        nonlocal last
        try:
            status, body = http_request(address, service.port, "GET", "/version", timeout=2)
        except OSError as err:
            last = f"port {service.port}: {err.strerror or err}"
            return False
        last = f"/version answered {status} {body.strip()[:40]!r}"
        return status == 200 and body.strip() == version

    if poll(serving, timeout=timeout):
        return
    raise HostError(address, f"{service.name} did not come up as {version} within {timeout:g}s ({last})")


def check_service(address: str, service: services.Service, expected_version: str | None) -> str:
    """hello-test's checks: GET /, a POSTed name, /version. Returns a summary or raises HostError."""
    try:
        status, body = http_request(address, service.port, "GET", "/")
        if status != 200 or body.strip() != "Hello World!":
            raise HostError(address, f"GET / answered {status} {body.strip()[:60]!r}")
        status, body = http_request(address, service.port, "POST", "/booted",
                                    body=b"", headers={"Content-Length": "0"})
        if status != 200 or body.strip() != "Hello booted World!":
            raise HostError(address, f"POST /booted answered {status} {body.strip()[:60]!r}")
        status, body = http_request(address, service.port, "POST", "/", body=b"name=Ada",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200 or body.strip() != "Hello Ada World!":
            raise HostError(address, f"POST / name=Ada answered {status} {body.strip()[:60]!r}")
        status, body = http_request(address, service.port, "GET", "/version")
    except OSError as err:
        raise HostError(address, f"port {service.port}: {err.strerror or err}") from None
    version = body.strip()
    if expected_version and version != expected_version:
        raise HostError(address, f"/version is {version!r}, expected {expected_version!r}")
    return f"GET / ok, POST ok, version {version}"


# ---------------------------------------------------------------------------- what is deployed where
def _deployments_path() -> Path:
    return state_path("deployments.json")


def record(address: str, service: str, version: str, commit: str | None) -> None:
    record_many([(address, service, version, commit)])


def record_many(entries: list[tuple[str, str, str, str | None]]) -> None:
    """Remember what runs where: (address, service, version, commit); one write for a whole deploy.
    Each entry names the host by its pinned keys (``ssh.pin_ids``): see ``deployed_versions``."""
    if not entries:
        return
    hosts = ssh.pin_ids({address for address, *_ in entries})
    with locked("deployments"):
        data = _read_deployments()
        for address, service, version, commit in entries:
            data.setdefault(address, {})[service] = {"version": version, "commit": commit, "at": time.time(),
                                                     "host": hosts.get(address)}
        atomic_write_json(_deployments_path(), data)


def _read_deployments() -> dict:
    """deployments.json, checked: address -> service -> {version, commit, at}; one-line error if not."""
    path = _deployments_path()
    data = read_json(path, {}) or {}
    ok = isinstance(data, dict) and all(
        isinstance(services_, dict) and all(
            isinstance(entry, dict) and isinstance(entry.get("version"), str) for entry in services_.values())
        for services_ in data.values())
    if not ok:
        raise ConfigError(str(path), "is not booted's deployments record (address -> service -> version); "
                                     "remove it and deploy again")
    return data


def deployed_version(address: str, service: str) -> str | None:
    return deployed_versions(service, only=address).get(address)


def deployed_versions(service: str, only: str | None = None) -> dict[str, str]:
    """address -> the version of ``service`` booted last deployed there (one read of the record;
    ``only``: just that address, as a worker's own check asks).

    Only where the host booted deployed to still answers: an image deleted and built again at the
    same address (new host keys) has had nothing deployed yet, whatever its predecessor ran."""
    data = {address: entries[service] for address, entries in _read_deployments().items()
            if service in entries and only in (None, address)}
    hosts = ssh.pin_ids(data) if data else {}
    return {address: entry["version"] for address, entry in data.items()
            if entry.get("host") and entry.get("host") == hosts.get(address)}
