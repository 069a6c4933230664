"""Grafana dashboards and Prometheus alerts (monitoring.dashboards, monitoring.alerts): off by
default, rendered when asked, and every query in them parses and names only metrics the
project exports (read from the Rust sources, see exported_metrics.py)."""

from __future__ import annotations

import json
import re

import pytest

from conftest import CHART_DIR, REPO, VALUE_SETS, deep_merge
from exported_metrics import exported_metric_families, exported_metric_names
from promql import PromQLError, grafana_variable_query, metric_names

DASHBOARDS = ("routes", "backends", "control-plane")
ALERTS = {
    "TrellisRouteSuccessRateLow", "TrellisWorkloadCertificateExpiring",
    "TrellisIssuerCertificateExpiring", "TrellisControllerNotReady", "TrellisInjectorErrors",
}
# Series of other exporters the alerts read (kube-state-metrics), and Prometheus' own.
FOREIGN_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_spec_replicas", "up"}
ON = VALUE_SETS["dashboards-alerts"]


def dashboard_configmaps(rendered) -> dict[str, dict]:
    return {cm["metadata"]["name"]: cm for cm in rendered.of_kind("ConfigMap")
            if cm["metadata"]["name"].startswith("trellis-dashboard-")}


def dashboards(rendered) -> dict[str, dict]:
    out = {}
    for name, cm in dashboard_configmaps(rendered).items():
        ((key, text),) = cm["data"].items()
        out[key] = json.loads(text)
    return out


def dashboard_queries(dashboard: dict) -> list[str]:
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(grafana_variable_query(query["query"] if isinstance(query, dict) else query))
    return queries


def alert_rules(rendered) -> list[dict]:
    return [rule for pr in rendered.of_kind("PrometheusRule")
            for group in pr["spec"]["groups"] for rule in group["rules"]]


def all_queries(rendered) -> list[tuple[str, str]]:
    out = [(f"dashboard {key}", q) for key, d in dashboards(rendered).items() for q in dashboard_queries(d)]
    out += [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules(rendered)]
    return out


def test_dashboards_and_alerts_are_off_by_default(default):
    assert dashboard_configmaps(default) == {}
    assert default.of_kind("PrometheusRule") == []
    assert default.values["monitoring"]["dashboards"]["enabled"] is False
    assert default.values["monitoring"]["alerts"]["enabled"] is False


def test_each_option_renders_only_its_own_objects(render):
    only_dashboards = render({"monitoring": {"dashboards": {"enabled": True}}})
    assert len(dashboard_configmaps(only_dashboards)) == 3
    assert only_dashboards.of_kind("PrometheusRule") == []
    only_alerts = render({"monitoring": {"alerts": {"enabled": True}}})
    assert dashboard_configmaps(only_alerts) == {}
    assert len(only_alerts.of_kind("PrometheusRule")) == 1


def test_one_configmap_per_dashboard_for_the_grafana_sidecar(render, namespace):
    rendered = render(ON, namespace)
    cms = dashboard_configmaps(rendered)
    assert sorted(cms) == sorted(f"trellis-dashboard-{d}" for d in DASHBOARDS)
    for name, cm in cms.items():
        assert cm["metadata"]["namespace"] == namespace
        labels = cm["metadata"]["labels"]
        assert labels["grafana_dashboard"] == "1"
        assert labels["release"] == "prom"
        assert labels["app.kubernetes.io/part-of"] == "trellis"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Trellis"}
        assert list(cm["data"]) == [f"trellis-{name.removeprefix('trellis-dashboard-')}.json"]


@pytest.mark.parametrize("name", DASHBOARDS)
def test_dashboard_is_the_file_of_the_chart(render, name):
    shipped = json.loads((CHART_DIR / "dashboards" / f"{name}.json").read_text())
    assert dashboards(render(ON))[f"trellis-{name}.json"] == shipped


def test_dashboards_are_grafana_dashboards(render):
    seen_uids = set()
    for key, dashboard in dashboards(render(ON)).items():
        assert dashboard["uid"] not in seen_uids and len(dashboard["uid"]) <= 40, key
        seen_uids.add(dashboard["uid"])
        assert dashboard["title"].startswith("Trellis / "), key
        assert "trellis" in dashboard["tags"]
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)) >= 6, key
        for panel in dashboard["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                # Every $variable a query uses is defined (Grafana's own start with $__).
                for used in re.findall(r"\$(\w+)", target["expr"]):
                    assert used.startswith("__") or used in variables, (key, panel["title"], used)
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboards_cover_routes_backends_and_the_control_plane(render):
    names = {key: set().union(*(metric_names(q) for q in dashboard_queries(d)))
             for key, d in dashboards(render(ON)).items()}
    assert {"trellis_requests_total", "trellis_request_duration_seconds_bucket"} <= names["trellis-routes.json"]
    routes = json.dumps(dashboards(render(ON))["trellis-routes.json"])
    for needed in ("histogram_quantile(0.5,", "histogram_quantile(0.99,", 'status!~\\"5..\\"',
                   "parent, route, rule, backend"):
        assert needed in routes, needed
    assert {"trellis_retries_total", "trellis_timeouts_total", "trellis_endpoint_ejections_total",
            "trellis_mirrors_total", "trellis_proxy_errors_total"} <= names["trellis-backends.json"]
    assert {"trellis_discovery_connected", "trellis_controller_discovery_streams",
            "trellis_identity_certificates_issued_total", "trellis_identity_certify_rejected_total",
            "trellis_injector_admission_requests_total",
            "trellis_identity_certificate_expiry_timestamp_seconds"} <= names["trellis-control-plane.json"]


def test_prometheus_rule_has_the_alerts(render, namespace):
    rendered = render(ON, namespace)
    (rule,) = rendered.of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == namespace
    assert rule["metadata"]["labels"]["release"] == "prom"
    rules = {r["alert"]: r for r in alert_rules(rendered)}
    assert set(rules) == ALERTS
    for name, r in rules.items():
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name
    not_ready = rules["TrellisControllerNotReady"]["expr"]
    assert f'namespace="{namespace}",deployment="trellis-controller"' in not_ready


def test_alert_thresholds_come_from_the_values(render):
    custom = deep_merge(ON, {"monitoring": {"alerts": {
        "routeSuccessRate": {"threshold": 0.999, "minRequestRate": 2, "for": "3m"},
        "certificateExpiry": {"workloadSeconds": 7200, "issuerSeconds": 2592000},
        "controllerNotReady": {"for": "90s"},
        "injectorErrors": {"rate": 0.5, "for": "1m"},
    }}})
    rules = {r["alert"]: r for r in alert_rules(render(custom))}
    success = rules["TrellisRouteSuccessRateLow"]
    assert ") < 0.999\n" in success["expr"] and success["expr"].endswith(">= 2")
    assert success["for"] == "3m"
    assert rules["TrellisWorkloadCertificateExpiring"]["expr"].endswith("- time() < 7200")
    assert "trellis_identity_certificate_expiry_timestamp_seconds" in rules["TrellisWorkloadCertificateExpiring"]["expr"]
    assert rules["TrellisIssuerCertificateExpiring"]["expr"].endswith("- time() < 2592000")
    assert rules["TrellisControllerNotReady"]["for"] == "90s"
    assert rules["TrellisInjectorErrors"]["expr"].endswith(") > 0.5")
    assert 'outcome="error"' in rules["TrellisInjectorErrors"]["expr"]
    assert rules["TrellisInjectorErrors"]["for"] == "1m"
    defaults = {r["alert"]: r for r in alert_rules(render(ON))}
    assert defaults["TrellisRouteSuccessRateLow"]["expr"].count("< 0.95\n") == 1
    assert defaults["TrellisWorkloadCertificateExpiring"]["expr"].endswith("< 3600")
    assert defaults["TrellisIssuerCertificateExpiring"]["expr"].endswith("< 1209600")


def test_alert_annotations_keep_prometheus_templates(render):
    rules = {r["alert"]: r for r in alert_rules(render(ON))}
    assert "{{ $labels.route }}" in rules["TrellisRouteSuccessRateLow"]["annotations"]["summary"]
    assert "{{ $value | humanizeDuration }}" in rules["TrellisWorkloadCertificateExpiring"]["annotations"]["description"]


def test_every_query_parses_and_names_an_exported_metric(render):
    exported = exported_metric_names()
    queries = all_queries(render(ON))
    assert len(queries) >= 30
    named = set()
    for where, query in queries:
        try:
            names = metric_names(query)
        except PromQLError as error:
            pytest.fail(f"{where}: {error}")
        assert names, f"{where}: {query!r} selects no metric"
        ours = {n for n in names if n.startswith("trellis_")}
        assert ours <= exported, f"{where}: {sorted(ours - exported)} are not exported by Trellis"
        assert names - ours <= FOREIGN_METRICS, f"{where}: unexpected metrics {sorted(names - ours)}"
        named |= ours
    assert len(named) >= 20


def test_exported_metrics_are_read_from_the_sources():
    families = exported_metric_families()
    assert families["trellis_requests"] == "counter"
    assert families["trellis_request_duration_seconds"] == "histogram"
    assert families["trellis_discovery_last_update_timestamp_seconds"] == "gauge"  # register_with_unit
    assert families["trellis_controller_discovery_streams"] == "gauge"  # a registry prefix
    assert families["trellis_identity_certificate_valid"] == "gauge"  # a collector
    names = exported_metric_names()
    assert {"trellis_requests_total", "trellis_request_duration_seconds_bucket",
            "trellis_request_duration_seconds_sum", "trellis_request_duration_seconds_count"} <= names
    assert "trellis_requests" not in names and "trellis_retries_bucket" not in names


def test_every_documented_metric_is_found_in_the_sources():
    # The reference pages list every metric: the scan of the sources must find them all,
    # or it would pass queries against a smaller set than the project exports.
    documented = set()
    for page in ("proxy-metrics", "controller", "identity", "injector"):
        text = (REPO / "docs" / "reference" / f"{page}.md").read_text()
        documented |= set(re.findall(r"^\| `(trellis_[a-z0-9_]+)`", text, re.M))
    assert len(documented) >= 30
    families = exported_metric_families()
    missing = {n for n in documented if n not in exported_metric_names() and n not in families}
    assert not missing, f"documented but not found in the sources: {sorted(missing)}"


@pytest.mark.parametrize("query,names", [
    ('sum by (a) (rate(x_total{a="1",b=~"2|3"}[5m])) / on (a) group_left (c) y', {"x_total", "y"}),
    ('histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))', {"h_bucket"}),
    ('-(m > 0) - time() < 3600 and {__name__="n"} offset 1h', {"m", "n"}),
    ('count(up == bool 0) or vector(0)', {"up"}),
    ('max_over_time(g[1h:5m])', {"g"}),
])
def test_promql_parser_finds_the_metrics(query, names):
    assert metric_names(query) == names


@pytest.mark.parametrize("query", [
    'sum(rate(x[5m])',
    'rate(x[5m]))',
    'x{a="1"',
    'x{a=1}',
    'x{a=="1"}',
    'rates(x[5m])',
    'sum by (a (x)',
    'x +',
    'x[5 m]',
])
def test_promql_parser_refuses_malformed_queries(query):
    with pytest.raises(PromQLError):
        metric_names(query)
