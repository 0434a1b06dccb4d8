"""Per-row adapter routing for mixed batches, and the stacked factors the routed forward gathers from.

A mixed batch (``model(ids, adapter_names=[...])``) gives every row its own adapter. Three pieces
make that cost what the rank arithmetic costs, whatever the number of adapters in memory:

* :class:`RouteHolder`: one object shared by every wrapper of a model. A forward sets
  ``holder.current`` once (O(1)), instead of walking every wrapper to set an attribute on each
  (210 wrappers on SmolLM2, every decode step).
* :class:`SlotTable`: each adapter of a model gets a small integer *slot*, the same on every layer
  (slot 0 is "no adapter": the base). :class:`RowRouting` turns the row names into one (N,) slot
  index per forward, computed once and read by every layer.
* :class:`FactorPool`: one per layer, the factors of every adapter with a slot there, stacked:
  ``a`` (S, r_max, in), ``bt`` (S, r_max, out) (Bᵀ), ``scale`` (S,), lower ranks zero-padded and
  slot 0 all zeros. The routed forward takes factors by slot, never touching the other resident
  adapters. Rows all on one adapter use its factors directly. Otherwise the rows are grouped by
  adapter and each group runs through its own A and B in one batched GEMM pair (Punica's SGMV idea
  on plain PyTorch: two rank-r products per row however many adapters the batch mixes), while the
  padding to the largest group stays small (:data:`GROUPED_PADDING`). Skewed batches take either
  each row's own A and B (``bmm`` row by row) or the k distinct adapters' factors side by side
  (rank k·r) with each row masked to its own block; a cost model picks one (:data:`GATHER_COST`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch

from lorakit.errors import AdapterError

# What gathering one factor element costs, in units of one multiply-add of the LoRA product (CPU,
# fp32; read off `lorakit bench --only mixed`: copying a factor is several times dearer per element
# than a multiply-add inside a GEMM). Per-row gathering costs ~N·(GATHER_COST + T) per layer, the
# distinct-adapter blocks ~k·(GATHER_COST + N·T): for decode steps (T = 1) over few adapters the
# blocks win, for prefills and for batches over many adapters the rows do.
GATHER_COST = 4.0

# Rows grouped by adapter (one batched GEMM pair over the k distinct adapters, each group padded to
# the largest) is taken while the padded row count k·m stays within this factor of the routed rows:
# it does the rank arithmetic of each row once, with no per-row copy of the factors. Skewed batches
# (one big group and many single rows) pad too much and fall back to the rows/blocks choice above.
GROUPED_PADDING = 2.0
# ... and while the rows it copies (T tokens in, T out and back) are no more than this times the rank-r
# factors the per-row gather would copy instead: a decode step (T = 1) groups, a long prefill doesn't.
GROUPED_COPY = 1.0

# Gathered operands kept per layer (by batch rows and pool version): a few, so that a server
# alternating a few batch compositions, or a benchmark interleaving them, doesn't rebuild them per call.
OPERAND_CACHE = 4


class RouteHolder:
    """The routing of the forward pass in progress (None outside one), shared by all wrappers."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current: RowRouting | None = None

    @contextlib.contextmanager
    def rows(self, adapter_names: Sequence[str | None] | None, slots: Mapping[str, int],
             pooled: Collection[str] = ()) -> Iterator[None]:
        """Route the forward inside the block: row i through ``adapter_names[i]`` (None: the base).

        `slots` is the model's :class:`SlotTable` mapping (every name must be in it), `pooled` its
        served adapters. ``adapter_names=None`` routes nothing (the active adapters apply).
        """
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n is not None and n not in slots})
        if unknown:
            raise AdapterError(f"adapter_names has unknown adapters {unknown}; adapters: {sorted(slots)}")
        # one shared holder read by every wrapper: O(1) per forward, not a walk over the wrappers
        self.current = RowRouting(adapter_names, slots, pooled)
        try:
            yield
        finally:
            self.current = None


class Routed:
    """Mixin for wrappers: ``self.routing`` reads (and writes) a :class:`RouteHolder`.

    A lone wrapper has its own holder; :class:`~lorakit.core.model.LoraModel` gives all of its
    wrappers one shared holder (:meth:`share_route`), so routing a forward is one assignment.
    """

    @property
    def routing(self) -> RowRouting | None:
        holder = self.__dict__.get("_route")
        return None if holder is None else holder.current

    @routing.setter
    def routing(self, value: RowRouting | None) -> None:
        holder = self.__dict__.get("_route")
        if holder is None:
            holder = self.__dict__["_route"] = RouteHolder()
        holder.current = value

    def share_route(self, holder: RouteHolder) -> None:
        self.__dict__["_route"] = holder  # plain attribute: never saved, moved or counted by nn.Module


class SlotTable:
    """Adapter name -> slot (1, 2, ...), reused after release so the pools stay as small as the peak count."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self._free: list[int] = []

    def assign(self, name: str) -> int:
        if name not in self.slots:
            self.slots[name] = self._free.pop() if self._free else len(self.slots) + 1
        return self.slots[name]

    def release(self, name: str) -> None:
        slot = self.slots.pop(name, None)
        if slot is not None:
            self._free.append(slot)

    def clear(self) -> None:
        self.slots.clear()
        self._free.clear()


class RowRouting:
    """Which adapter each batch row uses: ``names[row_index[i]]`` (-1: the base), and its slot.

    ``row_slot`` (N,) holds each row's slot (0 for the base); without a slot table slots follow
    ``names`` (1, 2, ...). ``pooled`` names adapters that live only in the layers' factor pools
    (served adapters, :mod:`lorakit.core.pooled`); ``pooled_row_slot`` keeps just their rows.
    """

    def __init__(self, row_adapters: Sequence[str | None], slots: Mapping[str, int] | None = None,
                 pooled: Collection[str] = ()):
        self.names = sorted({n for n in row_adapters if n is not None})
        lookup = {n: i for i, n in enumerate(self.names)}
        self.row_index = torch.tensor([lookup[n] if n is not None else -1 for n in row_adapters], dtype=torch.long)
        if slots is None:
            slots = {n: i + 1 for i, n in enumerate(self.names)}
        self.slots = {n: slots[n] for n in self.names}
        self.row_slot = torch.tensor([self.slots[n] if n is not None else 0 for n in row_adapters], dtype=torch.long)
        self.max_slot = max(self.slots.values(), default=0)
        self.pooled = frozenset(n for n in self.names if n in pooled)
        self.pooled_row_slot = (torch.tensor([self.slots[n] if n in self.pooled else 0 for n in row_adapters],
                                             dtype=torch.long) if self.pooled else None)
        self._masks: dict = {}
        self._on_device: dict = {}
        self._groups: dict = {}
        self._keys: dict = {}
        self._sizes: dict = {}
        self._only: dict = {}

    def on(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`index` moved to `device` once per forward (every layer shares the copy)."""
        key = (id(index), device)
        if key not in self._on_device:  # the source is kept in the entry, so its id can't be reused
            self._on_device[key] = (index, index.to(device))
        return self._on_device[key][1]

    def key(self, row_slot: torch.Tensor) -> tuple:
        """A row-slot index as a hashable value (the same batch in the next step gives the same key)."""
        entry = self._keys.get(id(row_slot))
        if entry is None:
            entry = self._keys[id(row_slot)] = (row_slot, tuple(row_slot.tolist()))
        return entry[1]

    def only_slot(self, row_slot: torch.Tensor) -> int | None:
        """The slot every row of `row_slot` uses when they all use the same non-zero one, else None."""
        entry = self._only.get(id(row_slot))
        if entry is None:  # once per forward: every layer asks
            key = self.key(row_slot)
            first = key[0] if key else 0
            entry = self._only[id(row_slot)] = (row_slot, first if first and key.count(first) == len(key) else None)
        return entry[1]

    def group_sizes(self, row_slot: torch.Tensor) -> list[int]:
        """Rows per distinct non-zero slot of `row_slot`, in the order of :meth:`groups`' slots."""
        entry = self._sizes.get(id(row_slot))
        if entry is None:  # once per forward: every layer reads the same list
            counts: dict[int, int] = {}
            for v in self.key(row_slot):
                if v:
                    counts[v] = counts.get(v, 0) + 1
            entry = self._sizes[id(row_slot)] = (row_slot, [counts[v] for v in sorted(counts)])
        return entry[1]

    def groups(self, row_slot: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct non-zero slots (k,), one-hot (N, k) bool) of a row-slot index, once per forward."""
        key = (id(row_slot), device)
        if key not in self._groups:
            slots = torch.unique(row_slot[row_slot > 0])  # (k,) sorted
            onehot = row_slot[:, None] == slots[None, :]  # (N, k)
            self._groups[key] = (row_slot, slots.to(device), onehot.to(device))
        return self._groups[key][1], self._groups[key][2]

    def mask(self, owners: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) 0/1: row i keeps rank column j when column j belongs to row i's adapter.

        `owners` lists (adapter index, rank) in concatenation order; layers with the same adapter
        set share one mask per forward.
        """
        key = (tuple(owners), device, dtype)
        if key not in self._masks:
            col_owner = torch.cat([torch.full((rank,), g, dtype=torch.long) for g, rank in owners])  # (K,)
            self._masks[key] = (self.row_index[:, None] == col_owner[None, :]).to(device=device, dtype=dtype)
        return self._masks[key]


class FactorPool:
    """One layer's stacked factors by slot: a (S, r, in), b (S, out, r), scale (S,); slot 0 stays zero.

    Written two ways: served adapters write their factors once when they become resident
    (:mod:`lorakit.core.pooled`); a layer's own adapter modules are copied in lazily before a
    routed forward and re-copied only when a factor changed (its version counter, storage or
    scaling moved: ``stamps``). Not a buffer: never saved, moved or counted with the model.
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype):
        self.a = torch.zeros(2, 1, in_features, device=device, dtype=dtype)  # (S, r, in)
        self.bt = torch.zeros(2, 1, out_features, device=device, dtype=dtype)  # (S, r, out): Bᵀ, so both
        # a slot's block and k slots side by side are contiguous views
        self.scale = torch.zeros(2, device=device, dtype=dtype)  # (S,)
        self._scales: list[float] = [0.0, 0.0]  # the same as Python floats: the single-adapter path reads one
        self.owner: dict[int, str] = {}  # slot -> adapter name written there
        self.slot_of: dict[str, int] = {}  # the reverse: clearing is O(1), not a scan over the slots
        self.stamps: dict[str, tuple] = {}  # module adapter name -> what its copy was made from
        self.version = 0  # moves on every change: the gathered operands below are cached against it
        # gathered operands of the last few routed calls by (rows, pool version, ...): a decode step's batch
        # repeats step after step, and a server alternates a few batch shapes, so they are reused until the
        # rows or the pool change
        self._operands: dict[tuple, tuple] = {}
        self._operands_version = 0

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    def reserve(self, slot: int) -> None:
        """Room for slots up to `slot` (rows routed to a slot nobody wrote here read zeros)."""
        self._fit(slot, 0)

    def _fit(self, slot: int, rank: int) -> None:
        cap, r_max = self.a.shape[0], self.a.shape[1]
        if slot < cap and rank <= r_max:
            return
        new_cap = max(cap, 1 << slot.bit_length())  # a power of two above slot: amortised growth
        new_r = max(r_max, rank)
        a = self.a.new_zeros(new_cap, new_r, self.a.shape[2])
        bt = self.bt.new_zeros(new_cap, new_r, self.bt.shape[2])
        scale = self.scale.new_zeros(new_cap)
        a[:cap, :r_max] = self.a
        bt[:cap, :r_max] = self.bt
        scale[:cap] = self.scale
        self.a, self.bt, self.scale = a, bt, scale
        self._scales += [0.0] * (new_cap - cap)
        self.version += 1

    @torch.no_grad()
    def write(self, slot: int, name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Put A (r, in) and B (out, r) of adapter `name` into `slot`."""
        rank = lora_a.shape[0]
        self._fit(slot, rank)
        self.a[slot, :rank].copy_(lora_a)
        self.bt[slot, :rank].copy_(lora_b.T)
        if rank < self.a.shape[1]:  # a lower-rank adapter in a reused slot: clear the tail
            self.a[slot, rank:].zero_()
            self.bt[slot, rank:].zero_()
        self.scale[slot] = scaling
        self._scales[slot] = float(self.scale[slot])  # as stored: rounded to the pool's dtype
        previous = self.owner.get(slot)
        if previous is not None and previous != name:
            self.slot_of.pop(previous, None)
            self.stamps.pop(previous, None)
        self.owner[slot] = name
        self.slot_of[name] = slot
        self.version += 1

    @torch.no_grad()
    def clear(self, name: str) -> None:
        """Zero the slot `name` occupies here (rows routed to it then get no delta on this layer)."""
        self.stamps.pop(name, None)
        slot = self.slot_of.pop(name, None)
        if slot is not None and self.owner.get(slot) == name:
            del self.owner[slot]
            self.a[slot].zero_()
            self.bt[slot].zero_()
            self.scale[slot] = 0
            self._scales[slot] = 0.0
            self.version += 1

    def sync(self, slot: int, name: str, adapter, lora_a: torch.Tensor | None = None,
             lora_b: torch.Tensor | None = None) -> None:
        """Copy a module adapter's factors into `slot` unless the copy there is still current.

        `lora_a`/`lora_b`: the adapter's factors when the caller has them at hand (saves the lookups).
        """
        if lora_a is None or lora_b is None:
            lora_a, lora_b = adapter.lora_a, adapter.lora_b
        stamp = (slot, id(adapter), lora_a._version, lora_b._version, lora_a.data_ptr(), lora_b.data_ptr(),
                 adapter.scaling)
        if self.stamps.get(name) == stamp and self.owner.get(slot) == name:
            return
        if self.slot_of.get(name, slot) != slot:
            self.clear(name)  # the adapter moved to another slot (released and assigned again)
        self.write(slot, name, lora_a.detach(), lora_b.detach(), adapter.scaling)
        self.stamps[name] = stamp

    def forward(self, x: torch.Tensor, result: torch.Tensor, routing: RowRouting,
                row_slot: torch.Tensor) -> torch.Tensor:
        """``result[i] + scale[k]·(x[i]·A[k]ᵀ)·B[k]ᵀ`` with ``k = row_slot[i]`` (0: nothing), every row at once.

        x (N, ..., in), result (N, ..., out), row_slot (N,) on the CPU.
        """
        n = x.shape[0]
        if row_slot.numel() != n:
            raise ValueError(
                f"adapter_names has {row_slot.numel()} entries but this layer sees a batch of {n} rows; "
                "pass one adapter name per row of the input batch"
            )
        only = routing.only_slot(row_slot)
        if (only is not None and result.dtype == self.dtype and result.is_contiguous()
                and not torch.is_grad_enabled()):
            # every row on one adapter (a batch-1 decode step, or one tenant): its own factors, no gather or
            # mask, summed into the fresh base output in place; the same products and rounding as the blocks below
            a_t, bt, scale = self._cached(("only", only, self.version, x.device),
                                          lambda: (self.a[only].T, self.bt[only], self._scales[only]))
            u = torch.mm(x.reshape(-1, x.shape[-1]).to(self.dtype), a_t).mul_(scale)
            result.view(-1, result.shape[-1]).addmm_(u, bt)
            return result
        x3 = x.reshape(n, -1, x.shape[-1]).to(self.dtype)  # (N, T, in)
        slots, onehot = routing.groups(row_slot, x.device)
        k, t = slots.numel(), x3.shape[1]
        if k == 0:
            return result
        sizes = routing.group_sizes(row_slot)  # rows per distinct adapter
        m = max(sizes)
        r, d_in, d_out = self.a.shape[1], self.a.shape[2], self.bt.shape[2]
        # grouping copies each routed row's T inputs in and T outputs out (twice); the per-row gather copies
        # each row's r-rank factors instead (cached while the batch repeats): long rows (prefill) keep the latter
        if k * m <= GROUPED_PADDING * sum(sizes) and t * (d_in + 2 * d_out) <= GROUPED_COPY * r * (d_in + d_out):
            mode = "grouped"
        else:
            mode = "blocks" if k * (GATHER_COST + n * t) <= n * (GATHER_COST + t) else "rows"
        key = (routing.key(row_slot), self.version, x.device, mode)
        if mode == "grouped":
            return self._grouped_forward(x3, result, k, m, *self._cached(
                key, lambda: self._grouped(routing.on(row_slot, x.device), slots, m)))
        operands = self._cached(key, lambda: self._blocks(slots, onehot) if mode == "blocks"
                                else self._rows(routing.on(row_slot, x.device)))
        first, keep, second = operands
        out3 = result.reshape(n, t, -1)
        if mode == "blocks":  # (N·T, in) · (in, k·r), masked per row to its own block, · (k·r, out), added in the GEMM
            u = torch.matmul(x3, first) * keep  # (N, T, k·r)
            delta = torch.addmm(out3.reshape(n * t, -1).to(self.dtype), u.view(n * t, -1), second)
        else:  # each row through its own A, then its own B, added in the batched GEMM
            u = torch.bmm(x3, first) * keep  # (N, T, r)
            delta = torch.baddbmm(out3.to(self.dtype), u, second)
        return delta.view(result.shape).to(result.dtype)

    def _cached(self, key: tuple, build) -> tuple:
        """The operands cached under `key`, built on a miss; the oldest of more than a few is dropped."""
        if self._operands_version != self.version:  # the pool changed: every cached operand is stale
            self._operands.clear()
            self._operands_version = self.version
        operands = self._operands.get(key)
        if operands is None:
            if len(self._operands) >= OPERAND_CACHE:
                del self._operands[next(iter(self._operands))]
            operands = self._operands[key] = build()
        return operands

    def _grouped_forward(self, x3: torch.Tensor, result: torch.Tensor, k: int, m: int, take: torch.Tensor,
                         a_g: torch.Tensor, sbt_g: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """Rows grouped by adapter, one batched GEMM pair over the k groups (Punica's SGMV on plain PyTorch).

        Each group's padding positions read some row and get a rank-r product of exactly zero, so the
        expansion of every padded position is added straight into the output rows `take` names: the
        real rows get their delta, a padded position adds 0 (one ``index_add_``, no second gather).
        """
        n, t = x3.shape[0], x3.shape[1]
        xg = x3.index_select(0, take).view(k, m * t, -1)  # (k, m·T, in): each adapter's rows, padded to m
        u = torch.bmm(xg, a_g)  # (k, m·T, r)
        if padding is not None:  # masked_fill, not a product with 0/1: a padded row's inf/nan must not leak
            u.view(k, m, t, -1).masked_fill_(padding, 0)
        delta = torch.bmm(u, sbt_g).view(k * m, t, -1)  # (k·m, T, out): s·(x·Aᵀ)·Bᵀ per group
        if result.dtype == self.dtype and result.is_contiguous() and not torch.is_grad_enabled():
            result.view(n, t, -1).index_add_(0, take, delta)  # a view of the fresh base output: in place
            return result
        out = result.reshape(n, t, -1).to(self.dtype, copy=True).index_add_(0, take, delta)
        return out.view(result.shape).to(result.dtype)

    def _grouped(self, row_slot: torch.Tensor, slots: torch.Tensor, m: int):
        """take (k·m,) row of each padded group position, Aᵀ (k, in, r), s·Bᵀ (k, r, out), padding (k, m, 1, 1) or None.

        A padded position takes its group's first row (its product is zeroed before it is added back).
        """
        k = slots.numel()
        take = torch.zeros(k, m, dtype=torch.long, device=row_slot.device)
        padding = torch.zeros(k, m, 1, 1, dtype=torch.bool, device=row_slot.device)
        for j in range(k):
            members = (row_slot == slots[j]).nonzero().squeeze(1)
            take[j, :members.numel()] = members
            take[j, members.numel():] = members[0]
            padding[j, members.numel():] = True
        a_g = self.a.index_select(0, slots).transpose(1, 2).contiguous()
        sbt_g = self.bt.index_select(0, slots) * self.scale.index_select(0, slots).view(-1, 1, 1)
        return take.view(-1), a_g, sbt_g, padding if bool(padding.any()) else None

    def _rows(self, row_slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's own factors: Aᵀ (N, in, r), scale (N, 1, 1), Bᵀ (N, r, out)."""
        a_t = self.a.index_select(0, row_slot).transpose(1, 2)
        return a_t, self.scale.index_select(0, row_slot).view(-1, 1, 1), self.bt.index_select(0, row_slot)

    def _blocks(self, slots: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k distinct adapters side by side: Aᵀ (in, k·r), per-row block mask x scale (N, 1, k·r), Bᵀ (k·r, out)."""
        k, r = slots.numel(), self.a.shape[1]
        a_t = self.a.index_select(0, slots).view(k * r, -1).T
        keep = (onehot.to(self.dtype) * self.scale.index_select(0, slots)).repeat_interleave(r, dim=1)  # (N, k·r)
        return a_t, keep[:, None, :], self.bt.index_select(0, slots).view(k * r, -1)
