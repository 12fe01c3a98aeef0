"""Services: the {service}-{op} tasks for each service/<name>/ (for hello: hello-deploy,
hello-rollback, hello-start, hello-stop, hello-test).

A service is a folder under service/ with a service.yaml manifest; every declared service gets the
same five tasks. The work runs on the inventory's workers of the environments that run that service
(``fabfile.flows.rollout``); a deploy behind a live load balancer is rolling
(``fabfile.flows.environment.deploy_balanced_or_parallel``), and so is a rollback.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fabfile.core.fanout import HostResult, raise_if_failed, summary
from fabfile.core.output import say
from fabfile.flows import environment, rollout
from fabfile.services import manifest
from fabfile.taskutil import load_config, task

ENV_HELP = {"env": "only this environment's workers"}
VERSION_HELP = "git tag or commit in the service's repo (default: the environment's version)"


def _finish(what: str, results: list[HostResult]) -> None:
    say(summary(what, results))
    raise_if_failed(what, results)


def _named(func: Callable[..., Any], service: str, op: str, doc: str) -> Callable[..., Any]:
    func.__name__ = f"{service}_{op}"
    func.__doc__ = doc.format(service=service)
    return func


def deploy_task(service: str) -> Any:
    def run(c, version=None, env=None):
        cfg = load_config()
        _finish(f"{service}-deploy",
                environment.deploy_balanced_or_parallel(cfg, manifest.get(service), version, env))

    doc = "Deploy a version of {service} to the workers (tested first)."
    return task(name=f"{service}-deploy", help={**ENV_HELP, "version": VERSION_HELP})(
        _named(run, service, "deploy", doc))


def rollback_task(service: str) -> Any:
    def run(c, env=None):
        _finish(f"{service}-rollback",
                environment.rollback_balanced_or_parallel(load_config(), manifest.get(service), env))

    doc = "Switch {service} back to the previous release on the workers."
    return task(name=f"{service}-rollback", help=ENV_HELP)(_named(run, service, "rollback", doc))


def control_task(service: str, action: str, doc: str) -> Any:
    def run(c, env=None):
        _finish(f"{service}-{action}", rollout.control(load_config(), manifest.get(service), env, action))

    return task(name=f"{service}-{action}", help=ENV_HELP)(_named(run, service, action, doc))


def test_task(service: str) -> Any:
    def run(c, env=None):
        _finish(f"{service}-test", rollout.test(load_config(), manifest.get(service), env))

    doc = "Check {service} on every worker over HTTP."
    return task(name=f"{service}-test", help=ENV_HELP)(_named(run, service, "test", doc))


def tasks() -> list[Any]:
    found = []
    for service in manifest.service_names():
        found += [deploy_task(service), rollback_task(service),
                  control_task(service, "start", "(Re)start {service} on every worker."),
                  control_task(service, "stop", "Stop {service} on every worker."),
                  test_task(service)]
    return found
