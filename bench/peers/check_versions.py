"""Wait until every host answers GET /version with VERSION (the deploy's HTTP check, from the controller).

    python3 check_versions.py VERSION PORT ADDRESS...

Polls each host every 50 ms (as booted's wait_for_version does), all hosts at once; exits 0 when
all answer, 1 naming the hosts that did not within 60 s.
"""
import http.client
import sys
import threading
import time

TIMEOUT_S = 60.0


def wait(address: str, port: int, version: str, failures: list) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(address, port, timeout=2)
            try:
                conn.request("GET", "/version")
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace").strip()
            finally:
                conn.close()
            if resp.status == 200 and body == version:
                return
            last = f"{resp.status} {body[:40]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    failures.append(f"{address}: {last}")


def main(argv: list[str]) -> int:
    version, port, addresses = argv[0], int(argv[1]), argv[2:]
    failures: list[str] = []
    threads = [threading.Thread(target=wait, args=(a, port, version, failures)) for a in addresses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print(f"not serving {version}: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
