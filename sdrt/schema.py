"""Small declarative JSON schemas: each rule checks one value's type and range and returns it cleaned.

Rules raise BundleError with one line naming the key ("manifest.json: model.latent_scale_factor: expected a
finite number in [0.0001, 10000], got nan"). A `Record` drops keys it does not know, with a warning, so that an
older sdrt reads a bundle a newer one wrote; `Record(keep_unknown=True)` passes them through silently, for
objects that are open by nature (a diffusers scheduler config carries keys sdrt never reads).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from sdrt.errors import BundleError, printable

log = logging.getLogger(__name__)

WHERE = "manifest.json"


class Rule(Protocol):
    def check(self, value: Any, where: str) -> Any:
        """`value` cleaned, or BundleError naming `where`."""


def shown(value: Any, limit: int = 40) -> str:
    """A short, terminal-safe rendering of a JSON value for an error message."""
    if isinstance(value, dict):
        text = f"an object of {len(value)} keys"
    elif isinstance(value, list):
        text = f"a list of {len(value)} items"
    else:  # null, true, NaN, 1e+300 and strings as JSON writes them
        text = json.dumps(value)
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def at(where: str) -> str:
    """"manifest.json: model.name" for key path `where` (keys come from the document: escaped and cut short)."""
    return f"{WHERE}: {printable(where)[:160]}" if where else WHERE


def fail(where: str, expected: str, value: Any) -> BundleError:
    """The one-line error for `value` at key path `where`."""
    return BundleError(f"{at(where)}: expected {expected}, got {shown(value)}")


@dataclass(frozen=True)
class Number:
    """A JSON number (not a boolean) in [low, high], finite; `integer` for whole numbers only."""

    low: float
    high: float
    integer: bool = False
    open_low: bool = False  # (low, high]: for values that must be strictly positive
    open_high: bool = False

    def check(self, value: Any, where: str) -> Any:
        kinds = int if self.integer else (int, float)
        # JSON integers have no size limit (math.isfinite would overflow on 10**400); floats may be NaN or infinite.
        ok = isinstance(value, kinds) and not isinstance(value, bool) and (isinstance(value, int) or
                                                                             math.isfinite(value))
        if not ok or not self._within(value):
            raise fail(where, self._expected(), value)
        return value

    def _within(self, value) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def _expected(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        brackets = ("(" if self.open_low else "[", ")" if self.open_high else "]")
        return f"{kind} in {brackets[0]}{self.low:g}, {self.high:g}{brackets[1]}"


@dataclass(frozen=True)
class Text:
    """A string: one of `choices`, or matching `pattern` (described by `what`), at most `max_len` characters."""

    choices: tuple[str, ...] = ()
    pattern: str = ""
    what: str = "a string"
    max_len: int = 4096

    def check(self, value: Any, where: str) -> Any:
        if self.choices:
            if value not in self.choices:
                raise fail(where, "one of " + ", ".join(repr(c) for c in self.choices), value)
        elif not isinstance(value, str) or len(value) > self.max_len or (
                self.pattern and not re.fullmatch(self.pattern, value)):
            raise fail(where, f"{self.what} of at most {self.max_len} characters", value)
        return value


@dataclass(frozen=True)
class Flag:
    """true or false."""

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, bool):
            raise fail(where, "true or false", value)
        return value


@dataclass(frozen=True)
class Maybe:
    """null, or what `rule` accepts."""

    rule: Rule

    def check(self, value: Any, where: str) -> Any:
        return None if value is None else self.rule.check(value, where)


@dataclass(frozen=True)
class Either:
    """What the first of `rules` accepts (`what` names them all for the error)."""

    rules: tuple[Rule, ...]
    what: str

    def check(self, value: Any, where: str) -> Any:
        for rule in self.rules:
            try:
                return rule.check(value, where)
            except BundleError:
                continue
        raise fail(where, self.what, value)


@dataclass(frozen=True)
class ListOf:
    """A list of `min_len` to `max_len` items, each checked by `item`."""

    item: Rule
    min_len: int = 0
    max_len: int = 1024

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            raise fail(where, f"a list of {self.min_len} to {self.max_len} items", value)
        return [self.item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf:
    """An object of up to `max_items` entries, keys checked by `key` and values by `value`."""

    key: Rule
    value: Rule
    max_items: int = 1024

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict) or len(value) > self.max_items:
            raise fail(where, f"an object of at most {self.max_items} entries", value)
        return {self.key.check(k, f"{where} key"): self.value.check(v, f"{where}.{k}") for k, v in value.items()}


@dataclass(frozen=True)
class Record:
    """An object with known keys (`required` ones must be there); unknown keys are dropped with a warning, or kept
    as they are with `keep_unknown`."""

    fields: Mapping[str, Rule]
    required: tuple[str, ...] = ()
    keep_unknown: bool = False
    max_items: int = 1024

    def check(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict) or len(value) > self.max_items:
            raise fail(where, "an object", value)
        missing = [k for k in self.required if k not in value]
        if missing:
            raise BundleError(f"{at(where)}: missing required key {missing[0]!r}")
        unknown = [k for k in value if k not in self.fields]
        if unknown and not self.keep_unknown:
            log.warning("%s: ignoring keys this sdrt does not know (written by a newer one?): %s", at(where),
                        printable(", ".join(unknown))[:200])
        cleaned = {k: value[k] for k in unknown} if self.keep_unknown else {}
        for key, rule in self.fields.items():
            if key in value:
                cleaned[key] = rule.check(value[key], f"{where}.{key}" if where else key)
        return cleaned


@dataclass(frozen=True)
class Invariant:
    """A rule across keys: `holds(value)` is False when the value breaks it, and `message` says how."""

    message: str
    holds: Callable[[Any], bool] = field(repr=False)


def check_invariants(value: Any, invariants: tuple[Invariant, ...]) -> None:
    """Raise BundleError with the first broken invariant's message."""
    for invariant in invariants:
        if not invariant.holds(value):
            raise BundleError(f"{WHERE}: {invariant.message}")
