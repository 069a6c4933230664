"""Least privilege: each component gets exactly the verbs its reference documents, bound to
its own service account only."""

from __future__ import annotations

import re

import pytest
import yaml

from conftest import COMPONENTS, REPO, VALUE_SETS

# (apiGroup, resource, verb, resourceName or None), for a ClusterRole or a Role.
WATCH = ("get", "list", "watch")


def grants(api_group: str, resources, verbs, names=(None,)) -> set[tuple]:
    return {(api_group, r, v, n) for r in resources for v in verbs for n in names}


CONTROLLER_CLUSTER = (
    grants("", ["services", "pods"], ["list", "watch"])
    | grants("discovery.k8s.io", ["endpointslices"], ["list", "watch"])
    | grants("gateway.networking.k8s.io", ["httproutes", "grpcroutes"], WATCH)
    | grants("gateway.networking.k8s.io", ["httproutes/status", "grpcroutes/status"], ["patch"])
)
CONTROLLER_NAMESPACE = (
    grants("coordination.k8s.io", ["leases"], ["get", "update"], ["trellis-controller"])
    | grants("coordination.k8s.io", ["leases"], ["create"])
)

IDENTITY_CLUSTER = grants("authentication.k8s.io", ["tokenreviews"], ["create"])


def identity_namespace(secret: str, bootstrap: bool) -> set[tuple]:
    out = grants("", ["secrets"], ["get"], [secret])
    if bootstrap:
        out |= grants("", ["secrets"], ["create"])
    return out


INJECTOR_CLUSTER = grants("admissionregistration.k8s.io", ["mutatingwebhookconfigurations"],
                          ["get", "patch"], ["trellis-injector"])
INJECTOR_NAMESPACE = (
    grants("", ["secrets"], ["get", "update"], ["trellis-injector-tls"])
    | grants("", ["secrets"], ["create"])
)


def expand(role: dict | None) -> set[tuple]:
    if role is None:
        return set()
    out = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames") or [None]:
                        out.add((group, resource, verb, name))
    return out


def roles(rendered, component: str) -> tuple[set, set]:
    name = f"trellis-{component}"
    return expand(rendered.find("ClusterRole", name)), expand(rendered.find("Role", name))


def test_controller_rights(any_render):
    assert roles(any_render, "controller") == (CONTROLLER_CLUSTER, CONTROLLER_NAMESPACE)


def test_identity_rights(any_render):
    external = any_render.values["identity"]["externalIssuer"]
    secret = external["secretName"] if external["enabled"] else "trellis-identity-issuer"
    assert roles(any_render, "identity") == (
        IDENTITY_CLUSTER, identity_namespace(secret, bootstrap=not external["enabled"]))


def test_identity_with_an_external_issuer_cannot_create_secrets(render):
    cluster, namespaced = roles(render(VALUE_SETS["external-issuer"]), "identity")
    assert namespaced == {("", "secrets", "get", "mesh-issuer")}


def test_injector_rights(any_render):
    if any_render.values["injector"]["tls"]["existingSecret"]:
        # Files from the Secret volume; the caBundle is someone else's: no API rights at all.
        assert roles(any_render, "injector") == (set(), set())
        assert any_render.find("ClusterRoleBinding", "trellis-injector") is None
        assert any_render.find("RoleBinding", "trellis-injector") is None
    else:
        assert roles(any_render, "injector") == (INJECTOR_CLUSTER, INJECTOR_NAMESPACE)


def test_no_wildcards_and_no_escalation(any_render):
    for kind in ("ClusterRole", "Role"):
        for role in any_render.of_kind(kind):
            for group, resource, verb, _ in expand(role):
                assert "*" not in (group, resource, verb), role["metadata"]["name"]
                assert verb not in ("escalate", "bind", "impersonate", "delete", "deletecollection")
                assert not (resource == "secrets" and verb in ("list", "watch")), \
                    f"{role['metadata']['name']} could read every Secret"


def test_no_cluster_wide_secret_access(any_render):
    for role in any_render.of_kind("ClusterRole"):
        assert not any(r == "secrets" for _, r, _, _ in expand(role)), role["metadata"]["name"]


def test_bindings_bind_each_role_to_its_own_service_account(any_render):
    ns = any_render.namespace
    for component in COMPONENTS:
        name = f"trellis-{component}"
        assert any_render.get("ServiceAccount", name)["metadata"]["namespace"] == ns
        assert any_render.pod_spec(component)["serviceAccountName"] == name
        for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            binding = any_render.find(binding_kind, name)
            role = any_render.find(role_kind, name)
            assert (binding is None) == (role is None), f"{binding_kind} {name} without its {role_kind}"
            if binding is None:
                continue
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name}
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
            if binding_kind == "RoleBinding":
                assert binding["metadata"]["namespace"] == role["metadata"]["namespace"] == ns


# --- the chart against the components' references -----------------------------------------

def rbac_blocks(doc: str) -> list[str]:
    """The YAML blocks of a reference's RBAC section."""
    text = (REPO / "docs" / "reference" / doc).read_text()
    match = re.search(r"^#+ RBAC\n(.*?)(?=^#+ )", text, flags=re.M | re.S)
    if not match:
        pytest.skip(f"docs/reference/{doc} has no RBAC section")
    return re.findall(r"```yaml\n(.*?)```", match.group(1), flags=re.S)


def documented_roles(block: str) -> tuple[set, set]:
    cluster, namespaced = set(), set()
    for obj in yaml.safe_load_all(block):
        if isinstance(obj, dict) and obj.get("kind") == "ClusterRole":
            cluster |= expand(obj)
        elif isinstance(obj, dict) and obj.get("kind") == "Role":
            namespaced |= expand(obj)
    return cluster, namespaced


def test_controller_rights_are_its_reference(default):
    (block,) = [b for b in rbac_blocks("controller.md") if "kind: ClusterRole" in b]
    assert roles(default, "controller") == documented_roles(block)


def test_identity_rights_are_its_reference(default):
    blocks = rbac_blocks("identity.md")
    serve = documented_roles(blocks[0])
    bootstrap_rules = expand({"rules": yaml.safe_load(blocks[1])})
    cluster, namespaced = roles(default, "identity")
    assert cluster == serve[0]
    # serve's rights, and of bootstrap's only create: the chart never runs --renew-issuer,
    # the one thing that needs update.
    assert namespaced == serve[1] | {("", "secrets", "create", None)}
    assert namespaced <= serve[1] | bootstrap_rules
    assert ("", "secrets", "update", "trellis-identity-issuer") in bootstrap_rules - namespaced
