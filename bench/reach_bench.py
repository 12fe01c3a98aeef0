"""Reachability: `fab hosts-filter` over 100 inventory addresses, half of them dead (issue 18, item 4).

    python3 bench/reach_bench.py [--hosts 100] [--rounds 5]

Needs root (it makes a network namespace). The lab: a veth pair into a namespace of its own on a
free 10.x /24; the live half of the addresses sits on the namespace's end, where one listener
accepts on port 22; the dead half are addresses of the same subnet that nobody holds, so their
connects wait on ARP like a host that is switched off (the slow kind of dead: no refusal comes).

Cases, interleaved per round (docs/benchmarking.md §8):
- floor: one TCP connect to one dead address with the probe timeout hosts-filter uses (1.0 s);
- probe: booted's ``reach.probe_ssh`` over the 100 addresses, in this process (no start-up);
- hosts-filter: the unmodified `fab hosts-filter`, from a fresh inventory of the 100 each round.
Correctness, per run: exit 0, "50 of 100 hosts answer", and the inventory keeps exactly the live half.
Goal: hosts-filter ≤ 1.3 × the floor.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import projectvenv  # noqa: E402

projectvenv.use()

import sidebyside as sbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PROBE_TIMEOUT_S = 1.0  # what hosts-filter passes to reach.probe_ssh (discovery.filter_reachable)
GOAL = 1.3

LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22)); s.listen(1024)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""


def config_text(images: list[str]) -> str:
    return "\n".join([
        "# written by bench/reach_bench.py",
        "providers:",
        "  local: {bridge: brch0, subnet: 10.254.254.0/24}",
        "environments:",
        "  rb:",
        "    provider: local",
        f"    images: [{', '.join(images)}]",
        "    roles:",
        f"      loadbalancers: [{images[0]}]",
        f"      workers: [{', '.join(images)}]",
        "    service: hello",
        "    version: v2",
    ]) + "\n"


def inventory_doc(addresses: dict[str, str], now: float) -> dict:
    """An inventory of ``{image: address}`` as hosts-logged writes it (format version 1)."""
    from fabfile.hosts.inventory import FORMAT_VERSION, HostEntry

    hosts = {}
    for n, (image, address) in enumerate(sorted(addresses.items())):
        entry = HostEntry(image=image, name=image, address=address, mac=f"02:00:00:00:{n // 256:02x}:{n % 256:02x}",
                          env="rb", roles=["workers"], first_seen=now, last_seen=now)
        hosts[image] = entry.to_dict()
    return {"version": FORMAT_VERSION, "hosts": hosts}


def split_addresses(subnet: str, count: int) -> tuple[list[str], list[str]]:
    """(live, dead) host addresses of ``subnet``: .10 upwards live, .130 upwards dead (count ≤ 200)."""
    import ipaddress

    net = ipaddress.ip_network(subnet)
    half = count // 2
    live = [str(net.network_address + 10 + i) for i in range(half)]
    dead = [str(net.network_address + 130 + i) for i in range(count - half)]
    return live, dead


def filter_outcome(returncode: int, stdout: str, kept: set[str], live: set[str], total: int) -> tuple[bool, str]:
    """Whether a hosts-filter run did the right thing: exit 0, the summary line, exactly the live kept."""
    if returncode != 0:
        return False, f"exit {returncode}"
    want = f"ssh: {len(live)} of {total} hosts answer"
    if want not in stdout:
        return False, f"no {want!r} in its output"
    if kept != live:
        return False, f"inventory kept {len(kept)} addresses, {len(kept & live)} of them live"
    return True, ""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("reach_bench: needs root (it makes a network namespace)")
    from lab import free_subnet

    from fabfile.hosts import reach

    start_load = sbs.loadavg()
    tag = f"{os.getpid() % 100000:05d}"
    ns, host_if, ns_if = f"brch{tag}", f"brh{tag}", f"brn{tag}"
    subnet = free_subnet()
    prefix = subnet.split("/")[0].rsplit(".", 1)[0]
    live, dead = split_addresses(subnet, args.hosts)
    images = [f"rb-{i:03d}" for i in range(1, args.hosts + 1)]
    addresses = dict(zip(images, live + dead))
    root = Path(tempfile.mkdtemp(prefix="booted-reach-"))
    state = root / "state"
    state.mkdir()
    (root / "environments.yaml").write_text(config_text(images))
    env = {**os.environ, "BOOTED_STATE_DIR": str(state), "BOOTED_CONFIG": str(root / "environments.yaml")}
    listener = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{prefix}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        for address in live:
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", ns_if)
        listener = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER],
                                    stdout=subprocess.PIPE, text=True)
        if listener.stdout.readline().strip() != "ready":
            raise SystemExit("reach_bench: the listener in the namespace did not start")
        print(f"reach lab: namespace {ns}, {subnet}: {len(live)} live (port 22 accepts), {len(dead)} dead "
              f"(no ARP answer); probe timeout {PROBE_TIMEOUT_S:g}s", flush=True)

        def floor() -> sbs.Outcome:
            sock = socket.socket()
            sock.settimeout(PROBE_TIMEOUT_S)
            start = time.perf_counter()
            try:
                sock.connect((dead[0], 22))
                return sbs.Outcome(time.perf_counter() - start, False, "the dead address answered")
            except OSError:
                return sbs.Outcome(time.perf_counter() - start)
            finally:
                sock.close()

        def probe() -> sbs.Outcome:
            seconds, results = sbs.timed(lambda: reach.probe_ssh(live + dead, timeout=PROBE_TIMEOUT_S))
            up = {a for a, ok in results.items() if ok}
            return sbs.Outcome(seconds, up == set(live), f"{len(up)} answered")

        def hosts_filter() -> sbs.Outcome:
            (state / "inventory.json").write_text(json.dumps(inventory_doc(addresses, time.time())))
            start = time.perf_counter()
            proc = subprocess.run(["fab", "hosts-filter"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=60, stdin=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            kept = {h["address"] for h in json.loads((state / "inventory.json").read_text())["hosts"].values()}
            ok, note = filter_outcome(proc.returncode, proc.stdout, kept, set(live), args.hosts)
            return sbs.Outcome(seconds, ok, note or "")

        cases = {"floor": floor, "probe": probe, "hosts-filter": hosts_filter}
        samples = sbs.interleave(cases, args.rounds, seed=args.seed)
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)])
    print()
    print(f"Reachability, {args.hosts} inventory addresses, half dead; {args.rounds} rounds + warm-up")
    print(sbs.table(samples, [("floor", f"floor: one probe timeout ({PROBE_TIMEOUT_S:g} s)"),
                              ("probe", f"reach.probe_ssh, {args.hosts} addresses (in process)"),
                              ("hosts-filter", "`fab hosts-filter`")], floor="floor"))
    ratio = sbs.paired_ratio(samples, "hosts-filter", "floor")
    print(sbs.verdict("hosts-filter ÷ one probe timeout", ratio, GOAL, "×"))
    print(f"conditions: {sbs.conditions(start_load)}")
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
