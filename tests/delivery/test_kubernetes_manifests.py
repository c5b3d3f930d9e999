"""deploy/kubernetes: valid against the Kubernetes API's own schemas (offline, kubernetes-validate), and in step with
the image they run (its port, user, health routes and graceful-shutdown time) and with the service's settings."""

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from serve.app import create_app
from serve.settings import Settings
from tests.containers import HEALTHY_WITHIN_S, docker, free_port, run_container, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
DOCKERFILE = (ROOT / "Dockerfile").read_text()
KUBERNETES_VERSION = "1.31.0"  # the oldest minor release still supported upstream (docs/delivery.md)
# Read by the image's entry point (uvicorn) or by the libraries the service calls, not by serve/settings.py.
ENVIRONMENT_OF_OTHERS = {"GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_URI"}


def resources() -> dict[str, dict[str, Any]]:
    documents = [document for path in MANIFESTS for document in yaml.safe_load_all(path.read_text()) if document]
    return {document["kind"]: document for document in documents}


def pod_spec() -> dict[str, Any]:
    return resources()["Deployment"]["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (serve,) = pod_spec()["containers"]
    return serve


def dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, DOCKERFILE, re.MULTILINE)
    assert match, f"the Dockerfile no longer matches {pattern!r}"
    return match.group(1)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_each_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        # strict: a field the API does not know (a typo, a wrong indent) fails, as `kubectl apply` would reject it
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_is_caught() -> None:
    service = resources()["Service"]
    service["spec"]["port"] = service["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)


def test_the_deployment_is_every_piece_a_replicated_service_needs() -> None:
    kinds = resources()
    assert set(kinds) == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", kinds["Deployment"]["metadata"]["name"])
    fewest = kinds["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    assert 1 <= kinds["PodDisruptionBudget"]["spec"]["minAvailable"] < fewest  # a drain can proceed, one at a time
    (port,) = container()["ports"]
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert container()["envFrom"][0]["configMapRef"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    assert container()["resources"]["requests"]["cpu"]  # the HPA's utilization is relative to the request


def test_the_port_user_and_scrape_target_are_the_images() -> None:
    port = int(dockerfile_value(r"^EXPOSE (\d+)$"))
    assert int(dockerfile_value(r"UVICORN_PORT=(\d+)")) == port
    assert container()["ports"][0]["containerPort"] == port
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == int(dockerfile_value(r"^USER (\d+)$"))
    annotations = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port


def test_the_probes_and_the_scrape_path_are_routes_of_the_service(tiny_model: Path) -> None:
    routes = set(create_app(Settings(model_uri=str(tiny_model))).openapi()["paths"])
    serve = container()
    assert serve["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert serve["readinessProbe"]["httpGet"]["path"] == "/readyz"
    probed = {serve[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    scraped = resources()["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    assert probed | {scraped} <= routes
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert serve[probe]["httpGet"]["port"] == serve["ports"][0]["name"]


def test_the_grace_period_covers_pre_stop_and_uvicorns_graceful_shutdown() -> None:
    graceful = int(dockerfile_value(r'"--timeout-graceful-shutdown", "(\d+)"'))
    pre_stop = int(container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec()["terminationGracePeriodSeconds"] > pre_stop + graceful


def test_every_setting_the_manifests_pass_is_one_the_service_reads() -> None:
    names = set(resources()["ConfigMap"]["data"]) | {variable["name"] for variable in container()["env"]}
    known = {name.upper() for name in Settings.model_fields} | ENVIRONMENT_OF_OTHERS
    assert names - known == set()
    # and the ConfigMap's values are ones the settings accept
    Settings.model_validate({name.lower(): value for name, value in resources()["ConfigMap"]["data"].items()})


def docker_flags_of_the_pod() -> list[str]:
    """`docker run` flags that give a container what the Deployment gives its pod: user, read-only root, dropped
    capabilities, no privilege escalation, the CPU and memory limits, and /tmp as the only writable place."""
    serve, security = container(), pod_spec()["securityContext"]
    limits = serve["resources"]["limits"]
    assert limits["memory"].endswith("Mi")
    (tmp,) = [mount for mount in serve["volumeMounts"] if mount["name"] == "tmp"]
    flags = ["--user", f"{security['runAsUser']}:{security['runAsGroup']}", "--cpus", limits["cpu"]]
    flags += ["--memory", f"{limits['memory'].removesuffix('Mi')}m", "--tmpfs", tmp["mountPath"]]
    if serve["securityContext"]["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if serve["securityContext"]["capabilities"]["drop"] == ["ALL"]:
        flags += ["--cap-drop", "ALL"]
    if serve["securityContext"]["allowPrivilegeEscalation"] is False:
        flags += ["--security-opt", "no-new-privileges"]
    return flags


@pytest.mark.slow
@pytest.mark.integration
def test_the_image_serves_and_logs_under_the_pods_constraints(
    serve_image: str, tiny_run: Path, container_name: str, tmp_path: Path
) -> None:
    """The image as the Deployment runs it, the ConfigMap's settings included: ready, a prediction answered and
    written to the prediction log (the log and the feedback store on /tmp here: the shared ones need a bucket), its
    preStop command present."""
    settings = dict(resources()["ConfigMap"]["data"])
    settings["PREDICTION_LOG_URL"], settings["FEEDBACK_DIR"] = "/tmp/predictions", "/tmp/feedback"
    environment = [flag for name, value in settings.items() for flag in ("-e", f"{name}={value}")]
    mount = f"{tiny_run / 'model.onnx'}:{settings['MODEL_URI']}:ro"
    port = free_port()
    run_container(serve_image, container_name, port, *docker_flags_of_the_pod(), *environment, "-v", mount)
    wait_healthy(container_name, HEALTHY_WITHIN_S)

    smoke = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "smoke_serve.py"), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert smoke.returncode == 0, smoke.stderr + docker("logs", container_name).stderr[-3000:]
    deadline = time.monotonic() + 10  # the log's writer flushes within PREDICTION_LOG_FLUSH_S (1 s)
    while ".jsonl" not in (listing := docker("exec", container_name, "ls", "-R", "/tmp/predictions").stdout):
        assert time.monotonic() < deadline, listing
        time.sleep(0.5)
    assert ".png" in listing  # the image as the model saw it, beside its batch's records
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert docker("exec", container_name, pre_stop[0], "0").returncode == 0
    written = docker("exec", container_name, "touch", "/app/x", check=False)
    assert written.returncode != 0 and "Read-only file system" in written.stderr
