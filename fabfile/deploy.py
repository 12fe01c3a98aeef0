"""Services: the {service}-{op} tasks (deploy, start, stop, test, rollback) for each service/."""
from __future__ import annotations

from .errors import NotAvailable
from .taskutil import task

SERVICES = ["hello"]


def _make(service: str, op: str, doc: str):
    def body(c, version=None, env=None):
        raise NotAvailable(f"{service}-{op} (deploy)")

    body.__doc__ = doc.format(service=service)
    body.__name__ = f"{service}_{op}"
    return task(name=f"{service}-{op}", help={"version": "release (git tag or commit)", "env": "environment"})(body)


def tasks():
    out = []
    for service in SERVICES:
        out.append(_make(service, "deploy", "Deploy a version of {service} to the workers (tested first)."))
        out.append(_make(service, "start", "(Re)start {service} on every worker."))
        out.append(_make(service, "stop", "Stop {service} on every worker."))
        out.append(_make(service, "test", "Check {service} on every worker over HTTP."))
        out.append(_make(service, "rollback", "Switch {service} back to the previous release."))
    return out
