"""The chart against the real binaries (target/debug, or $TRELLIS_BIN_DIR): every flag the
chart passes exists, the chart's defaults are the binaries' defaults, the ports the chart
opens are the ones the binaries listen on, and each binary accepts its whole rendered
command line (it gets past its settings and stops only for want of a cluster).

Without built binaries these tests are skipped, unless TRELLIS_CHART_TESTS_REQUIRE_BINARIES=1
(run.sh --require-binaries), which makes that a failure."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import ADMIN_PORT, DISCOVERY_PORT, IDENTITY_PORT, REPO, VALUE_SETS, WEBHOOK_PORT, args_map

BIN_DIR = Path(
    os.environ.get("TRELLIS_BIN_DIR")
    or Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "debug"
)
BINARIES = ("trellis-controller", "trellis-identity", "trellis-injector")
REQUIRED = os.environ.get("TRELLIS_CHART_TESTS_REQUIRE_BINARIES") == "1"

missing = [b for b in BINARIES if not (BIN_DIR / b).is_file()]
if missing:
    reason = f"{', '.join(missing)} not built in {BIN_DIR} (cargo build --workspace --bins)"
    if REQUIRED:
        raise RuntimeError(reason)
    pytestmark = pytest.mark.skip(reason=reason)

# Which binary runs in which container of the chart.
CONTAINER_BINARY = {
    ("controller", "controller"): "trellis-controller",
    ("identity", "identity"): "trellis-identity",
    ("identity", "bootstrap"): "trellis-identity",
    ("injector", "injector"): "trellis-injector",
}


def run(*argv: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN_DIR / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=timeout, env=env)


@lru_cache(maxsize=None)
def help_options(binary: str, subcommand: str) -> dict[str, str]:
    """`<binary> <subcommand> --help` as {"--flag": its help text}."""
    done = run(binary, subcommand, "--help")
    if done.returncode != 0:
        pytest.fail(f"{binary} {subcommand} --help failed (exit {done.returncode}):\n"
                    + "\n".join(done.stderr.splitlines()[:4]), pytrace=False)
    text = done.stdout
    options: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", line)
        if match:
            current = match.group(1)
            options[current] = line
        elif current:
            options[current] += "\n" + line
    assert options, f"{binary} {subcommand} --help lists no option"
    return options


def help_default(binary: str, subcommand: str, flag: str) -> str:
    block = help_options(binary, subcommand)[flag]
    match = re.search(r"\[default: ([^\]]+)\]", block)
    assert match, f"{binary} {subcommand} {flag} documents no default"
    return match.group(1).strip()


def controller_has_kubernetes_mode() -> bool:
    return "--kubernetes" in help_options("trellis-controller", "serve")


def skip_controller_without_kubernetes_mode():
    if not controller_has_kubernetes_mode():
        pytest.skip("this trellis-controller build has no Kubernetes mode (serve --kubernetes) yet")


def containers(rendered):
    for component in ("controller", "identity", "injector"):
        spec = rendered.pod_spec(component)
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield component, c, CONTAINER_BINARY[(component, c["name"])]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_flag_the_chart_passes_exists(render, name):
    rendered = render(VALUE_SETS[name])
    for component, container, binary in containers(rendered):
        if binary == "trellis-controller" and not controller_has_kubernetes_mode():
            continue
        subcommand = container["args"][0]
        known = help_options(binary, subcommand)
        for flag in args_map(container):
            assert flag in known, f"{binary} {subcommand} has no {flag} (chart: {component}/{container['name']})"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_variable_the_chart_sets_is_read(render, name):
    rendered = render(VALUE_SETS[name])
    for component, container, binary in containers(rendered):
        if binary == "trellis-controller" and not controller_has_kubernetes_mode():
            continue
        text = "\n".join(help_options(binary, container["args"][0]).values())
        for var in container.get("env", []):
            assert f"[env: {var['name']}=" in text, f"{binary} reads no {var['name']} ({component})"


def test_controller_flags_exist():
    skip_controller_without_kubernetes_mode()
    known = help_options("trellis-controller", "serve")
    for flag in ("--kubernetes", "--identity-addr", "--trust-anchors", "--token-path",
                 "--service-account", "--namespace", "--pod-name"):
        assert flag in known



def test_lease_is_the_one_the_role_names():
    """The controller's Role grants get/update on the Lease trellis-controller only."""
    skip_controller_without_kubernetes_mode()
    names = set()
    for source in (REPO / "controller" / "src").rglob("*.rs"):
        names |= set(re.findall(r'LEASE_NAME: &str = "([^"]+)"', source.read_text()))
    if not names:
        pytest.skip("no LEASE_NAME constant found in controller/src")
    assert names == {"trellis-controller"}


def port_of(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def test_binaries_listen_where_the_chart_opens_ports():
    assert port_of(help_default("trellis-controller", "serve", "--discovery-addr")) == DISCOVERY_PORT
    assert port_of(help_default("trellis-identity", "serve", "--certify-addr")) == IDENTITY_PORT
    assert port_of(help_default("trellis-identity", "serve", "--admin-addr")) == ADMIN_PORT
    assert port_of(help_default("trellis-injector", "serve", "--webhook-addr")) == WEBHOOK_PORT
    assert port_of(help_default("trellis-injector", "serve", "--admin-addr")) == ADMIN_PORT


def test_controller_admin_port():
    # The chart probes /live and /ready on 9990 and scrapes /metrics there: a controller in
    # Kubernetes mode without its admin server would be restarted by the liveness probe.
    skip_controller_without_kubernetes_mode()
    options = help_options("trellis-controller", "serve")
    assert "--admin-addr" in options, "trellis-controller serve has no admin server (--admin-addr, :9990)"
    assert port_of(help_default("trellis-controller", "serve", "--admin-addr")) == ADMIN_PORT


def test_chart_defaults_are_the_binaries_defaults(chart, default):
    values = chart.values
    assert help_default("trellis-injector", "serve", "--proxy-image") == \
        args_map(default.container("injector"))["--proxy-image"]
    assert help_default("trellis-injector", "serve", "--sidecar-mode") == values["proxy"]["sidecarMode"]
    assert help_default("trellis-injector", "serve", "--proxy-log-level") == values["proxy"]["logLevel"]
    assert help_default("trellis-injector", "serve", "--proxy-access-log") == values["proxy"]["accessLog"]
    assert float(help_default("trellis-injector", "serve", "--proxy-trace-sampling")) == values["proxy"]["tracing"]["sampling"]
    assert "[default" not in help_options("trellis-injector", "serve")["--proxy-otlp-endpoint"]
    assert values["proxy"]["tracing"]["otlpEndpoint"] == ""
    assert help_default("trellis-injector", "serve", "--proxy-cpu-request") == values["proxy"]["resources"]["requests"]["cpu"]
    assert help_default("trellis-injector", "serve", "--proxy-memory-request") == values["proxy"]["resources"]["requests"]["memory"]
    assert help_default("trellis-injector", "serve", "--proxy-memory-limit") == values["proxy"]["resources"]["limits"]["memory"]
    assert help_default("trellis-injector", "serve", "--service") == "trellis-injector"
    assert help_default("trellis-injector", "serve", "--tls-secret") == "trellis-injector-tls"
    assert help_default("trellis-injector", "serve", "--webhook-configuration") == "trellis-injector"
    assert help_default("trellis-identity", "serve", "--service") == "trellis-identity"
    assert help_default("trellis-identity", "serve", "--token-audience") == "identity.trellis.dev"
    assert help_default("trellis-identity", "serve", "--cert-lifetime") == values["identity"]["certLifetime"]
    assert help_default("trellis-identity", "serve", "--reload-interval") == values["identity"]["reloadInterval"]
    assert help_default("trellis-identity", "bootstrap", "--issuer-lifetime") == values["identity"]["bootstrap"]["issuerLifetime"]
    assert help_default("trellis-identity", "bootstrap", "--root-lifetime") == values["identity"]["bootstrap"]["rootLifetime"]
    for binary in BINARIES:
        assert help_default(binary, "serve", "--trust-domain") == values["trustDomain"]
    assert help_default("trellis-controller", "serve", "--cluster-domain") == values["clusterDomain"]


def test_sidecar_modes_are_the_injectors(chart):
    block = help_options("trellis-injector", "serve")["--sidecar-mode"]
    modes = re.findall(r"^\s+- (\w+):", block, flags=re.M)
    assert sorted(modes) == sorted(chart.schema["properties"]["proxy"]["properties"]["sidecarMode"]["enum"])


def test_app_version_is_the_binaries_version(chart):
    for binary in BINARIES:
        assert run(binary, "--version").stdout.split() == [binary, chart.metadata["appVersion"]]


# --- each binary with its rendered command line ------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A trust anchor and issuer made by trellis-identity itself, in files."""
    d = tmp_path_factory.mktemp("pki")
    done = run("trellis-identity", "bootstrap", f"--trust-anchors={d / 'ca.crt'}",
               f"--issuer-cert={d / 'tls.crt'}", f"--issuer-key={d / 'tls.key'}",
               env={**os.environ, "KUBECONFIG": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    (d / "token").write_text("not-a-real-token\n")
    return d


def local_volumes(container: dict, tmp: Path, pki: Path) -> dict[str, Path]:
    """The container's mounts, as local directories holding what the volumes would hold."""
    files = {"trust-anchors": ["ca.crt"], "identity-token": ["token"], "tls": ["tls.crt", "tls.key"]}
    mapping = {}
    for mount in container.get("volumeMounts", []):
        local = tmp / mount["name"]
        local.mkdir(exist_ok=True)
        for f in files[mount["name"]]:
            shutil.copy(pki / f, local / f)
        mapping[mount["mountPath"]] = local
    return mapping


def cluster_less_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBERNETES_", "TRELLIS_")) and k != "KUBECONFIG"}
    env.update({
        "HOME": str(home),
        "KUBECONFIG": str(home / "no-kubeconfig"),
        # The chart leaves the listen addresses at their defaults; here, loopback only.
        "TRELLIS_ADMIN_ADDR": "127.0.0.1:0",
        "TRELLIS_CERTIFY_ADDR": "127.0.0.1:0",
        "TRELLIS_WEBHOOK_ADDR": "127.0.0.1:0",
        "TRELLIS_DISCOVERY_ADDR": "127.0.0.1:0",
    })
    return env


def container_env(container: dict, namespace: str) -> dict[str, str]:
    """The container's env as the kubelet would set it (downward API fields of a pod)."""
    fields = {"metadata.name": f"{container['name']}-5d8f9c7b6-x2x8q", "metadata.namespace": namespace,
              "status.podIP": "10.0.0.7", "spec.serviceAccountName": "trellis"}
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("name", ["default", "classic", "external-issuer", "existing-tls", "custom"])
def test_binaries_accept_the_rendered_command_lines(render, name, pki, tmp_path):
    rendered = render(VALUE_SETS[name])
    for component, container, binary in containers(rendered):
        if binary == "trellis-controller" and not controller_has_kubernetes_mode():
            continue
        where = f"{name}: {component}/{container['name']}"
        work = tmp_path / container["name"]
        work.mkdir()
        mounts = local_volumes(container, work, pki)
        argv = []
        for arg in container["args"]:
            for mount_path, local in mounts.items():
                arg = arg.replace(mount_path, str(local))
            argv.append(arg)
        env = cluster_less_env(work)
        env.update(container_env(container, rendered.namespace))
        process = subprocess.Popen([str(BIN_DIR / binary), *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            # Still running: it needed no cluster (e.g. the injector serving its own files).
            process.terminate()
            process.communicate(timeout=20)
            continue
        assert process.returncode != 2, f"{where}: {binary} refused its settings:\n{stderr}"
        assert process.returncode == 1, f"{where}: exit {process.returncode}:\n{stderr}"
        assert "kubernetes" in stderr.lower(), f"{where}: stopped for another reason than the cluster:\n{stderr}"
