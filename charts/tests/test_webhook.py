"""The MutatingWebhookConfiguration: which pods reach the injector, and how the API server
calls it."""

from __future__ import annotations

import pytest

from conftest import NAMESPACE, OTHER_NAMESPACE, VALUE_SETS, WEBHOOK_PORT


def webhook(rendered) -> dict:
    config = rendered.get("MutatingWebhookConfiguration", "trellis-injector")
    (hook,) = config["webhooks"]
    return hook


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A namespaceSelector applied to a namespace's labels, as the API server does."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and not (present and value in expr["values"]):
            return False
        if op == "NotIn" and present and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def namespace_labels(name: str, inject: bool) -> dict[str, str]:
    labels = {"kubernetes.io/metadata.name": name}
    if inject:
        labels["trellis.dev/inject"] = "enabled"
    return labels


def test_webhook_asks_for_pod_creations_only(any_render):
    hook = webhook(any_render)
    assert hook["name"] == "inject.trellis.dev"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["rules"] == [{
        "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
        "resources": ["pods"], "scope": "Namespaced",
    }]
    assert "objectSelector" not in hook


def test_webhook_calls_the_injector_service(any_render):
    hook = webhook(any_render)
    service = hook["clientConfig"]["service"]
    assert service == {"name": "trellis-injector", "namespace": any_render.namespace,
                       "path": "/inject", "port": 443}
    svc = any_render.get("Service", "trellis-injector")
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == 443]
    (container_port,) = [p for p in any_render.container("injector")["ports"] if p["name"] == port["targetPort"]]
    assert container_port["containerPort"] == WEBHOOK_PORT


def test_namespace_selector_is_the_label_minus_the_control_plane(any_render):
    selector = webhook(any_render)["namespaceSelector"]
    ns = any_render.namespace
    assert selector["matchLabels"] == {"trellis.dev/inject": "enabled"}
    assert selector["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns]}]
    # What the API server would send to the injector:
    assert selects(selector, namespace_labels("shop", inject=True))
    assert not selects(selector, namespace_labels("shop", inject=False))
    assert not selects(selector, {"kubernetes.io/metadata.name": "shop", "trellis.dev/inject": "disabled"})
    assert not selects(selector, namespace_labels(ns, inject=True)), "the control plane must never be injected"
    assert not selects(selector, namespace_labels(ns, inject=False))


@pytest.mark.parametrize("ns", [NAMESPACE, OTHER_NAMESPACE, "trellis"])
def test_excluded_namespace_is_the_release_namespace(render, ns):
    selector = webhook(render({}, ns))["namespaceSelector"]
    assert selector["matchExpressions"][0]["values"] == [ns]


def test_failure_policy_defaults_to_fail(default):
    hook = webhook(default)
    assert hook["failurePolicy"] == "Fail"
    assert hook["timeoutSeconds"] == 10


def test_failure_policy_and_timeout_are_values(render):
    hook = webhook(render({"injector": {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 3}}}))
    assert hook["failurePolicy"] == "Ignore"
    assert hook["timeoutSeconds"] == 3


def test_ca_bundle_is_left_to_the_injector_by_default(default):
    assert "caBundle" not in webhook(default)["clientConfig"]


def test_ca_bundle_and_annotations_for_an_existing_certificate(render):
    hook = webhook(render(VALUE_SETS["existing-tls-cabundle"]))
    assert hook["clientConfig"]["caBundle"] == "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg=="
    config = render(VALUE_SETS["existing-tls"]).get("MutatingWebhookConfiguration", "trellis-injector")
    assert config["metadata"]["annotations"] == {"cert-manager.io/inject-ca-from": "trellis-system/injector"}
