"""docs/install.md documents every value of values.yaml, with its real default."""

from __future__ import annotations

import json
import re

import yaml

from conftest import CHART_DIR, REPO

INSTALL = REPO / "docs" / "install.md"


def leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def shown(value) -> str:
    """A default as the values table writes it."""
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value)


def documented() -> dict[str, str]:
    rows = {}
    for line in INSTALL.read_text().splitlines():
        match = re.match(r"^\| `([A-Za-z0-9_.]+)` \| `([^`]*)` \| (.+) \|$", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} is documented twice"
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_value_is_documented_with_its_default():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    rows = documented()
    expected = {path: shown(value) for path, value in leaves(values)}
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"docs/install.md does not document {missing}"
    unknown = sorted(set(rows) - set(expected))
    assert not unknown, f"docs/install.md documents values the chart does not have: {unknown}"
    wrong = {p: (rows[p], d) for p, d in expected.items() if rows[p] != d}
    assert not wrong, f"documented default != values.yaml: {wrong}"


def test_install_command_is_documented():
    text = INSTALL.read_text()
    assert "helm install trellis charts/trellis -n trellis-system --create-namespace" in text
    started = (REPO / "docs" / "getting-started.md").read_text()
    assert "## In a cluster" in started
    assert "trellis_requests_total" in started
