"""The environments.yaml the unit tests share: `prod` (1 load balancer + 2 workers) and a
one-image environment next to it, on a provider of the test's choosing, and the fixture body
that points booted at it (own state dir, own config)."""
from __future__ import annotations

from pathlib import Path

from fabfile.providers import load_config


def environment(name: str, provider: str, loadbalancers: list[str], workers: list[str]) -> str:
    """One environment's block (under ``environments:``) serving hello v1."""
    images = list(dict.fromkeys(loadbalancers + workers))
    return f"""\
  {name}:
    provider: {provider}
    images: [{", ".join(images)}]
    roles: {{loadbalancers: [{", ".join(loadbalancers)}], workers: [{", ".join(workers)}]}}
    service: hello
    version: v1
"""


def two_environments(provider: str, other: str = "dev-env", other_image: str = "dev-box") -> str:
    return ("environments:\n" + environment("prod", provider, ["prod-lb1"], ["prod-web1", "prod-web2"])
            + environment(other, provider, [other_image], [other_image]))


def use_config(tmp_path: Path, monkeypatch, text: str, state: Path | None = None):
    """Write ``text`` as the config, point BOOTED_CONFIG and BOOTED_STATE_DIR at this test's own
    files, and return (config path, loaded config)."""
    monkeypatch.setenv("BOOTED_STATE_DIR", str(state or tmp_path / "state"))
    path = tmp_path / "environments.yaml"
    path.write_text(text)
    monkeypatch.setenv("BOOTED_CONFIG", str(path))
    return path, load_config(path)
