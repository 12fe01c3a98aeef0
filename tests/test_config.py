"""environments.yaml: the shipped file loads; every mistake is one line naming file, line and key."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from fabfile.core.errors import ConfigError
from fabfile.providers import load_config

ROOT = Path(__file__).resolve().parent.parent

GOOD = textwrap.dedent("""\
    environments:
      dev:
        provider: local
        images: [dev-box]
        roles:
          loadbalancers: [dev-box]
          workers: [dev-box]
        service: hello
        version: v1
    """)


def test_shipped_environments_load_with_the_original_shapes():
    cfg = load_config(ROOT / "environments.yaml")
    assert set(cfg.environments) >= {"prod", "dev", "test", "local"}
    prod = cfg.environments["prod"]
    assert len(prod.loadbalancers) == 1 and len(prod.workers) == 2
    for name in ("dev", "test"):
        env = cfg.environments[name]
        assert env.images == env.loadbalancers == env.workers  # one image in both roles
    assert cfg.environments["local"].provider == "local"


def test_defaults_fill_in(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(GOOD)
    cfg = load_config(path)
    env = cfg.env("dev")
    assert (env.min_workers, env.max_workers, env.lb_port) == (1, 1, 8080)
    assert cfg.nginx["port"] == 8480 and cfg.providers["local"]["bridge"] == "booted0"
    assert env.monitor.latency_high_ms == 300.0


BAD = [
    # (description, yaml, expected line, expected fragment)
    ("duplicate key", GOOD.replace("    service: hello\n", "    service: hello\n    service: hello\n"), 9,
     "duplicate key 'service' (first at line 8)"),
    ("unknown key", GOOD.replace("    version: v1\n", "    version: v1\n    colour: blue\n"), 10,
     "environments.dev.colour: unknown key"),
    ("missing key", GOOD.replace("    service: hello\n", ""), 3, "environments.dev.service: missing required key"),
    ("role names an undeclared image", GOOD.replace("workers: [dev-box]", "workers: [dev-box, ghost]"), 7,
     "environments.dev.roles.workers[1]: names image 'ghost', which is not in environments.dev.images"),
    ("wrong type", GOOD.replace("images: [dev-box]", "images: dev-box"), 4,
     "environments.dev.images: must be a list, not a string"),
    ("unknown provider", GOOD.replace("provider: local", "provider: docker"), 3,
     "unknown provider 'docker'"),
    ("bad image name", GOOD.replace("[dev-box]", "[dev box]").replace("[dev-box]", "[dev box]"), 4,
     "invalid image name 'dev box'"),
    ("port out of range", "settings:\n  nginx: {port: 70000}\n" + GOOD, 2, "settings.nginx.port: must be a TCP port"),
    ("max below min", GOOD + "    workers: {min: 2, max: 1}\n", 10, "environments.dev.workers.max: is 1, below workers.min (2)"),
    ("not YAML", GOOD.replace("roles:", "roles: [oops"), None, "not valid YAML"),
    ("empty file", "", None, "file is empty"),
    ("no environments", "settings: {}\n", None, "environments: missing required key"),
    ("bad subnet", "providers:\n  local: {subnet: 10.1.2.3/24}\n" + GOOD, 2, "providers.local.subnet"),
    ("image in two environments", GOOD + GOOD.replace("environments:\n", "").replace("  dev:", "  dev2:"), None,
     "image 'dev-box' is already in environment 'dev'"),
    ("bool where int", GOOD + "    lb_port: true\n", 10, "environments.dev.lb_port: must be an integer, not true/false"),
    ("latency band inverted", GOOD + "    monitor: {latency_high_ms: 50, latency_low_ms: 80}\n", 10,
     "latency_low_ms: must be below latency_high_ms"),
]


@pytest.mark.parametrize("what,text,line,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_configuration_is_one_clear_error(tmp_path, what, text, line, fragment):
    path = tmp_path / "environments.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(str(path))
    if line is not None:
        assert message.startswith(f"{path}:{line}:"), message
    assert "\n" not in message


def test_bad_configuration_through_fab_exits_2_with_one_line(tmp_path):
    path = tmp_path / "environments.yaml"
    path.write_text(BAD[0][1])
    env = dict(os.environ, BOOTED_CONFIG=str(path), BOOTED_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run(["fab", "image-list"], cwd=ROOT, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "duplicate key" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_environment_names_the_known_ones(tmp_path):
    path = tmp_path / "environments.yaml"
    path.write_text(GOOD)
    env = dict(os.environ, BOOTED_CONFIG=str(path), BOOTED_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run(["fab", "env-start-all", "--env", "nope"], cwd=ROOT, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "unknown environment 'nope' (known: dev)" in proc.stderr
    assert not (tmp_path / "state" / "inventory.json").exists()
