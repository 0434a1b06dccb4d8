"""Host-memory copies of registered adapters' factors, under a byte budget (``--max-adapter-memory``).

Registering an adapter reads and validates its folder once; its factors stay here, so making it
resident again after an eviction is a few tensor copies into the layers' factor pools, with no
disk read and no module construction. When the copies exceed the budget, the least recently
used ones that are not resident are dropped; such an adapter is read from its folder again (and
validated again) the next time it is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from lorakit.core.pooled import ServedAdapter


class AdapterStore:
    def __init__(self, budget_bytes: int | None = None):
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"the adapter memory budget must be ≥ 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self._items: OrderedDict[str, ServedAdapter] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.dropped = 0  # copies dropped to stay within the budget (metrics)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, name: str) -> ServedAdapter | None:
        served = self._items.get(name)
        if served is not None:
            self._items.move_to_end(name)
        return served

    def put(self, served: ServedAdapter, keep: Collection[str] = ()) -> None:
        """Hold `served`; then drop least recently used copies outside `keep` while over budget."""
        self.discard(served.name)
        self._items[served.name] = served
        self.nbytes += served.nbytes
        if self.budget is None:
            return
        for name in list(self._items):
            if self.nbytes <= self.budget:
                break
            if name != served.name and name not in keep:
                self.discard(name)
                self.dropped += 1

    def discard(self, name: str) -> None:
        served = self._items.pop(name, None)
        if served is not None:
            self.nbytes -= served.nbytes


def parse_bytes(text: str) -> int:
    """'512MiB' / '2GB' / '1e9' / '0' -> bytes (binary and decimal suffixes, case-insensitive)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value >= 0:
        raise ValueError(f"{text!r} is not a size: use bytes or a number with KB/MB/GB or KiB/MiB/GiB, e.g. 2GiB")
    return int(value * units[unit])
