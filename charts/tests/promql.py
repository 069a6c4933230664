"""A small PromQL parser for the chart tests: enough of the grammar to reject a malformed
query and to name every metric a query selects (the dashboards and alerts of the chart must
name only metrics the project exports)."""

from __future__ import annotations

import re
from dataclasses import dataclass

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "hour", "idelta", "increase",
    "irate", "label_join", "label_replace", "ln", "log2", "log10", "minute", "month",
    "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt",
    "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time", "max_over_time",
    "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time",
}
BINARY = {"+", "-", "*", "/", "%", "^", "==", "!=", "<=", ">=", "<", ">", "and", "or", "unless"}
MATCH_OPS = {"=", "!=", "=~", "!~"}

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:[0-9]+(?:ms|s|m|h|d|w|y))+(?![A-Za-z0-9_])|\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)
  | (?P<number>0x[0-9a-fA-F]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:inf|nan)(?![A-Za-z0-9_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_:]*)
  | (?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=,(){}\[\]@:])
""", re.X)


class PromQLError(ValueError):
    pass


@dataclass
class Token:
    kind: str
    text: str


def tokenize(query: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(query):
        match = TOKEN.match(query, pos)
        if not match:
            raise PromQLError(f"unexpected {query[pos:pos + 20]!r} at {pos} in {query!r}")
        pos = match.end()
        if match.lastgroup != "space":
            tokens.append(Token(match.lastgroup, match.group()))
    return tokens


class Parser:
    def __init__(self, query: str):
        self.query = query
        self.tokens = tokenize(query)
        self.pos = 0
        self.metrics: set[str] = set()

    def peek(self, offset: int = 0) -> Token | None:
        at = self.pos + offset
        return self.tokens[at] if at < len(self.tokens) else None

    def is_(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token.kind in ("op", "ident") and token.text == text

    def take(self, kind: str | None = None, text: str | None = None) -> Token:
        token = self.peek()
        if token is None or (kind and token.kind != kind) or (text and token.text != text):
            want = text or kind
            raise PromQLError(f"expected {want}, found {token.text if token else 'the end'} in {self.query!r}")
        self.pos += 1
        return token

    def parse(self) -> set[str]:
        self.expr()
        if self.peek() is not None:
            raise PromQLError(f"unexpected {self.peek().text!r} in {self.query!r}")
        return self.metrics

    def expr(self) -> None:
        self.unary()
        while (token := self.peek()) is not None and token.text in BINARY:
            self.pos += 1
            if self.is_("bool"):
                self.pos += 1
            if self.is_("on") or self.is_("ignoring"):
                self.pos += 1
                self.labels()
            if self.is_("group_left") or self.is_("group_right"):
                self.pos += 1
                if self.is_("("):
                    self.labels()
            self.unary()

    def unary(self) -> None:
        while self.is_("-") or self.is_("+"):
            self.pos += 1
        self.primary()
        if self.is_("["):
            self.pos += 1
            self.take("duration")
            if self.is_(":"):
                self.pos += 1
                if not self.is_("]"):
                    self.take("duration")
            self.take("op", "]")
        if self.is_("offset"):
            self.pos += 1
            if self.is_("-"):
                self.pos += 1
            self.take("duration")

    def labels(self) -> None:
        self.take("op", "(")
        while not self.is_(")"):
            self.take("ident")
            if not self.is_(")"):
                self.take("op", ",")
        self.take("op", ")")

    def args(self) -> None:
        self.take("op", "(")
        while not self.is_(")"):
            self.expr()
            if not self.is_(")"):
                self.take("op", ",")
        self.take("op", ")")

    def primary(self) -> None:
        token = self.peek()
        if token is None:
            raise PromQLError(f"{self.query!r} ends where an expression should be")
        if token.kind in ("number", "string"):
            self.pos += 1
        elif token.text == "(":
            self.pos += 1
            self.expr()
            self.take("op", ")")
        elif token.text == "{":
            self.matchers()
        elif token.kind == "ident" and token.text in AGGREGATIONS and self._aggregation_follows():
            self.pos += 1
            if self.is_("by") or self.is_("without"):
                self.pos += 1
                self.labels()
            self.args()
            if self.is_("by") or self.is_("without"):
                self.pos += 1
                self.labels()
        elif token.kind == "ident" and self.peek(1) is not None and self.peek(1).text == "(":
            if token.text not in FUNCTIONS:
                raise PromQLError(f"unknown function {token.text}() in {self.query!r}")
            self.pos += 1
            self.args()
        elif token.kind == "ident":
            self.pos += 1
            self.metrics.add(token.text)
            if self.is_("{"):
                self.matchers()
        else:
            raise PromQLError(f"unexpected {token.text!r} in {self.query!r}")

    def _aggregation_follows(self) -> bool:
        following = self.peek(1)
        return following is not None and following.text in ("(", "by", "without")

    def matchers(self) -> None:
        self.take("op", "{")
        while not self.is_("}"):
            label = self.take("ident").text
            op = self.take("op").text
            if op not in MATCH_OPS:
                raise PromQLError(f"{op!r} is not a label matcher in {self.query!r}")
            value = self.take("string").text
            if label == "__name__" and op == "=":
                self.metrics.add(value[1:-1])
            if not self.is_("}"):
                self.take("op", ",")
        self.take("op", "}")


def metric_names(query: str) -> set[str]:
    """The metrics a PromQL query selects; PromQLError when it does not parse."""
    return Parser(query).parse()


def grafana_variable_query(query: str) -> str:
    """The PromQL inside a Grafana variable query: label_values(<selector>, label) or
    query_result(<expr>); anything else is PromQL already."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", query, re.S)
    if match:
        return match.group(1)
    match = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return match.group(1) if match else query
