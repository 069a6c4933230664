"""Bad values are refused before anything is rendered (values.schema.json), or by the chart's
own checks (templates/validate.yaml), with a message that names the value; helm lint passes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import helm_python as helm
import pytest

from conftest import CHART_DIR, NAMESPACE, VALUE_SETS

# (values, what the message must contain: the value's path and the broken constraint)
BAD_VALUES = [
    ({"controller": {"replicas": -1}}, "/controller/replicas", "minimum"),
    ({"identity": {"replicas": 0}}, "/identity/replicas", "minimum"),
    ({"injector": {"replicas": "2"}}, "/injector/replicas", "want integer"),
    ({"controller": {"replicas": 1.5}}, "/controller/replicas", "want integer"),
    ({"proxy": {"sidecarMode": "sidecar"}}, "/proxy/sidecarMode", "classic"),
    ({"proxy": {"sidecarMode": "Native"}}, "/proxy/sidecarMode", "native"),
    ({"injector": {"webhook": {"failurePolicy": "Retry"}}}, "/injector/webhook/failurePolicy", "Fail"),
    ({"injector": {"webhook": {"failurePolicy": "fail"}}}, "/injector/webhook/failurePolicy", "Ignore"),
    ({"injector": {"webhook": {"timeoutSeconds": 0}}}, "/injector/webhook/timeoutSeconds", "minimum"),
    ({"injector": {"webhook": {"timeoutSeconds": 31}}}, "/injector/webhook/timeoutSeconds", "maximum"),
    ({"injector": {"webhook": {"timeoutSeconds": "10"}}}, "/injector/webhook/timeoutSeconds", "want integer"),
    ({"controller": {"image": {"tag": "v0.1.0:x"}}}, "/controller/image/tag", "pattern"),
    ({"identity": {"image": {"pullPolicy": "Sometimes"}}}, "/identity/image/pullPolicy", "IfNotPresent"),
    ({"injector": {"image": {"repository": ""}}}, "/injector/image/repository", ""),
    ({"identity": {"certLifetime": "1 day"}}, "/identity/certLifetime", "pattern"),
    ({"identity": {"certLifetime": 24}}, "/identity/certLifetime", "want string"),
    ({"identity": {"bootstrap": {"issuerLifetime": "1y"}}}, "/identity/bootstrap/issuerLifetime", "pattern"),
    ({"trustDomain": "Cluster.Local"}, "/trustDomain", "pattern"),
    ({"trustDomain": ""}, "/trustDomain", "pattern"),
    ({"clusterDomain": "cluster..local"}, "/clusterDomain", "pattern"),
    ({"logLevel": ""}, "/logLevel", "pattern"),
    ({"proxy": {"resources": {"requests": {"memory": "128m"}}}}, "/proxy/resources/requests/memory", "pattern"),
    ({"proxy": {"resources": {"requests": {"cpu": "-1"}}}}, "/proxy/resources/requests/cpu", "pattern"),
    ({"proxy": {"resources": {"limits": {"cpu": "1"}}}}, "/proxy/resources/limits", "cpu"),
    ({"controler": {"replicas": 2}}, "controler", "not allowed"),
    ({"injector": {"webhook": {"namespaceSelector": {}}}}, "/injector/webhook", "namespaceSelector"),
    ({"identity": {"externalIssuer": {"enabled": True}}}, "/identity/externalIssuer/secretName", "minLength"),
    ({"identity": {"externalIssuer": {"enabled": "yes"}}}, "/identity/externalIssuer/enabled", "want boolean"),
    ({"podAntiAffinity": "soft"}, "/podAntiAffinity", "preferred"),
    ({"monitoring": {"serviceMonitor": {"enabled": "true"}}}, "/monitoring/serviceMonitor/enabled", "want boolean"),
    ({"monitoring": {"podMonitor": {"interval": "often"}}}, "/monitoring/podMonitor/interval", "pattern"),
    ({"monitoring": {"dashboards": {"enabled": "yes"}}}, "/monitoring/dashboards/enabled", "want boolean"),
    ({"monitoring": {"alerts": {"routeSuccessRate": {"threshold": 95}}}}, "/monitoring/alerts/routeSuccessRate/threshold", "maximum"),
    ({"monitoring": {"alerts": {"routeSuccessRate": {"threshold": 0}}}}, "/monitoring/alerts/routeSuccessRate/threshold", "exclusiveMinimum"),
    ({"monitoring": {"alerts": {"certificateExpiry": {"workloadSeconds": "1h"}}}}, "/monitoring/alerts/certificateExpiry/workloadSeconds", "want integer"),
    ({"monitoring": {"alerts": {"injectorErrors": {"for": "ten minutes"}}}}, "/monitoring/alerts/injectorErrors/for", "pattern"),
    ({"gatewayAPI": {"installCRDs": "no"}}, "/gatewayAPI/installCRDs", "want boolean"),
    ({"imagePullSecrets": ["registry-creds"]}, "/imagePullSecrets/0", "want object"),
    ({"controller": {"nodeSelector": {"disk": 1}}}, "/controller/nodeSelector/disk", "want string"),
]


@pytest.mark.parametrize("values,path,constraint", BAD_VALUES, ids=[b[1] + ":" + str(i) for i, b in enumerate(BAD_VALUES)])
def test_bad_values_are_refused_by_the_schema(chart, values, path, constraint):
    with pytest.raises(helm.HelmValuesError) as schema_error:
        chart.validate_schema(values)
    message = str(schema_error.value)
    assert f"at '{path}" in message or path in message, message
    assert constraint in message, message
    # An install stops on the same message before rendering anything.
    with pytest.raises(helm.HelmValuesError) as render_error:
        chart.render(values, name="trellis", namespace=NAMESPACE)
    assert "values don't meet the specifications of the schema" in str(render_error.value)
    assert path in str(render_error.value)


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_good_values_pass_the_schema(chart, name):
    chart.validate_schema(VALUE_SETS[name])


def test_schema_accepts_the_defaults_and_lists_every_value(chart):
    chart.validate_schema({})
    schema = chart.schema
    assert schema is not None and schema["additionalProperties"] is False

    def walk(values: dict, node: dict, path: str):
        for key, value in values.items():
            assert key in node.get("properties", {}), f"values.yaml has {path}{key}, the schema does not"
            child = node["properties"][key]
            if isinstance(value, dict) and child.get("properties"):
                walk(value, child, f"{path}{key}.")

    walk(chart.values, schema, "")


def render_error(chart, values) -> str:
    with pytest.raises(helm.HelmError) as error:
        chart.render(values, name="trellis", namespace=NAMESPACE)
    return str(error.value)


def test_installing_gateway_api_crds_explains_where_to_get_them(chart):
    message = render_error(chart, {"gatewayAPI": {"installCRDs": True}})
    assert "this chart does not ship the Gateway API CRDs" in message
    assert "v1.5 or v1.6" in message
    assert "experimental-install.yaml" in message
    assert "gatewayAPI.installCRDs=false" in message


@pytest.mark.parametrize("component", ["controller", "identity", "injector", "proxy"])
def test_latest_tags_are_refused(chart, component):
    message = render_error(chart, {component: {"image": {"tag": "latest"}}})
    assert f"{component}.image.tag=latest: pin a release tag such as v0.1.0" in message


@pytest.mark.parametrize("request_,limit,refused", [
    ("1Gi", "256Mi", True),
    ("257Mi", "256Mi", True),
    ("268435457", "256Mi", True),
    ("256Mi", "256Mi", False),
    ("250M", "256Mi", False),
    ("1G", "1Gi", False),
])
def test_proxy_memory_request_above_its_limit_is_refused(chart, request_, limit, refused):
    values = {"proxy": {"resources": {"requests": {"memory": request_}, "limits": {"memory": limit}}}}
    if refused:
        message = render_error(chart, values)
        assert f"proxy.resources.requests.memory ({request_}) is above proxy.resources.limits.memory ({limit})" in message
    else:
        chart.render(values, name="trellis", namespace=NAMESPACE)


def test_ca_bundle_without_an_existing_certificate_is_refused(chart):
    message = render_error(chart, {"injector": {"webhook": {"caBundle": "Zm9v"}}})
    assert "injector.webhook.caBundle is only for injector.tls.existingSecret" in message


def lint_errors(values=None, **options) -> list[str]:
    report = helm.lint(CHART_DIR, values, namespace=NAMESPACE, strict=True, **options)
    return [m["error"] for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def test_lint_passes_with_the_defaults():
    assert lint_errors() == []


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_passes_with_every_value_set(name):
    assert lint_errors(VALUE_SETS[name]) == []


def test_lint_reports_bad_values():
    errors = lint_errors({"controller": {"replicas": -1}})
    assert any("/controller/replicas" in e for e in errors), errors


def test_chart_metadata(chart):
    meta = chart.metadata
    assert meta["name"] == "trellis"
    assert meta["apiVersion"] == "v2"
    assert meta["kubeVersion"] == ">=1.25.0-0"
    assert chart.crds == [], "the chart must not install CRDs"


# `fail` in lint mode is logged by Helm's Go code on the process' stderr instead of
# raised, and render() has no Kubernetes version option: lint in a child process, with
# a cluster version, and read that log.
LINT_AT_VERSION = textwrap.dedent("""
    import json, sys
    import helm_python as helm
    report = helm.lint(sys.argv[1], json.loads(sys.argv[2]), namespace="trellis-system",
                       kube_version=sys.argv[3])
    print(json.dumps(report))
""")


def lint_log(values: dict, kube_version: str) -> str:
    import json
    done = subprocess.run(
        [sys.executable, "-c", LINT_AT_VERSION, str(CHART_DIR), json.dumps(values), kube_version],
        capture_output=True, text=True, timeout=120, check=True)
    return done.stderr


NATIVE_NEEDS_129 = "proxy.sidecarMode=native needs Kubernetes 1.29 or later"


def test_native_sidecars_are_refused_before_kubernetes_1_29():
    log = lint_log({}, "v1.28.9")
    assert NATIVE_NEEDS_129 in log and "set proxy.sidecarMode=classic" in log, log


@pytest.mark.parametrize("values,version", [
    ({}, "v1.29.0"),
    ({}, "v1.33.1"),
    ({"proxy": {"sidecarMode": "classic"}}, "v1.28.9"),
    ({"proxy": {"sidecarMode": "classic"}}, "v1.25.0"),
])
def test_native_and_classic_where_they_work(values, version):
    assert NATIVE_NEEDS_129 not in lint_log(values, version)
