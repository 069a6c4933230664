#!/usr/bin/env bash
# Tests of the Helm chart charts/trellis: renders and lints it with the real Helm engine
# (helm-python-sdk, no helm binary), checks the objects, validates them against the
# Kubernetes schemas, and checks the chart against the built binaries.
#
#   charts/tests/run.sh [--require-binaries] [pytest arguments...]
#
# --require-binaries: fail, instead of skipping those tests, when target/debug lacks the
# binaries (build them first with cargo build --workspace --bins).
#
# Python packages (pinned in requirements.txt) go to a virtualenv in
# charts/tests/.venv-chart-tests; where python3 cannot make one (Debian without
# python3-venv), as root it installs python3-venv, otherwise it falls back to
# pip install --user. Exits non-zero when a test fails or when no test ran.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-chart-tests"
requirements="$here/requirements.txt"
python="${PYTHON:-python3}"

if [ "${1:-}" = "--require-binaries" ]; then
  export TRELLIS_CHART_TESTS_REQUIRE_BINARIES=1
  shift
fi

say() { echo "== chart tests: $*"; }
die() { echo "error: chart tests: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }

have "$python" || die "$python is not installed (Debian: apt-get install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "helm-python-sdk needs Python 3.10 or newer; $python is $("$python" -V 2>&1)"

apt_install() {
  is_root && have apt-get || return 1
  say "installing $* (Debian packages)"
  apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

make_venv() {
  rm -rf "$venv"
  "$python" -m venv "$venv" >/dev/null 2>&1 && "$venv/bin/python" -m pip --version >/dev/null 2>&1
}

# 1. A Python with the pinned packages: the virtualenv, else the user's site-packages.
py=""
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  py="$venv/bin/python"
elif make_venv; then
  py="$venv/bin/python"
elif apt_install python3-venv && make_venv; then
  py="$venv/bin/python"
else
  rm -rf "$venv"
  say "no virtualenv possible here; installing with pip install --user"
  "$python" -m pip --version >/dev/null 2>&1 || apt_install python3-pip ||
    die "$python has neither venv nor pip (Debian: apt-get install python3-venv, or python3-pip)"
  py="$python"
fi

stamp_of() { sha256sum "$requirements" | cut -d' ' -f1; }
installed_stamp="$venv/.requirements.sha256"
if [ "$py" = "$venv/bin/python" ]; then
  if [ "$(cat "$installed_stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
    say "installing $(grep -Eo '^[A-Za-z0-9_.-]+==[^ ]+' "$requirements" | tr '\n' ' ')into $venv"
    "$py" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    stamp_of >"$installed_stamp"
  fi
else
  pip_user=("$py" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --user -r "$requirements")
  if ! "${pip_user[@]}" 2>/tmp/chart-tests-pip.$$; then
    if grep -q externally-managed /tmp/chart-tests-pip.$$; then
      # PEP 668 (Debian 12 and later): --user installs only under ~/.local, never into
      # the system's packages.
      "${pip_user[@]}" --break-system-packages
    else
      cat /tmp/chart-tests-pip.$$ >&2
      rm -f /tmp/chart-tests-pip.$$
      die "pip install --user failed"
    fi
  fi
  rm -f /tmp/chart-tests-pip.$$
fi

# 2. The tests. pytest exits 5 when it collected no test: that is a failure here.
say "pytest ($("$py" -c 'import helm_python as h; print("Helm SDK", h.helm_sdk_version())'))"
cd "$here"
set +e
"$py" -m pytest -c "$here/pytest.ini" "$here" "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  die "pytest collected no test"
fi
exit "$status"
