"""Worker tags and resources, and the routes tasks ask for (layer 1: no imports from zfabric but errors).

The rule it keeps: a task goes only to a worker that has every tag it names and, for each resource it
needs, enough of that resource left; while it runs, its needs are held on that worker. A route is
checked once, where it enters a process (the caller's options, a worker's flags, a SUBMIT entry), and
is a small hashable value after that.

On the wire a routed SUBMIT entry carries ``[priority, tags, resources]`` where a plain one carries its
priority (see docs/PROTOCOL.md); a WORKER_HELLO carries the worker's tags and resources.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

from .errors import ConfigError

MAX_TAGS = 16
MAX_TAG_CHARS = 64
MAX_RESOURCES = 16
MAX_AMOUNT = 1e15
UNIT = 1_000_000
"""Amounts are counted in millionths, as integers: holding and releasing them in any order adds up exactly
(floats drift: 0.1 + 0.2 - 0.1 - 0.2 is not 0)."""


class Route(NamedTuple):
    """What a task asks of its worker: tags it must have, and amounts of resources it holds while it runs."""
    tags: frozenset[str]
    needs: tuple[tuple[str, int], ...]  # (name, amount in `UNIT`s), sorted by name

    def amounts(self) -> dict[str, float]:
        return {name: amount(units) for name, units in self.needs}

    def describe(self) -> str:
        parts = []
        if self.tags:
            parts.append("tags " + ", ".join(sorted(self.tags)))
        if self.needs:
            parts.append("resources " + ", ".join(f"{name}={value}" for name, value in self.amounts().items()))
        return " and ".join(parts) or "nothing"


def units(value: float) -> int:
    return round(value * UNIT)


def amount(count: int) -> float:
    """A count of `UNIT`s as the amount people wrote: an int where it is whole."""
    whole, part = divmod(count, UNIT)
    return whole if not part else count / UNIT


def check_tags(tags: Any, what: str = "tags") -> frozenset[str] | str:
    """The tags as a frozenset, or a message saying what is wrong with them."""
    if isinstance(tags, str):
        return f"{what} must be a list of strings, e.g. {what}=[{tags!r}], got the string {tags[:MAX_TAG_CHARS]!r}"
    if not isinstance(tags, (list, tuple, set, frozenset)):
        return f"{what} must be a list of strings, got {type(tags).__name__}"
    if len(tags) > MAX_TAGS:
        return f"{what}: {len(tags)} given, at most {MAX_TAGS}"
    for tag in tags:
        if type(tag) is not str or not 0 < len(tag) <= MAX_TAG_CHARS or not tag.isprintable() or "," in tag:
            return (f"{what}: {str(tag)[:MAX_TAG_CHARS]!r} is not a tag (a non-empty string of at most "
                    f"{MAX_TAG_CHARS} printable characters, no commas)")
    return frozenset(tags)


def check_resources(resources: Any, what: str = "resources") -> dict[str, float] | str:
    """The resources as ``{name: amount}``, or a message saying what is wrong with them."""
    if not isinstance(resources, dict):
        return f"{what} must be a dict of name to amount, e.g. {what}={{'gpu': 1}}, got {type(resources).__name__}"
    if len(resources) > MAX_RESOURCES:
        return f"{what}: {len(resources)} given, at most {MAX_RESOURCES}"
    out: dict[str, float] = {}
    for name, value in resources.items():
        if type(name) is not str or not 0 < len(name) <= MAX_TAG_CHARS or not name.isprintable() \
                or "," in name or "=" in name:
            return f"{what}: {str(name)[:MAX_TAG_CHARS]!r} is not a resource name"
        if type(value) not in (int, float) or not (1 / UNIT <= value <= MAX_AMOUNT) or not math.isfinite(value):
            return (f"{what}: {name} must be a number from {1 / UNIT:g} to {MAX_AMOUNT:g}, "
                    f"got {str(value)[:40]}")
        out[name] = value
    return out


def checked_route(tags: Any = (), resources: Any = None) -> Route | None:
    """The route of a caller's ``tags`` and ``resources`` (None: any worker); ConfigError saying what is wrong."""
    checked_tags, checked_resources = check_tags(tags), check_resources({} if resources is None else resources)
    if isinstance(checked_tags, str):
        raise ConfigError(checked_tags)
    if isinstance(checked_resources, str):
        raise ConfigError(checked_resources)
    return make_route(checked_tags, checked_resources)


def make_route(tags: Iterable[str], resources: dict[str, float]) -> Route | None:
    """The route of checked tags and resources; None when it asks for nothing (any worker will do)."""
    if not tags and not resources:
        return None
    return Route(frozenset(tags), tuple(sorted((name, units(value)) for name, value in resources.items())))


def parse_resources_spec(spec: str) -> dict[str, float]:
    """``"gpu=2,mem_gb=64"`` as ``{"gpu": 2, "mem_gb": 64}`` (the CLI's form); ValueError saying what is wrong."""
    resources: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, amount = part.partition("=")
        if not sep:
            raise ValueError(f"{part!r} is not NAME=AMOUNT (e.g. gpu=2,mem_gb=64)")
        try:
            value: float = int(amount)
        except ValueError:
            try:
                value = float(amount)
            except ValueError:
                raise ValueError(f"{name.strip()}: {amount!r} is not a number") from None
        resources[name.strip()] = value
    checked = check_resources(resources)
    if isinstance(checked, str):
        raise ValueError(checked)
    return checked


def placement(priority: int, route: Route | None) -> Any:
    """What a SUBMIT entry carries in its second slot: the priority, or ``[priority, tags, resources]``."""
    if route is None:
        return priority
    return [priority, sorted(route.tags), route.amounts()]


def parse_placement(slot: Any) -> tuple[int, Route | None] | None:
    """An entry's second slot from the network as ``(priority, route)``; None if malformed."""
    if type(slot) is int:
        return slot, None
    if type(slot) is not list or len(slot) != 3 or type(slot[0]) is not int:
        return None
    tags, resources = check_tags(slot[1]), check_resources(slot[2])
    if isinstance(tags, str) or isinstance(resources, str):
        return None
    return slot[0], make_route(tags, resources)


class Equipment:
    """A worker's tags, its resources, and how much of each its running routed tasks hold."""

    __slots__ = ("tags", "resources", "used")

    def __init__(self, tags: frozenset[str] = frozenset(), resources: dict[str, float] | None = None) -> None:
        self.tags = tags
        self.resources = {name: units(value) for name, value in (resources or {}).items()}  # in `UNIT`s
        self.used: dict[str, int] = {}

    def could_ever_take(self, route: Route) -> bool:
        """It has the tags, and each resource in at least the amount one task needs."""
        resources = self.resources
        return self.tags >= route.tags and all(resources.get(name, 0) >= need for name, need in route.needs)

    def fits(self, route: Route) -> int:
        """How many more tasks of `route` its resources allow now (tags are `could_ever_take`'s to check)."""
        most = 1 << 62
        resources, used = self.resources, self.used
        for name, need in route.needs:
            most = min(most, (resources.get(name, 0) - used.get(name, 0)) // need)
        return max(0, most)

    def hold(self, route: Route, sign: int = 1) -> None:
        used = self.used
        for name, need in route.needs:
            left = used.get(name, 0) + sign * need
            if left > 0:
                used[name] = left
            else:
                used.pop(name, None)

    def describe(self) -> str:
        return Route(self.tags, tuple(sorted(self.resources.items()))).describe() if self.tags or self.resources else ""

    def status(self) -> dict[str, Any]:
        """Its part of a worker's status: nothing for a worker without tags or resources (STATUS_REPLY has
        a budget of containers, see docs/PROTOCOL.md)."""
        if not self.tags and not self.resources:
            return {}
        return {"tags": sorted(self.tags), "resources": {k: amount(v) for k, v in self.resources.items()},
                "resources_used": {k: amount(v) for k, v in self.used.items()}}

    def over(self) -> bool:
        return any(count > self.resources.get(name, 0) for name, count in self.used.items())
