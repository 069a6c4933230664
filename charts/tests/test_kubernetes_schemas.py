"""Every rendered object is valid Kubernetes: checked against the OpenAPI schemas of the
Kubernetes releases the chart supports (the kubernetes-validate package carries them, so
this runs offline), in strict mode, where an unknown or misspelt field is an error."""

from __future__ import annotations

import kubernetes_validate
import pytest

# The oldest release the chart supports (classic sidecars), the first with native sidecars,
# and the newest the validator knows.
KUBERNETES_VERSIONS = ["1.25.0", "1.29.0", kubernetes_validate.latest_version()]

# Custom resources of the Prometheus operator: not in Kubernetes' schemas; their shape is
# checked here against the fields of monitoring.coreos.com/v1 the chart uses.
MONITORING_FIELDS = {
    "ServiceMonitor": {"namespaceSelector", "selector", "endpoints"},
    "PodMonitor": {"namespaceSelector", "selector", "podMetricsEndpoints"},
    "PrometheusRule": {"groups"},
}
RULE_FIELDS = {"alert", "expr", "for", "labels", "annotations"}
ENDPOINT_FIELDS = {"port", "path", "interval"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(any_render, version):
    checked = 0
    for obj in any_render.objects:
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue
        where = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where} is not valid for Kubernetes {version}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{where}: no schema in Kubernetes {version}: {error.message}")
        checked += 1
    assert checked == len([o for o in any_render.objects if o["apiVersion"] != "monitoring.coreos.com/v1"])
    assert checked >= 18  # the control plane without the injector's RBAC (existing-tls)


def test_strict_validation_catches_a_misspelt_field(default):
    deployment = default.deployment("controller")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_monitoring_objects_have_the_operator_shape(any_render):
    for obj in any_render.objects:
        if obj["apiVersion"] != "monitoring.coreos.com/v1":
            continue
        assert obj["kind"] in MONITORING_FIELDS
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(obj["spec"]) == MONITORING_FIELDS[obj["kind"]]
        if obj["kind"] == "PrometheusRule":
            for group in obj["spec"]["groups"]:
                assert set(group) == {"name", "rules"} and isinstance(group["name"], str)
                for rule in group["rules"]:
                    assert set(rule) <= RULE_FIELDS and {"alert", "expr"} <= set(rule), rule
                    assert isinstance(rule["expr"], str)
                    assert all(isinstance(v, str) for v in rule["labels"].values())
                    assert all(isinstance(v, str) for v in rule["annotations"].values())
        endpoints = obj["spec"].get("endpoints") or obj["spec"].get("podMetricsEndpoints") or []
        for endpoint in endpoints:
            assert set(endpoint) == ENDPOINT_FIELDS
            assert isinstance(endpoint["port"], str)
        kubernetes_validate.validate(  # metadata is an ordinary ObjectMeta
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
            KUBERNETES_VERSIONS[-1], strict=True)
