"""The environments.yaml the unit tests share: `prod` (1 load balancer + 2 workers) and a
one-image environment next to it, on a provider of the test's choosing, and the fixture body
that points booted at it (own state dir, own config)."""
from __future__ import annotations

from pathlib import Path

from fabfile.providers import load_config


def two_environments(provider: str, other: str = "dev-env", other_image: str = "dev-box") -> str:
    return f"""\
environments:
  prod:
    provider: {provider}
    images: [prod-lb1, prod-web1, prod-web2]
    roles: {{loadbalancers: [prod-lb1], workers: [prod-web1, prod-web2]}}
    service: hello
    version: v1
  {other}:
    provider: {provider}
    images: [{other_image}]
    roles: {{loadbalancers: [{other_image}], workers: [{other_image}]}}
    service: hello
    version: v1
"""


def use_config(tmp_path: Path, monkeypatch, text: str, state: Path | None = None):
    """Write ``text`` as the config, point BOOTED_CONFIG and BOOTED_STATE_DIR at this test's own
    files, and return (config path, loaded config)."""
    monkeypatch.setenv("BOOTED_STATE_DIR", str(state or tmp_path / "state"))
    path = tmp_path / "environments.yaml"
    path.write_text(text)
    monkeypatch.setenv("BOOTED_CONFIG", str(path))
    return path, load_config(path)
