"""The deployment files: docker/compose.yaml runs only commands the CLI (ours and Ray's) accepts,
and docker/Dockerfile builds from the repository alone.

No Docker engine is needed: the compose file is parsed here, every command and health check it
runs is parsed by the parser that would run it, and `docker compose config` checks it too when
the compose plugin is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ROLES = {"postgres", "migrate", "server", "worker", "ray-head", "ray-worker"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _argv(command: list[str] | str) -> list[str]:
    """The argv a service runs: `sh -c "exec ..."` unwrapped, compose's variables at their
    defaults, the container's own (`$$VAR`) replaced by a placeholder."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2])
    if argv and argv[0] == "exec":
        argv = argv[1:]
    # ${VAR:-default}: what compose puts there with VAR unset; $$VAR: the container's shell's
    argv = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in argv]
    return [re.sub(r"\$\$?\{?\w+\}?", "value", a) for a in argv]


def _check_ours(argv: list[str]) -> None:
    from sparse_circuits.cli import build_parser  # noqa: PLC0415

    assert argv[0] == "sparse-circuits", argv
    command = next((a for a in argv[1:] if not a.startswith("-")), None)
    try:
        build_parser(command).parse_args(argv[1:])
    except SystemExit as e:  # argparse exits on an unknown command or flag
        pytest.fail(f"`{shlex.join(argv)}` is not a valid sparse-circuits command line ({e})")


def _check_ray(argv: list[str]) -> None:
    import click  # noqa: PLC0415
    from ray.scripts.scripts import cli  # noqa: PLC0415

    assert argv[0] == "ray" and argv[1] in cli.commands, argv
    try:
        cli.commands[argv[1]].make_context(f"ray {argv[1]}", argv[2:])
    except click.ClickException as e:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid ray command line: {e.format_message()}")


def _check(argv: list[str]) -> None:
    if argv[0] == "sparse-circuits":
        _check_ours(argv)
    elif argv[0] == "ray":
        _check_ray(argv)
    elif argv[:2] == ["python", "-c"]:
        compile(argv[2], "<healthcheck>", "exec")
    elif argv[0] == "pg_isready":
        pass  # the postgres image's own tool
    else:
        pytest.fail(f"compose runs {argv[0]!r}, which this test does not know how to check")


def test_compose_has_every_role_with_health_checks_and_volumes(compose):
    services = compose["services"]
    assert ROLES <= set(services)
    for name, svc in services.items():
        if name != "migrate":  # a one-shot job: it exits, the others wait for that
            assert "healthcheck" in svc, f"{name} has no health check"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"], f"{name} mounts undeclared volume {source}"
    # The data dir is shared by everything that reads or writes artifacts; the database persists.
    for name in ("server", "worker", "ray-head", "ray-worker"):
        assert "data:/data" in services[name]["volumes"], name
    assert any(v.startswith("pgdata:") for v in services["postgres"]["volumes"])


def test_migrations_run_once_before_servers_and_workers(compose):
    services = compose["services"]
    assert _argv(services["migrate"]["command"])[1:3] == ["db", "upgrade"]
    for name in ("server", "worker"):
        dep = services[name]["depends_on"]["migrate"]
        assert dep["condition"] == "service_completed_successfully", name
    # nobody else migrates at start
    assert "--no-worker" in _argv(services["server"]["command"])


def test_worker_runs_jobs_on_the_ray_head(compose):
    argv = _argv(compose["services"]["worker"]["command"])
    assert argv[argv.index("--backend") + 1] == "ray"
    assert "ray-head:8265" in argv[argv.index("--ray-address") + 1]
    assert "--metrics-port" in argv
    head = _argv(compose["services"]["ray-head"]["command"])
    assert "--head" in head and "--dashboard-port=8265" in head and "--block" in head


def test_every_command_compose_runs_exists(compose):
    for name, svc in compose["services"].items():
        if "command" in svc:
            _check(_argv(svc["command"]))
        test = svc.get("healthcheck", {}).get("test")
        if test:
            assert test[0] in ("CMD", "CMD-SHELL"), name
            _check(_argv(test[1:] if test[0] == "CMD" else test[1]))


def test_image_builds_from_the_repository_alone(compose):
    text = DOCKERFILE.read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in text.splitlines():
        words = line.split()
        if words and words[0] in ("COPY", "ADD"):
            assert words[0] == "COPY", "ADD may fetch URLs: the image must need only the repository"
            for source in [w for w in words[1:-1] if not w.startswith("--")]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert source in kept, f"COPY {source}: excluded by Dockerfile.dockerignore"
    # torch in a layer of its own, before the sources; its index (CPU or CUDA) a build argument
    torch_layer = text.index('"torch==${TORCH_VERSION}"')
    assert torch_layer < text.index("COPY sparse_circuits")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    for name in ROLES - {"postgres"}:
        build = compose["services"][name]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
        assert "TORCH_INDEX_URL" in build["args"]


def test_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    out = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
