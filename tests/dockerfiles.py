"""The container images' Dockerfiles, read as an engine reads them: stages, ARG defaults, ENV, line
continuations, `${VAR}` substitution. For the tests of the images (test_docker.py) and of what runs them
(test_kubernetes.py: the images' user, ENV and entry point)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER_DIR / "Dockerfile", "cuda": DOCKER_DIR / "Dockerfile.cuda"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    arguments: str  # continuation lines joined


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [item.arguments for item in self.instructions if item.keyword == keyword]

    def only(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name or self.base}, found {found}"
        return found[0]


@dataclass(frozen=True)
class Dockerfile:
    global_args: tuple[str, ...]
    stages: tuple[Stage, ...]

    @property
    def builder(self) -> Stage:
        return self.stages[0]

    @property
    def runtime(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Comments dropped (also inside continuations, as the engine does), continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path}: the last instruction ends in a line continuation"
    global_args: list[str] = []
    stages: list[tuple[str, str | None, list[Instruction]]] = []
    for text in logical:
        keyword, _, arguments = text.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            parts = arguments.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append((parts[0], name, []))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may come before the first FROM, not {keyword}"
            global_args.append(arguments)
        else:
            stages[-1][2].append(Instruction(keyword, arguments))
    return Dockerfile(
        tuple(global_args), tuple(Stage(base, name, tuple(items)) for base, name, items in stages)
    )


_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME` and `${NAME}`, unset ones empty, as in Dockerfile instructions."""
    return _VARIABLE.sub(lambda match: variables.get(match.group(1) or match.group(2), ""), text)


def parse_arg(arguments: str) -> tuple[str, str | None]:
    (token,) = shlex.split(arguments)
    name, equals, default = token.partition("=")
    return name, default if equals else None


def parse_env(arguments: str, variables: dict[str, str]) -> dict[str, str]:
    """`ENV A=1 B="x y"`: values substituted from what was defined before this instruction."""
    pairs = {}
    for token in shlex.split(arguments):
        name, equals, value = token.partition("=")
        assert equals, f"ENV {arguments}: use the NAME=value form"
        pairs[name] = expand(value, variables)
    return pairs


def apply_definition(
    item: Instruction,
    variables: dict[str, str],
    global_defaults: dict[str, str | None],
    overrides: dict[str, str],
) -> None:
    """An ARG (a build-argument override, else its default, else the global ARG's) or an ENV, in place."""
    if item.keyword == "ARG":
        name, default = parse_arg(item.arguments)
        value = overrides.get(name, default if default is not None else global_defaults.get(name))
        if value is not None:
            variables[name] = expand(value, variables)
    elif item.keyword == "ENV":
        variables.update(parse_env(item.arguments, variables))


def stage_variables(
    dockerfile: Dockerfile, stage: Stage, overrides: dict[str, str], base_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The ARG values and ENV of a stage after its last instruction; `base_env` is the base image's ENV."""
    global_defaults = dict(parse_arg(arguments) for arguments in dockerfile.global_args)
    variables = dict(base_env or {})
    for item in stage.instructions:
        apply_definition(item, variables, global_defaults, overrides)
    return variables
