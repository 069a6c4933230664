"""The metric names the project exports, read from its Rust sources: every name given to
prometheus-client's Registry::register / register_with_unit (with the registry's prefix)
and to a collector's encode_descriptor, with the suffixes the exposition adds to its type
(counters _total; histograms _bucket, _sum, _count)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from conftest import REPO

# Crates whose binaries serve /metrics; integration is the test harness.
NOT_SHIPPED = {"integration", "target", "bench", "examples"}

PREFIX = re.compile(r'(?:Registry::with_prefix|sub_registry_with_prefix)\(\s*"([A-Za-z0-9_:]+)"\s*\)')
REGISTER = re.compile(
    r'\.register(?P<with_unit>_with_unit)?\(\s*"(?P<name>[A-Za-z0-9_:]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,'
    r'\s*(?:Unit::(?P<unit>\w+)\s*,\s*)?(?P<metric>[A-Za-z0-9_.]+(?:\(\))?)\s*,?\s*\)', re.S)
DESCRIPTOR = re.compile(
    r'encode_descriptor\(\s*"(?P<name>[A-Za-z0-9_:]+)"\s*,\s*"(?:[^"\\]|\\.)*"\s*,\s*(?:None|Some\(&?Unit::(?P<unit>\w+)\))\s*,'
    r'\s*(?P<metric>[A-Za-z0-9_]+)\.metric_type\(\)', re.S)
UNITS = {"Seconds": "seconds", "Bytes": "bytes", "Joules": "joules", "Grams": "grams",
         "Meters": "meters", "Ratios": "ratios", "Volts": "volts", "Amperes": "amperes",
         "Celsius": "celsius"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


class ScanError(AssertionError):
    pass


def shipped_sources() -> list[Path]:
    out = []
    for manifest in sorted(REPO.glob("*/Cargo.toml")):
        crate = manifest.parent
        if crate.name not in NOT_SHIPPED and (crate / "src").is_dir():
            out.extend(sorted((crate / "src").rglob("*.rs")))
    return out


def kind_of(source: str, metric: str, where: str) -> str:
    """counter, gauge or histogram: from the declarations of the registered value (a struct
    field `name: Type` or a `let name = Type...`), which must agree."""
    name = metric.removesuffix(".clone()").split(".")[-1]
    declarations = re.findall(rf"(?m)^\s*(?:pub\s+)?{re.escape(name)}\s*:\s*(.+)$", source)
    declarations += re.findall(rf"(?m)\blet\s+(?:mut\s+)?{re.escape(name)}\s*(?::\s*[^=]+)?=\s*(.+)$", source)
    kinds = set()
    for declaration in declarations:
        for kind, word in (("histogram", "Histogram"), ("counter", "Counter"), ("gauge", "Gauge")):
            if re.search(rf"\b(?:Const)?{word}\b", declaration):
                kinds.add(kind)
                break
    if len(kinds) != 1:
        raise ScanError(f"{where}: cannot tell the type of {metric} (declarations {declarations})")
    return kinds.pop()


@cache
def exported_metric_families() -> dict[str, str]:
    """Metric family name -> counter, gauge or histogram."""
    families: dict[str, str] = {}
    for path in shipped_sources():
        source = path.read_text().split("#[cfg(test)]")[0]
        where = str(path.relative_to(REPO))
        prefixes = set(PREFIX.findall(source))
        if len(prefixes) > 1:
            raise ScanError(f"{where}: more than one registry prefix: {prefixes}")
        prefix = f"{prefixes.pop()}_" if prefixes else ""
        for match in REGISTER.finditer(source):
            name = prefix + match["name"]
            if match["with_unit"]:
                if match["unit"] not in UNITS:
                    raise ScanError(f"{where}: unit {match['unit']} of {name} is not known here")
                name += "_" + UNITS[match["unit"]]
            families[name] = kind_of(source, match["metric"], where)
        for match in DESCRIPTOR.finditer(source):
            name = match["name"] + (f"_{UNITS[match['unit']]}" if match["unit"] else "")
            families[name] = kind_of(source, match["metric"], where)
    return families


@cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name a scrape of the project's /metrics can show."""
    return frozenset(family + suffix
                     for family, kind in exported_metric_families().items()
                     for suffix in SUFFIXES[kind])
