"""What the chart renders: objects, names, labels and selectors, ports, probes, security
contexts, images, the identity bootstrap and the trust anchors, the components' arguments."""

from __future__ import annotations

import posixpath

import pytest

from conftest import (
    ADMIN_PORT,
    COMPONENTS,
    DISCOVERY_PORT,
    IDENTITY_PORT,
    NAMESPACE,
    OTHER_NAMESPACE,
    VALUE_SETS,
    WEBHOOK_PORT,
    args_map,
)

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}

DEFAULT_OBJECTS = {
    ("ServiceAccount", "trellis-controller"),
    ("ClusterRole", "trellis-controller"),
    ("ClusterRoleBinding", "trellis-controller"),
    ("Role", "trellis-controller"),
    ("RoleBinding", "trellis-controller"),
    ("Service", "trellis-controller"),
    ("Deployment", "trellis-controller"),
    ("ServiceAccount", "trellis-identity"),
    ("ClusterRole", "trellis-identity"),
    ("ClusterRoleBinding", "trellis-identity"),
    ("Role", "trellis-identity"),
    ("RoleBinding", "trellis-identity"),
    ("Service", "trellis-identity"),
    ("Deployment", "trellis-identity"),
    ("ServiceAccount", "trellis-injector"),
    ("ClusterRole", "trellis-injector"),
    ("ClusterRoleBinding", "trellis-injector"),
    ("Role", "trellis-injector"),
    ("RoleBinding", "trellis-injector"),
    ("Service", "trellis-injector"),
    ("Deployment", "trellis-injector"),
    ("MutatingWebhookConfiguration", "trellis-injector"),
}

# containerPort by port name, per component (ARCHITECTURE.md).
CONTAINER_PORTS = {
    "controller": {"discovery": DISCOVERY_PORT, "admin": ADMIN_PORT},
    "identity": {"certify": IDENTITY_PORT, "admin": ADMIN_PORT},
    "injector": {"webhook": WEBHOOK_PORT, "admin": ADMIN_PORT},
}
# Service port by port name.
SERVICE_PORTS = {
    "controller": {"discovery": DISCOVERY_PORT, "admin": ADMIN_PORT},
    "identity": {"certify": IDENTITY_PORT, "admin": ADMIN_PORT},
    "injector": {"webhook": 443, "admin": ADMIN_PORT},
}

TRUST_ANCHORS_FILE = "/var/run/trellis/trust-anchors/ca.crt"
TOKEN_PATH = "/var/run/secrets/trellis.dev/identity/token"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def resolve_port(container: dict, port) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p["name"] == port:
            return p["containerPort"]
    raise AssertionError(f"{container['name']}: no port named {port!r}")


def all_containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


# --- objects and names ------------------------------------------------------------------

def test_default_objects_are_exactly_the_control_plane(default):
    assert default.kinds_and_names() == DEFAULT_OBJECTS


def test_no_object_is_rendered_twice(any_render):
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in any_render.objects]
    assert len(keys) == len(set(keys)), keys


def test_namespaced_objects_live_in_the_release_namespace(any_render):
    for o in any_render.objects:
        meta = o["metadata"]
        if o["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, f"{o['kind']} {meta['name']} is cluster-scoped"
        else:
            assert meta.get("namespace") == any_render.namespace, (o["kind"], meta["name"])


def test_every_object_carries_the_chart_labels(any_render):
    for o in any_render.objects:
        labels = o["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "trellis", (o["kind"], o["metadata"]["name"])
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert labels.get("app.kubernetes.io/instance") == "trellis"


def test_pod_disruption_budgets_only_above_one_replica(any_render):
    for component in COMPONENTS:
        replicas = any_render.values[component]["replicas"]
        pdb = any_render.find("PodDisruptionBudget", f"trellis-{component}")
        assert any_render.deployment(component)["spec"]["replicas"] == replicas
        if replicas > 1:
            assert pdb is not None, f"{component}: {replicas} replicas and no PodDisruptionBudget"
            assert pdb["spec"] == {
                "maxUnavailable": 1,
                "selector": any_render.deployment(component)["spec"]["selector"],
            }
        else:
            assert pdb is None, f"{component}: a PodDisruptionBudget for a single replica blocks node drains"


def test_ha_overlay_runs_three_of_everything_on_separate_nodes(render):
    ha = render(VALUE_SETS["ha"])
    for component in COMPONENTS:
        assert ha.deployment(component)["spec"]["replicas"] == 3
        assert ha.find("PodDisruptionBudget", f"trellis-{component}") is not None
        anti = ha.pod_spec(component)["affinity"]["podAntiAffinity"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" in anti


def test_rolling_updates_never_wait_for_a_node_that_cannot_come(any_render):
    required = any_render.values["podAntiAffinity"] == "required"
    for component in COMPONENTS:
        strategy = any_render.deployment(component)["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        if required:
            # As many nodes as replicas: a surge pod could never be scheduled.
            assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        else:
            # The new pod is ready before an old one stops: the webhook never has a gap.
            assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


# --- labels and selectors -----------------------------------------------------------------

def test_selectors_match_their_own_pods_only(any_render):
    pods = {c: any_render.deployment(c)["spec"]["template"]["metadata"]["labels"] for c in COMPONENTS}
    for component in COMPONENTS:
        deployment = any_render.deployment(component)
        selector = deployment["spec"]["selector"]["matchLabels"]
        selectors = {
            "Deployment": selector,
            "Service": any_render.get("Service", f"trellis-{component}")["spec"]["selector"],
        }
        pdb = any_render.find("PodDisruptionBudget", f"trellis-{component}")
        if pdb:
            selectors["PodDisruptionBudget"] = pdb["spec"]["selector"]["matchLabels"]
        for kind, sel in selectors.items():
            assert sel, f"{kind} trellis-{component} has an empty selector"
            for other, labels in pods.items():
                assert matches(sel, labels) == (other == component), (
                    f"{kind} trellis-{component} selector {sel} vs pods of {other} {labels}")


def test_pod_labels_cannot_override_selector_labels(render):
    rendered = render({"controller": {"podLabels": {"app.kubernetes.io/name": "mine", "team": "a"}}})
    d = rendered.deployment("controller")
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "a"
    assert matches(d["spec"]["selector"]["matchLabels"], labels)


def test_anti_affinity_spreads_a_components_own_pods(any_render):
    mode = any_render.values["podAntiAffinity"]
    for component in COMPONENTS:
        spec = any_render.pod_spec(component)
        own = any_render.values[component].get("affinity")
        if own:
            assert spec["affinity"] == own
            continue
        if mode == "none":
            assert "affinity" not in spec
            continue
        anti = spec["affinity"]["podAntiAffinity"]
        if mode == "preferred":
            (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
            term = term["podAffinityTerm"]
        else:
            (term,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        pod_labels = any_render.deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert matches(term["labelSelector"]["matchLabels"], pod_labels)


# --- ports and probes ---------------------------------------------------------------------

def test_container_ports_are_the_architecture_ports(any_render):
    for component, expected in CONTAINER_PORTS.items():
        ports = any_render.container(component)["ports"]
        assert {p["name"]: p["containerPort"] for p in ports} == expected
        assert all(p["protocol"] == "TCP" for p in ports)


def test_service_ports_reach_the_container_ports(any_render):
    for component, expected in SERVICE_PORTS.items():
        service = any_render.get("Service", f"trellis-{component}")
        assert service["spec"]["type"] == "ClusterIP"
        ports = service["spec"]["ports"]
        assert {p["name"]: p["port"] for p in ports} == expected
        container = any_render.container(component)
        for p in ports:
            target = resolve_port(container, p["targetPort"])
            assert target == CONTAINER_PORTS[component][p["name"]]


def test_admin_port_is_named_admin_for_scraping(any_render):
    for component in COMPONENTS:
        service = any_render.get("Service", f"trellis-{component}")
        admin = [p for p in service["spec"]["ports"] if p["name"] == "admin"]
        assert admin and admin[0]["port"] == ADMIN_PORT


def test_probes_use_the_admin_port(any_render):
    for component in COMPONENTS:
        container = any_render.container(component)
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert live["httpGet"]["path"] == "/live"
        assert ready["httpGet"]["path"] == "/ready"
        for probe in (live, ready):
            assert resolve_port(container, probe["httpGet"]["port"]) == ADMIN_PORT
            assert probe["periodSeconds"] > 0 and probe["failureThreshold"] >= 1


# --- security -----------------------------------------------------------------------------

def test_pods_meet_the_restricted_pod_security_standard(any_render):
    for name, template in any_render.pod_templates():
        spec = template["spec"]
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod_sc.get("runAsUser", 1) != 0
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, f"{name}: hostPath volume {volume['name']}"
        for c in all_containers(spec):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert "ports" not in c or all("hostPort" not in p for p in c["ports"]), where


def test_api_credentials_only_where_the_api_is_used(render):
    assert render().pod_spec("injector")["automountServiceAccountToken"] is True
    own_tls = render(VALUE_SETS["existing-tls"])
    assert own_tls.pod_spec("injector")["automountServiceAccountToken"] is False
    for component in ("controller", "identity"):
        assert own_tls.pod_spec(component)["automountServiceAccountToken"] is True


def test_every_container_has_resources(any_render):
    for name, template in any_render.pod_templates():
        for c in all_containers(template["spec"]):
            res = c["resources"]
            assert res["requests"]["cpu"] and res["requests"]["memory"], f"{name}/{c['name']}"
            assert res["limits"]["memory"], f"{name}/{c['name']}"


# --- images -------------------------------------------------------------------------------

def image_refs(rendered) -> list[tuple[str, str]]:
    refs = []
    for name, template in rendered.pod_templates():
        for c in all_containers(template["spec"]):
            refs.append((f"{name}/{c['name']}", c["image"]))
    refs.append(("proxy", args_map(rendered.container("injector"))["--proxy-image"]))
    return refs


def test_images_are_pinned_never_latest(any_render):
    for where, image in image_refs(any_render):
        repository, _, tag = image.rpartition(":")
        assert repository and "/" in repository and tag, f"{where}: {image} has no tag"
        assert tag != "latest" and not image.endswith(":latest"), f"{where}: {image}"


def test_default_images_are_tagged_with_the_app_version(chart, default):
    tag = "v" + chart.metadata["appVersion"]
    expected = {
        "trellis-controller/controller": f"ghcr.io/trellis-mesh/trellis-controller:{tag}",
        "trellis-identity/bootstrap": f"ghcr.io/trellis-mesh/trellis-identity:{tag}",
        "trellis-identity/identity": f"ghcr.io/trellis-mesh/trellis-identity:{tag}",
        "trellis-injector/injector": f"ghcr.io/trellis-mesh/trellis-injector:{tag}",
        "proxy": f"ghcr.io/trellis-mesh/trellis-proxy:{tag}",
    }
    assert dict(image_refs(default)) == expected
    for component in COMPONENTS:
        assert default.container(component)["imagePullPolicy"] == "IfNotPresent"


def test_image_values_are_used(render):
    custom = render(VALUE_SETS["custom"])
    assert custom.container("controller")["image"] == "registry.example.org/trellis/controller:v0.1.0-rc.1"
    assert custom.container("controller")["imagePullPolicy"] == "Always"
    assert args_map(custom.container("injector"))["--proxy-image"] == "registry.example.org/trellis/proxy:v0.1.0-rc.1"
    assert custom.pod_spec("controller")["imagePullSecrets"] == [{"name": "registry-creds"}]


# --- identity: bootstrap, issuer and trust anchors ----------------------------------------

def test_identity_bootstraps_the_issuer_secret_it_serves(any_render):
    ns = any_render.namespace
    spec = any_render.pod_spec("identity")
    serve = args_map(any_render.container("identity"))
    if any_render.values["identity"]["externalIssuer"]["enabled"]:
        secret = any_render.values["identity"]["externalIssuer"]["secretName"]
        assert "initContainers" not in spec, "no bootstrap with an external issuer"
    else:
        secret = "trellis-identity-issuer"
        (init,) = spec["initContainers"]
        assert init["name"] == "bootstrap"
        assert init["image"] == any_render.container("identity")["image"]
        assert init["args"][0] == "bootstrap"
        boot = args_map(init)
        assert boot == {
            "--issuer-secret": f"{ns}/{secret}",
            "--trust-domain": any_render.values["trustDomain"],
            "--issuer-lifetime": any_render.values["identity"]["bootstrap"]["issuerLifetime"],
            "--root-lifetime": any_render.values["identity"]["bootstrap"]["rootLifetime"],
            "--log-level": any_render.values["identity"]["logLevel"] or any_render.values["logLevel"],
        }
    assert serve["--issuer-secret"] == f"{ns}/{secret}"


def test_trust_anchors_are_only_the_ca_crt_of_the_issuer_secret(any_render):
    identity = any_render.values["identity"]
    secret = identity["externalIssuer"]["secretName"] if identity["externalIssuer"]["enabled"] \
        else "trellis-identity-issuer"
    flags = {"controller": "--trust-anchors", "injector": "--trust-anchors-file"}
    for component, flag in flags.items():
        spec = any_render.pod_spec(component)
        container = any_render.container(component)
        (volume,) = [v for v in spec["volumes"] if v["name"] == "trust-anchors"]
        assert volume == {"name": "trust-anchors", "projected": {"sources": [
            {"secret": {"name": secret, "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "trust-anchors"]
        assert mount["readOnly"] is True
        path = args_map(container)[flag]
        assert path == TRUST_ANCHORS_FILE == posixpath.join(mount["mountPath"], "ca.crt")
    # Nothing mounts the issuer Secret whole: only identity reads the key, through the API.
    for name, template in any_render.pod_templates():
        for v in template["spec"].get("volumes", []):
            assert v.get("secret", {}).get("secretName") != secret, f"{name} mounts the issuer key"


def test_controller_presents_a_projected_token_to_identity(any_render):
    spec = any_render.pod_spec("controller")
    container = any_render.container("controller")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "identity-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "identity.trellis.dev"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "identity-token"]
    args = args_map(container)
    assert args["--token-path"] == TOKEN_PATH == posixpath.join(mount["mountPath"], source["serviceAccountToken"]["path"])
    assert args["--service-account"] == spec["serviceAccountName"] == "trellis-controller"
    assert args["--namespace"] == any_render.namespace
    assert args["--identity-addr"] == f"trellis-identity.{any_render.namespace}.svc:{IDENTITY_PORT}"


def test_controller_replicas_name_themselves_in_the_lease(any_render):
    env = any_render.container("controller")["env"]
    assert env == [{"name": "TRELLIS_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]


# --- the components' command lines ----------------------------------------------------------

def test_default_command_lines(default):
    ns = NAMESPACE
    assert default.container("controller")["args"] == [
        "serve",
        "--kubernetes",
        "--trust-domain=cluster.local",
        "--cluster-domain=cluster.local",
        "--log-level=info",
        f"--identity-addr=trellis-identity.{ns}.svc:8080",
        f"--trust-anchors={TRUST_ANCHORS_FILE}",
        f"--token-path={TOKEN_PATH}",
        "--service-account=trellis-controller",
        f"--namespace={ns}",
    ]
    assert default.container("identity")["args"] == [
        "serve",
        f"--issuer-secret={ns}/trellis-identity-issuer",
        "--trust-domain=cluster.local",
        f"--namespace={ns}",
        "--service=trellis-identity",
        "--cert-lifetime=24h",
        "--reload-interval=30s",
        "--log-level=info",
    ]
    assert default.container("injector")["args"] == [
        "serve",
        f"--trust-anchors-file={TRUST_ANCHORS_FILE}",
        f"--namespace={ns}",
        f"--controller-addr=trellis-controller.{ns}.svc:8090",
        f"--identity-addr=trellis-identity.{ns}.svc:8080",
        "--trust-domain=cluster.local",
        "--proxy-image=ghcr.io/trellis-mesh/trellis-proxy:v0.1.0",
        "--sidecar-mode=native",
        "--proxy-log-level=info",
        "--proxy-access-log=off",
        "--proxy-trace-sampling=0",
        "--proxy-cpu-request=100m",
        "--proxy-memory-request=64Mi",
        "--proxy-memory-limit=256Mi",
        "--service=trellis-injector",
        "--webhook-configuration=trellis-injector",
        "--tls-secret=trellis-injector-tls",
        "--log-level=info",
    ]


def test_values_reach_the_command_lines(any_render):
    v = any_render.values
    ns = any_render.namespace
    controller = args_map(any_render.container("controller"))
    identity = args_map(any_render.container("identity"))
    injector = args_map(any_render.container("injector"))
    for args in (controller, identity, injector):
        assert args["--trust-domain"] == v["trustDomain"]
    assert controller["--cluster-domain"] == v["clusterDomain"]
    assert controller["--kubernetes"] is None
    for component, args in (("controller", controller), ("identity", identity), ("injector", injector)):
        assert args["--log-level"] == (v[component]["logLevel"] or v["logLevel"])
    assert identity["--namespace"] == ns
    assert identity["--service"] == "trellis-identity"
    assert identity["--cert-lifetime"] == v["identity"]["certLifetime"]
    assert identity["--reload-interval"] == v["identity"]["reloadInterval"]
    proxy = v["proxy"]
    assert injector["--namespace"] == ns
    assert injector["--controller-addr"] == f"trellis-controller.{ns}.svc:{DISCOVERY_PORT}"
    assert injector["--identity-addr"] == f"trellis-identity.{ns}.svc:{IDENTITY_PORT}"
    assert injector["--sidecar-mode"] == proxy["sidecarMode"]
    assert injector["--proxy-log-level"] == proxy["logLevel"]
    assert injector["--proxy-access-log"] == proxy["accessLog"]
    assert injector.get("--proxy-otlp-endpoint", "") == proxy["tracing"]["otlpEndpoint"]
    assert float(injector["--proxy-trace-sampling"]) == float(proxy["tracing"]["sampling"])
    assert injector["--proxy-cpu-request"] == proxy["resources"]["requests"]["cpu"]
    assert injector["--proxy-memory-request"] == proxy["resources"]["requests"]["memory"]
    assert injector["--proxy-memory-limit"] == proxy["resources"]["limits"]["memory"]
    assert injector["--service"] == "trellis-injector"
    assert injector["--webhook-configuration"] == "trellis-injector"


def test_injector_serves_an_existing_certificate_from_files(render):
    rendered = render(VALUE_SETS["existing-tls"])
    container = rendered.container("injector")
    args = args_map(container)
    assert "--tls-secret" not in args
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert args["--tls-cert-file"] == posixpath.join(mount["mountPath"], "tls.crt")
    assert args["--tls-key-file"] == posixpath.join(mount["mountPath"], "tls.key")
    (volume,) = [v for v in rendered.pod_spec("injector")["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "injector-serving-cert"


@pytest.mark.parametrize("namespace_", [NAMESPACE, OTHER_NAMESPACE])
def test_addresses_follow_the_release_namespace(render, namespace_):
    rendered = render({}, namespace_)
    text = "\n".join(rendered.manifests.values())
    other = OTHER_NAMESPACE if namespace_ == NAMESPACE else NAMESPACE
    assert other not in text, f"{other} appears in a render into {namespace_}"


# --- monitoring ----------------------------------------------------------------------------

def test_no_monitoring_objects_by_default(default):
    assert not default.of_kind("ServiceMonitor") and not default.of_kind("PodMonitor")


def test_service_monitor_scrapes_the_admin_port_of_the_three_services(render):
    rendered = render(VALUE_SETS["monitoring"])
    (sm,) = rendered.of_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {"port": "admin", "path": "/metrics", "interval": "15s"}
    selector = sm["spec"]["selector"]
    selected = []
    for service in rendered.of_kind("Service"):
        labels = service["metadata"]["labels"]
        ok = matches(selector["matchLabels"], labels) and all(
            labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])
        if ok:
            selected.append(service["metadata"]["name"])
            assert "admin" in [p["name"] for p in service["spec"]["ports"]]
    assert sorted(selected) == ["trellis-controller", "trellis-identity", "trellis-injector"]


def test_pod_monitor_scrapes_every_injected_proxy(render):
    (pm,) = render(VALUE_SETS["monitoring"]).of_kind("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert pm["spec"]["selector"] == {}
    # The injector names the proxy's admin port (4191) trellis-admin.
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "trellis-admin", "path": "/metrics", "interval": "1m"}]


# --- notes ---------------------------------------------------------------------------------

def test_notes_tell_how_to_mesh_a_namespace(default):
    assert "kubectl label namespace <namespace> trellis.dev/inject=enabled" in default.notes
    assert "Gateway API CRDs" in default.notes  # the offline render sees no HTTPRoute API
