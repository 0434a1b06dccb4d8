"""Which adapters the server knows, which are in memory, and which to evict.

Known adapters are ``name -> folder``. Registering one reads and validates its folder once
(through the model's ordinary load path); plain LoRA adapters then keep their factors in host
memory (:class:`~lorakit.serve.store.AdapterStore`, byte budget ``--max-adapter-memory``). At most
``max_loaded`` are *resident* (usable by a forward pass); when another is needed the least recently
used one that no running request is using is evicted. For plain LoRA, residency is a slot in the
layers' factor pools (:mod:`lorakit.core.pooled`): a few tensor copies, no disk read, no module
built, so it never holds up a decode step for long; variants (DoRA, ...) and adapters with
modules_to_save / trainable tokens are loaded as modules from their folder instead. A request may also ask for a weighted
mixture, ``model: "mix:a=0.7,b=0.3"``: it is built once, exactly (rank Σ rᵢ, see
:meth:`LoraModel.add_weighted_adapter`), under an internal name, and cached like an adapter.

Validation (names, paths under ``--adapter-root``, mixture syntax) runs on the HTTP side; the
loading methods run on the engine's worker thread only, between decode steps.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lorakit.core import pooled
from lorakit.core.model import LoraModel
from lorakit.errors import LorakitError
from lorakit.io.rooted import OutsideRootError
from lorakit.serve.errors import BadRequest, Conflict, ModelNotFound, NotFound, PermissionDenied
from lorakit.serve.loading import prepare_served_adapter, unload_served_adapter
from lorakit.serve.store import AdapterStore

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")  # never starts with "_": internal names do
MIX_PREFIX = "mix:"
MAX_MIX_COMPONENTS = 4
MAX_MIXTURES = 256  # distinct mixture specs remembered (each is a few floats; loaded ones are LRU-capped)


@dataclass(frozen=True)
class Mixture:
    """Σ wᵢ·ΔWᵢ over named adapters; ``name`` is its internal adapter name."""

    components: tuple[str, ...]
    weights: tuple[float, ...]

    @property
    def name(self) -> str:
        spec = ",".join(f"{c}={w!r}" for c, w in zip(self.components, self.weights))
        return "_mix_" + hashlib.sha1(spec.encode()).hexdigest()[:16]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a "
                         "letter or digit", param="name", code="invalid_name")
    return name


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """'mix:a=0.7,b=0.3' -> [('a', 0.7), ('b', 0.3)] (sorted by name)."""
    body = spec[len(MIX_PREFIX):]
    parts = [p.strip() for p in body.split(",") if p.strip()]
    if not 1 <= len(parts) <= MAX_MIX_COMPONENTS:
        raise BadRequest(f"a mixture names 1-{MAX_MIX_COMPONENTS} adapters, e.g. 'mix:a=0.7,b=0.3'; got {spec!r}",
                         param="model", code="invalid_mixture")
    out: dict[str, float] = {}
    for part in parts:
        name, sep, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not sep or not math.isfinite(value) or abs(value) > 10:
            raise BadRequest(f"mixture term {part!r} must be NAME=WEIGHT with a finite weight in [-10, 10]",
                             param="model", code="invalid_mixture")
        if name.strip() in out:
            raise BadRequest(f"adapter {name.strip()!r} appears twice in {spec!r}", param="model",
                             code="invalid_mixture")
        out[name.strip()] = value
    return sorted(out.items())


class AdapterRegistry:
    def __init__(self, model: LoraModel, base_name: str, max_loaded: int = 8, root: str | Path | None = None,
                 max_memory: int | None = None):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be ≥ 1, got {max_loaded}")
        self.model = model  # the served LoraModel, shared with the engine
        self.base_name = base_name
        self.max_loaded = max_loaded
        self.root = Path(root).resolve() if root is not None else None
        self._lock = threading.Lock()
        self._known: dict[str, Path] = {}
        self._mixtures: dict[str, Mixture] = {}
        self._loaded: OrderedDict[str, None] = OrderedDict()  # LRU order: oldest first (worker thread)
        self._stale: set[str] = set()  # deleted while in use: unloaded once no row uses them
        self._rooted: set[str] = set()  # loaded at runtime: every (re)load reads only under root
        self.store = AdapterStore(max_memory)  # host copies of plain-LoRA factors
        self._module_kind: set[str] = set()  # adapters served as modules (variants, ...), not from the pool
        self.loads = 0  # adapters made resident so far (tests and metrics)
        self.evictions = 0  # residents evicted to make room (metrics)
        self.reads = 0  # adapter folders read and validated (registration, or after the store dropped a copy)
        self.read_seconds: list[float] = []  # per read, in order (load time vs count; first 10,000 kept)
        self.install_seconds: list[float] = []  # per pooled residency (the last 10,000 kept)

    # ------------------------------------------------------------------ any thread
    def names(self) -> list[tuple[str, Path, bool]]:
        with self._lock:
            return [(n, p, n in self._loaded) for n, p in self._known.items()]

    def resolve(self, model: str) -> str | None:
        """The adapter key a request's `model` names (None = the base); raises ModelNotFound."""
        if not isinstance(model, str):
            raise BadRequest("model must be a string", param="model")
        if model == self.base_name:
            return None
        with self._lock:
            if model in self._known:
                return model
            if not model.startswith(MIX_PREFIX):
                raise ModelNotFound(f"The model `{model}` does not exist; GET /v1/models lists the base and "
                                    "the adapters", param="model")
            terms = parse_mixture(model)
            missing = [n for n, _ in terms if n not in self._known]
            if missing:
                raise ModelNotFound(f"mixture {model!r} names unknown adapters {missing}", param="model")
            mix = Mixture(tuple(n for n, _ in terms), tuple(w for _, w in terms))
            if mix.name not in self._mixtures and len(self._mixtures) >= MAX_MIXTURES:
                idle = next((k for k in self._mixtures if k not in self._loaded), None)
                if idle is None:
                    raise BadRequest(f"too many distinct mixtures in use (at most {MAX_MIXTURES})", param="model")
                del self._mixtures[idle]
            self._mixtures.setdefault(mix.name, mix)
            return mix.name

    def check_new(self, name: str, path: str) -> Path:
        """Validate an admin load request: a fresh name and a folder under --adapter-root."""
        check_name(name)
        if name == self.base_name:
            raise Conflict(f"{name!r} is the base model's name", param="name")
        if self.root is None:
            raise PermissionDenied("loading adapters at runtime is disabled: start the server with --adapter-root")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise BadRequest("path must be a non-empty string", param="path")
        candidate = Path(path)
        candidate = candidate if candidate.is_absolute() else self.root / candidate
        try:
            resolved = candidate.resolve(strict=True)  # follows symlinks: the real place is checked
        except (OSError, RuntimeError):
            raise NotFound(f"adapter path {path!r} does not exist under the adapter root", param="path") from None
        if not resolved.is_relative_to(self.root):
            raise PermissionDenied(f"adapter path {path!r} is outside the adapter root", param="path",
                                   code="path_outside_root")
        if not (resolved / "adapter_config.json").is_file():
            raise BadRequest(f"{path!r} is not an adapter folder (no adapter_config.json)", param="path")
        return resolved

    # ------------------------------------------------------------------ worker thread
    def add(self, name: str, path: Path, load: bool = True, pinned: frozenset[str] = frozenset(),
            rooted: bool = False) -> bool:
        """Register `name`; load it now if `load` (errors unregister it again). Returns loaded?

        rooted: the folder came from an admin request, so every read of it (now and on each later
        reload) is re-checked against --adapter-root and opened without following symlinks.
        """
        if rooted and self.root is None:
            raise PermissionDenied("loading adapters at runtime is disabled: start the server with --adapter-root")
        with self._lock:
            if name in self._known:
                if self._known[name] == Path(path):
                    return name in self._loaded
                raise Conflict(f"an adapter named {name!r} exists already (from {self._known[name]}); "
                               "DELETE it first", param="name")
            if name in self._stale and name in pinned:
                raise Conflict(f"adapter {name!r} was deleted but running requests still use it; retry shortly",
                               param="name")
            self._known[name] = Path(path)
            if rooted:
                self._rooted.add(name)
            else:
                self._rooted.discard(name)
        if name in self._stale:  # deleted earlier, still in memory: drop the old weights first
            self._unload(name)
            self._stale.discard(name)
        try:
            self._read(name, pinned | {name})  # read and validate once, now
            if not load:
                if name in self._loaded:  # a module-kind adapter: registered, not resident yet
                    self._unload(name)
                return False
            return self.ensure_loaded(name, pinned)
        except BaseException:
            with self._lock:
                self._known.pop(name, None)
                self._rooted.discard(name)
            self.store.discard(name)
            self._module_kind.discard(name)
            if name in self._loaded:
                self._unload(name)
            raise

    def remove(self, name: str, pinned: frozenset[str]) -> None:
        """Forget `name` (and mixtures built from it); unload now, or once no running row uses it."""
        with self._lock:
            if name not in self._known:
                raise NotFound(f"no adapter named {name!r}", param="name", code="adapter_not_found")
            del self._known[name]
            self._rooted.discard(name)
            self.store.discard(name)
            self._module_kind.discard(name)
            dropped = [k for k, m in self._mixtures.items() if name in m.components]
            for key in dropped:
                del self._mixtures[key]
        self._stale.update(k for k in [name, *dropped] if k in self._loaded)
        self.collect(pinned)

    def collect(self, pinned: frozenset[str]) -> None:
        """Unload deleted adapters that no running row uses any more."""
        for key in [k for k in self._stale if k not in pinned]:
            self._unload(key)
            self._stale.discard(key)

    def ensure_loaded(self, key: str | None, pinned: frozenset[str] = frozenset()) -> bool:
        """Make `key` ready for a forward pass. False: no room now (every slot used by running rows)."""
        if key is None:
            return True
        if key in self._stale:
            raise ModelNotFound(f"adapter {key!r} was deleted", param="model")
        if key in self._loaded:
            with self._lock:
                self._loaded.move_to_end(key)
            return True
        protected = pinned | {key}
        if sum(1 for k in self._loaded if k in protected) >= self.max_loaded:
            return False
        with self._lock:
            path, mixture = self._known.get(key), self._mixtures.get(key)
        if mixture is not None:
            self._build_mixture(key, mixture, protected)
        elif path is not None:
            self._load_file(key, protected)
        else:
            raise ModelNotFound(f"adapter {key!r} was deleted", param="model")
        self._evict(protected)
        return True

    def _build_mixture(self, key: str, mixture: Mixture, protected: set[str]) -> None:
        module_parts = [c for c in mixture.components if c in self._module_kind]
        if not module_parts:  # all plain LoRA: one pooled adapter of rank Σ rᵢ, built from the host copies
            self._evict(protected, room_for=1)
            parts = [self._served_copy(c, protected) for c in mixture.components]
            pooled.install(self.model, pooled.mixture(key, parts, mixture.weights))
        elif len(module_parts) < len(mixture.components):
            raise BadRequest(f"mixture {mixture.components} mixes plain LoRA adapters with {module_parts} "
                             "(variants or adapters with extra modules); mix adapters of one kind",
                             param="model", code="invalid_mixture")
        else:
            for component in mixture.components:  # may overflow the cap briefly; trimmed below
                self._load_file(component, protected | set(mixture.components))
            try:
                self.model.add_weighted_adapter(list(mixture.components), list(mixture.weights), key,
                                                combination_type="cat")  # exact: Σ wᵢ·ΔWᵢ
            except (LorakitError, ValueError) as exc:
                raise BadRequest(f"can't build mixture {mixture.components}: {exc}", param="model",
                                 code="invalid_mixture") from None
        with self._lock:
            self._loaded[key] = None

    def _load_file(self, name: str, protected: set[str]) -> None:
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return
            if name not in self._known:
                raise ModelNotFound(f"adapter {name!r} was deleted", param="model")
        self._evict(protected, room_for=1)
        if name in self._module_kind:
            self._read(name, protected)  # a module: loaded from its folder, every check again
            return
        served = self.store.get(name)
        if served is None:  # dropped to stay within --max-adapter-memory: read the folder again
            served = self._read(name, protected)
            if served is None:  # the folder now holds a variant: it was loaded as a module
                return
        start = time.perf_counter()
        pooled.install(self.model, served)
        self.install_seconds.append(time.perf_counter() - start)
        del self.install_seconds[:-10_000]
        self.loads += 1
        with self._lock:
            self._loaded[name] = None

    def _served_copy(self, name: str, protected: set[str]) -> pooled.ServedAdapter:
        served = self.store.get(name)
        if served is None:
            served = self._read(name, protected)
        if served is None:
            raise BadRequest(f"adapter {name!r} can't be part of a pooled mixture", param="model",
                             code="invalid_mixture")
        return served

    def _read(self, name: str, protected: set[str]) -> pooled.ServedAdapter | None:
        """Read and validate `name`'s folder. Plain LoRA: its factors (kept in the store); anything
        else is loaded as a module now (and counts as resident)."""
        with self._lock:
            path = self._known.get(name)
            root = self.root if name in self._rooted else None
        if path is None:
            raise ModelNotFound(f"adapter {name!r} was deleted", param="model")
        start = time.perf_counter()
        try:
            served = prepare_served_adapter(self.model, name, path, root=root)
        except OutsideRootError as exc:
            raise PermissionDenied(f"adapter {name!r}: {exc}", param="path", code="path_outside_root") from None
        except (LorakitError, OSError, ValueError, KeyError, TypeError) as exc:
            raise BadRequest(f"adapter {name!r} failed to load from {path}: {exc}", code="adapter_load_failed") from None
        self.reads += 1
        if len(self.read_seconds) < 10_000:
            self.read_seconds.append(time.perf_counter() - start)
        if served is not None:
            self._module_kind.discard(name)
            self.store.put(served, keep=set(self._loaded) | protected)
            return served
        self._module_kind.add(name)
        self.loads += 1
        with self._lock:
            self._loaded[name] = None
        self._evict(protected | {name})
        return None

    def _evict(self, protected: set[str] | frozenset[str], room_for: int = 0) -> None:
        """Unload least recently used adapters outside `protected` until within the cap."""
        while len(self._loaded) + room_for > self.max_loaded:
            victim = next((k for k in self._loaded if k not in protected), None)
            if victim is None:
                return
            self._unload(victim)
            self.evictions += 1

    def _unload(self, key: str) -> None:
        unload_served_adapter(self.model, key)
        with self._lock:
            self._loaded.pop(key, None)

    def timing_summary(self) -> dict:
        """Registration (read + validate) time vs count, and residency time, in ms (GET /v1/stats)."""
        reads, installs = self.read_seconds, self.install_seconds

        def ms(values: list[float]) -> float | None:
            return round(1e3 * sum(values) / len(values), 3) if values else None

        return {"reads": self.reads, "read_ms_first_10": ms(reads[:10]), "read_ms_last_10": ms(reads[-10:]),
                "read_ms_by_hundred": [ms(reads[i:i + 100]) for i in range(0, len(reads), 100)],
                "install_ms_mean": ms(installs), "install_ms_max": round(1e3 * max(installs), 3) if installs else None,
                "installs": self.loads, "evictions": self.evictions, "host_copies": len(self.store),
                "host_copy_bytes": self.store.nbytes, "host_copies_dropped": self.store.dropped}

    @property
    def loaded(self) -> list[str]:
        """In-memory adapter keys, least recently used first."""
        with self._lock:
            return list(self._loaded)
