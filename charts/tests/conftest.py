"""Shared helpers of the chart tests: render charts/trellis with the real Helm engine
(helm-python-sdk, Helm v4's Go SDK behind a C ABI) and look at the objects it makes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterator

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "trellis"
NAMESPACE = "trellis-system"
RELEASE = "trellis"
COMPONENTS = ("controller", "identity", "injector")

# Ports of ARCHITECTURE.md ("Names users see").
DISCOVERY_PORT = 8090
IDENTITY_PORT = 8080
WEBHOOK_PORT = 8443
ADMIN_PORT = 9990


def _chart_values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / name).read_text())


# Value sets every structural test runs on: the defaults, the HA overlay shipped with the
# chart, and sets that switch every optional part on or off.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "ha": _chart_values_file("values-ha.yaml"),
    "classic": {"proxy": {"sidecarMode": "classic"}},
    "external-issuer": {
        "identity": {"externalIssuer": {"enabled": True, "secretName": "mesh-issuer"}},
    },
    "existing-tls": {
        "injector": {
            "tls": {"existingSecret": "injector-serving-cert"},
            "webhook": {
                "annotations": {"cert-manager.io/inject-ca-from": "trellis-system/injector"},
            },
        },
    },
    "existing-tls-cabundle": {
        "injector": {
            "tls": {"existingSecret": "injector-serving-cert"},
            "webhook": {"caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="},
        },
    },
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}},
            "podMonitor": {"enabled": True, "interval": "1m", "labels": {"release": "prom"}},
        },
    },
    "dashboards-alerts": {
        "monitoring": {
            "dashboards": {"enabled": True, "labels": {"release": "prom"},
                           "annotations": {"grafana_folder": "Trellis"}},
            "alerts": {"enabled": True, "labels": {"release": "prom"}},
        },
    },
    "custom": {
        "trustDomain": "mesh.example.org",
        "clusterDomain": "corp.local",
        "logLevel": "info,trellis_controller=debug",
        "imagePullSecrets": [{"name": "registry-creds"}],
        "podAntiAffinity": "none",
        "priorityClassName": "system-cluster-critical",
        "controller": {
            "replicas": 2,
            "image": {"repository": "registry.example.org/trellis/controller", "tag": "v0.1.0-rc.1",
                      "pullPolicy": "Always"},
            "logLevel": "debug",
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "control-plane", "operator": "Exists", "effect": "NoSchedule"}],
            "podAnnotations": {"example.org/owner": "platform"},
            "podLabels": {"team": "platform"},
        },
        "identity": {
            "replicas": 3,
            "certLifetime": "12h",
            "reloadInterval": "10s",
            "bootstrap": {"issuerLifetime": "4380h", "rootLifetime": "43800h"},
        },
        "injector": {
            "replicas": 2,
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
            "webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 5},
        },
        "proxy": {
            "image": {"repository": "registry.example.org/trellis/proxy", "tag": "v0.1.0-rc.1"},
            "sidecarMode": "classic",
            "logLevel": "warn,trellis_proxy=debug",
            "accessLog": "json",
            "tracing": {"otlpEndpoint": "http://otel-collector.observability:4318", "sampling": 0.05},
            "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
        },
    },
}

# Namespaces the value sets are also rendered in: the chart must follow .Release.Namespace.
OTHER_NAMESPACE = "mesh-control"


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys, as the API server's decoder does."""


def _construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class Rendered:
    """The objects of one render, with look-ups by kind and name."""

    def __init__(self, manifests: dict[str, str], values: dict[str, Any], namespace: str):
        self.manifests = manifests
        self.values = values
        self.namespace = namespace
        self.objects: list[dict[str, Any]] = []
        self.notes = ""
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.load_all(text, Loader=UniqueKeyLoader):
                if doc is None:
                    continue
                assert isinstance(doc, dict), f"{path}: a document is not a mapping: {doc!r}"
                self.objects.append(doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        return None

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = self.find(kind, name)
        assert found is not None, f"no {kind} {name} in {sorted(self.kinds_and_names())}"
        return found

    def kinds_and_names(self) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in self.objects}

    def deployment(self, component: str) -> dict[str, Any]:
        return self.get("Deployment", f"trellis-{component}")

    def pod_spec(self, component: str) -> dict[str, Any]:
        return self.deployment(component)["spec"]["template"]["spec"]

    def container(self, component: str) -> dict[str, Any]:
        containers = self.pod_spec(component)["containers"]
        assert len(containers) == 1, containers
        return containers[0]

    def pod_templates(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for d in self.of_kind("Deployment"):
            yield d["metadata"]["name"], d["spec"]["template"]


def args_map(container: dict[str, Any]) -> dict[str, str | None]:
    """`--flag=value` arguments as a mapping (a bare `--flag` maps to None)."""
    out: dict[str, str | None] = {}
    for arg in container.get("args", [])[1:]:
        assert arg.startswith("--"), f"{container['name']}: argument {arg!r} is not a --flag"
        flag, sep, value = arg.partition("=")
        assert flag not in out, f"{container['name']}: {flag} given twice"
        out[flag] = value if sep else None
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm.Chart):
    """render(values=None, namespace=NAMESPACE) -> Rendered, cached per arguments."""
    cache: dict[tuple[str, str], Rendered] = {}

    def _render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> Rendered:
        values = values or {}
        key = (yaml.safe_dump(values, sort_keys=True), namespace)
        if key not in cache:
            manifests = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
            cache[key] = Rendered(manifests, chart.merge_values(values), namespace)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def default(render) -> Rendered:
    return render()


@pytest.fixture(params=sorted(VALUE_SETS), scope="session")
def value_set(request) -> tuple[str, dict[str, Any]]:
    return request.param, VALUE_SETS[request.param]


@pytest.fixture(params=[NAMESPACE, OTHER_NAMESPACE], scope="session")
def namespace(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def any_render(render, value_set, namespace) -> Rendered:
    """Every value set, in the usual namespace and in another one."""
    return render(value_set[1], namespace)
