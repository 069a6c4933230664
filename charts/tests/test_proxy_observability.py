"""The proxies' access log and tracing: chart values (proxy.accessLog, proxy.tracing) reach the
injector's command line, bad values are refused, and — with the built injector — the rendered
flags become the injected proxy's TRELLIS_ACCESS_LOG, TRELLIS_OTLP_ENDPOINT and
TRELLIS_TRACE_SAMPLING, variables trellis-proxy run reads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from conftest import NAMESPACE, REPO, args_map

BIN_DIR = Path(
    os.environ.get("TRELLIS_BIN_DIR")
    or Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug"
)
REQUIRED = os.environ.get("TRELLIS_CHART_TESTS_REQUIRE_BINARIES") == "1"
ENDPOINT = "http://otel-collector.observability:4318"


def injector_args(render, values) -> dict[str, str | None]:
    return args_map(render(values).container("injector"))


def test_defaults_leave_proxies_as_they_are(default):
    args = args_map(default.container("injector"))
    assert args["--proxy-access-log"] == "off"
    assert args["--proxy-trace-sampling"] == "0"
    # No endpoint: no flag at all (an empty --proxy-otlp-endpoint= would mean the same, but
    # the command line stays what a user would type).
    assert "--proxy-otlp-endpoint" not in args


@pytest.mark.parametrize("sampling,rendered", [(0.01, "0.01"), (1, "1"), (0.00001, "1e-05")])
def test_values_reach_the_injector(render, sampling, rendered):
    args = injector_args(render, {"proxy": {
        "accessLog": "json",
        "tracing": {"otlpEndpoint": ENDPOINT, "sampling": sampling},
    }})
    assert args["--proxy-access-log"] == "json"
    assert args["--proxy-otlp-endpoint"] == ENDPOINT
    assert args["--proxy-trace-sampling"] == rendered


def test_sampling_set_with_helm_set_is_a_string_and_passes(chart, render):
    # `helm --set proxy.tracing.sampling=0.01` gives the string "0.01" (only integers and
    # booleans are typed), so the schema takes a decimal string too.
    for text in ("0.01", "1", "0", ".5", "1.0"):
        chart.validate_schema({"proxy": {"tracing": {"sampling": text}}})
    args = injector_args(render, {"proxy": {"tracing": {"otlpEndpoint": ENDPOINT, "sampling": "0.25"}}})
    assert args["--proxy-trace-sampling"] == "0.25"


def test_sampling_alone_passes_no_endpoint(render):
    args = injector_args(render, {"proxy": {"tracing": {"sampling": 0.5}}})
    assert "--proxy-otlp-endpoint" not in args
    assert args["--proxy-trace-sampling"] == "0.5"


BAD = [
    # A bare `off` in a values file is YAML's false.
    ({"proxy": {"accessLog": False}}, "/proxy/accessLog", "want string"),
    ({"proxy": {"accessLog": "text"}}, "/proxy/accessLog", "json"),
    ({"proxy": {"tracing": {"otlpEndpoint": "otel-collector:4318"}}}, "/proxy/tracing/otlpEndpoint", "pattern"),
    ({"proxy": {"tracing": {"otlpEndpoint": "https://otel-collector:4318"}}}, "/proxy/tracing/otlpEndpoint", "pattern"),
    ({"proxy": {"tracing": {"otlpEndpoint": "http://"}}}, "/proxy/tracing/otlpEndpoint", "pattern"),
    ({"proxy": {"tracing": {"sampling": 5}}}, "/proxy/tracing/sampling", "maximum"),
    ({"proxy": {"tracing": {"sampling": -0.1}}}, "/proxy/tracing/sampling", "minimum"),
    ({"proxy": {"tracing": {"sampling": "5%"}}}, "/proxy/tracing/sampling", "pattern"),
    ({"proxy": {"tracing": {"sampling": "1.5"}}}, "/proxy/tracing/sampling", "pattern"),
    ({"proxy": {"tracing": {"sampling": True}}}, "/proxy/tracing/sampling", "want number"),
    ({"proxy": {"tracing": {"timeout": "5s"}}}, "/proxy/tracing", "not allowed"),
]


@pytest.mark.parametrize("values,path,constraint", BAD, ids=[f"{b[1]}:{i}" for i, b in enumerate(BAD)])
def test_bad_values_are_refused(chart, values, path, constraint):
    with pytest.raises(helm.HelmValuesError) as error:
        chart.validate_schema(values)
    assert path in str(error.value), error.value
    assert constraint in str(error.value), error.value


def test_good_endpoints_pass(chart):
    for endpoint in ("", ENDPOINT, "http://10.0.0.9:4318", "http://otel:4318/custom/v1/traces"):
        chart.validate_schema({"proxy": {"tracing": {"otlpEndpoint": endpoint}}})


# --- through the built injector -------------------------------------------------------------

def injector() -> Path:
    path = BIN_DIR / "trellis-injector"
    if not path.is_file():
        reason = f"trellis-injector not built in {BIN_DIR} (cargo build --workspace --bins)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def injected_proxy_env(args: dict[str, str | None], pod: dict, tmp_path: Path) -> dict[str, str]:
    """`trellis-injector inject` with the chart's injection flags; the proxy's plain env."""
    anchors = tmp_path / "ca.crt"
    done = subprocess.run(
        [str(BIN_DIR / "trellis-identity"), "bootstrap", f"--trust-anchors={anchors}",
         f"--issuer-cert={tmp_path / 'tls.crt'}", f"--issuer-key={tmp_path / 'tls.key'}"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    # Only the settings of what is injected; `serve`'s own flags are not `inject`'s.
    serve_only = {"--service", "--webhook-configuration", "--tls-secret", "--tls-cert-file",
                  "--tls-key-file", "--log-level", "--trust-anchors-file"}
    argv = [str(injector()), "inject", "-f", str(manifest), f"--trust-anchors-file={anchors}"]
    argv += [f"{flag}={value}" for flag, value in args.items() if flag not in serve_only]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRELLIS_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    (out,) = [d for d in yaml.safe_load_all(done.stdout) if d]
    spec = out["spec"]
    (proxy,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "trellis-proxy"]
    return {e["name"]: e["value"] for e in proxy["env"] if "value" in e}


def pod(annotations: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations or {}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


def test_a_default_install_adds_nothing_to_proxies(default, tmp_path):
    injector()
    env = injected_proxy_env(args_map(default.container("injector")), pod(), tmp_path)
    for name in ("TRELLIS_ACCESS_LOG", "TRELLIS_OTLP_ENDPOINT", "TRELLIS_TRACE_SAMPLING"):
        assert name not in env, env


@pytest.mark.parametrize("sampling,want", [(0.01, 0.01), (0.00001, 0.00001)])
def test_chart_values_reach_the_injected_proxy(render, tmp_path, sampling, want):
    injector()
    args = injector_args(render, {"proxy": {
        "accessLog": "json",
        "tracing": {"otlpEndpoint": ENDPOINT, "sampling": sampling},
    }})
    env = injected_proxy_env(args, pod(), tmp_path)
    assert env["TRELLIS_ACCESS_LOG"] == "json"
    assert env["TRELLIS_OTLP_ENDPOINT"] == ENDPOINT
    assert float(env["TRELLIS_TRACE_SAMPLING"]) == want
    # The pod's own choices win over the chart's.
    env = injected_proxy_env(args, pod({"trellis.dev/access-log": "off",
                                        "trellis.dev/trace-sampling": "1"}), tmp_path / "pod")
    assert env["TRELLIS_ACCESS_LOG"] == "off"
    assert env["TRELLIS_TRACE_SAMPLING"] == "1"


def test_the_proxy_reads_what_the_injector_sets():
    proxy = BIN_DIR / "trellis-proxy"
    if not proxy.is_file():
        if REQUIRED:
            pytest.fail(f"trellis-proxy not built in {BIN_DIR}")
        pytest.skip(f"trellis-proxy not built in {BIN_DIR}")
    done = subprocess.run([str(proxy), "run", "--help"], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ.get("PATH", "")})
    assert done.returncode == 0, done.stderr
    for name in ("TRELLIS_ACCESS_LOG", "TRELLIS_OTLP_ENDPOINT", "TRELLIS_TRACE_SAMPLING"):
        assert f"[env: {name}=" in done.stdout, name

