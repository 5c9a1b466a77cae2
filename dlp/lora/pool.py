"""AdapterPool: which adapters are where (disk catalogue -> host tier -> device slots).

Device tier: for each target module one preallocated stack ``A [S, R, in]`` and
``B^T [S, R, out]`` (R = the pool's max rank; ranks below R are zero-padded; a free slot is
zeros). A slot holds one adapter for every module at once, so "slot s" means the same adapter
in every layer. Loading an adapter = copying its rank rows into slot views (one H2D copy to a
staging buffer + one multi-tensor copy on CUDA; never a new allocation).

Host tier: recently used adapters already converted to the pool dtype, with B transposed and
rank_pattern/alpha_pattern scalings folded in, in one (pinned, on CUDA) flat buffer each.

Catalogue: name -> adapter directory (validated by ``load_adapter``) or in-memory adapter.

Leases pin adapters: a pinned adapter is never evicted, so a running batch keeps its slots.
All state changes happen under one threading lock with no awaits inside, which makes the pool
safe for concurrent asyncio tasks *and* threads; disk reads run in a worker thread so they do
not stall the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlp.errors import AdapterValidationError, DlpError, InvalidMixError
from dlp.lora.adapter import (
    CONFIG_FILE,
    LoraAdapter,
    base_linear_shapes,
    load_adapter,
    module_matches,
)
from dlp.lora.fused import LoraBatchContext
from dlp.lora.host import HostAdapter, HostTier, to_host
from dlp.routing.mix import AdapterMix


class PoolCapacityError(DlpError):
    """More distinct adapters requested at once than the pool has slots (``max_fit``)."""

    def __init__(self, message: str, *, requested: int, max_fit: int) -> None:
        super().__init__(message)
        self.requested = requested
        self.max_fit = max_fit


class PoolBusyError(PoolCapacityError):
    """The adapters would fit, but slots are pinned by other leases right now
    (``acquire(wait=False)`` or a timeout). ``max_fit`` = how many could be placed now."""


class UnknownAdapterError(InvalidMixError):
    """A name that is not in the catalogue."""


class AdapterInUseError(DlpError):
    """Replacing an adapter that running batches still use."""


@dataclass
class _CatalogueEntry:
    name: str
    path: Path | None
    adapter: LoraAdapter | None  # in-memory registrations keep the object
    generation: int
    removing: bool = False


class PoolLease:
    """Adapters pinned in device slots for as long as the lease is held."""

    _ids = itertools.count(1)

    def __init__(
        self, pool: AdapterPool, slots: Mapping[str, int], scalings: Mapping[str, float]
    ) -> None:
        self.pool = pool
        self.lease_id = next(self._ids)
        self.slots = dict(slots)
        self.scalings = dict(scalings)
        self.released = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.slots))

    def slot_of(self, name: str) -> int:
        try:
            return self.slots[name]
        except KeyError:
            raise InvalidMixError(f"adapter {name!r} is not part of this lease") from None

    def scaling(self, name: str) -> float:
        try:
            return self.scalings[name]
        except KeyError:
            raise InvalidMixError(f"adapter {name!r} is not part of this lease") from None

    def release(self) -> None:
        self.pool.release(self)

    async def __aenter__(self) -> PoolLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __enter__(self) -> PoolLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PoolLease(id={self.lease_id}, slots={self.slots}, released={self.released})"


@dataclass
class _Counters:
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    host_loads: int = 0
    waits: int = 0


class AdapterPool:
    """Device slots + host tier + disk catalogue of LoRA adapters for one base model.

    base_shapes:    ``{module: (in, out)}`` of the base model's linear layers
                    (:func:`base_linear_shapes`); ``AdapterPool.for_model`` fills it in.
    target_modules: which modules get slots (PEFT target_modules rule: names matched as dotted
                    suffixes, or one regex). Adapters targeting anything else are refused.
    max_rank:       slot rank R; adapters with a higher rank are refused.
    n_slots / device_budget_bytes: number of device slots, given directly or as a byte budget.
    host_budget_bytes: size of the host tier (LRU).
    """

    def __init__(
        self,
        base_shapes: Mapping[str, tuple[int, int]],
        *,
        target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
        max_rank: int = 16,
        n_slots: int | None = None,
        device_budget_bytes: int | None = None,
        host_budget_bytes: int = 2 << 30,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_rank < 1:
            raise DlpError(f"max_rank must be >= 1, got {max_rank}")
        self.base_shapes = dict(base_shapes)
        self.target_modules = (
            target_modules if isinstance(target_modules, str) else tuple(target_modules)
        )
        self.modules: tuple[str, ...] = tuple(
            sorted(m for m in self.base_shapes if module_matches(self.target_modules, m))
        )
        if not self.modules:
            raise DlpError(f"target_modules {self.target_modules!r} match no linear layer")
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.dtype = dtype
        element = torch.empty((), dtype=dtype).element_size()
        self.slot_bytes = sum(
            max_rank * (d_in + d_out) * element
            for d_in, d_out in (self.base_shapes[m] for m in self.modules)
        )
        if n_slots is None:
            if device_budget_bytes is None:
                raise DlpError("give n_slots or device_budget_bytes")
            n_slots = device_budget_bytes // self.slot_bytes
        if n_slots < 1:
            raise DlpError(
                f"device budget holds no adapter slot (one slot needs {self.slot_bytes} bytes)"
            )
        self.n_slots = int(n_slots)
        self.host_budget_bytes = int(host_budget_bytes)
        self._pin_host = self.device.type == "cuda" and torch.cuda.is_available()

        self._a: dict[str, torch.Tensor] = {}
        self._b_t: dict[str, torch.Tensor] = {}
        for module in self.modules:
            d_in, d_out = self.base_shapes[module]
            self._a[module] = torch.zeros(
                self.n_slots, max_rank, d_in, dtype=dtype, device=self.device
            )
            self._b_t[module] = torch.zeros(
                self.n_slots, max_rank, d_out, dtype=dtype, device=self.device
            )
        self._staging: torch.Tensor | None = None
        # cached view lists (building ~2 views per module per load costs more than the copy)
        self._staging_views: dict[tuple[tuple[str, int], ...], list[torch.Tensor]] = {}
        self._dst_views: dict[tuple[int, tuple[tuple[str, int], ...]], list[torch.Tensor]] = {}

        self._lock = threading.RLock()
        self._slot_cond = threading.Condition(self._lock)
        self._catalogue: dict[str, _CatalogueEntry] = {}
        self._generations = itertools.count(1)
        self._host = HostTier(self.host_budget_bytes)
        self._loading: dict[str, concurrent.futures.Future[HostAdapter]] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self._slot_owner: list[str | None] = [None] * self.n_slots
        self._slot_ranks: list[dict[str, int]] = [{} for _ in range(self.n_slots)]
        self._slot_scaling: list[float] = [0.0] * self.n_slots
        self._slot_rank: list[int] = [0] * self.n_slots
        # Bumped whenever a slot's tensors change (load, zeroing), so that a consumer holding
        # a copy of the slots (the engine's merged decode weights) re-copies only those.
        self._slot_versions: list[int] = [0] * self.n_slots
        self._pins: Counter[str] = Counter()
        self._leases: dict[int, PoolLease] = {}
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._counters = _Counters()
        self.last_load_ms: float | None = None

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> AdapterPool:
        """A pool shaped for ``model`` (device and dtype default to the model's)."""
        param = next(model.parameters())
        kwargs.setdefault("device", param.device)
        kwargs.setdefault("dtype", param.dtype)
        return cls(base_linear_shapes(model), **kwargs)

    # ----------------------------------------------------------------- stacks (device tier)
    def a_stack(self, module: str) -> torch.Tensor:
        """``[S, R, in]`` A of every slot for ``module``."""
        return self._stack(self._a, module)

    def b_stack(self, module: str) -> torch.Tensor:
        """``[S, out, R]`` B of every slot (a transposed view of the [S, R, out] storage)."""
        return self._stack(self._b_t, module).transpose(1, 2)

    def b_t_stack(self, module: str) -> torch.Tensor:
        """``[S, R, out]`` B transposed, the storage layout (slot rank rows contiguous)."""
        return self._stack(self._b_t, module)

    def _stack(self, stacks: dict[str, torch.Tensor], module: str) -> torch.Tensor:
        try:
            return stacks[module]
        except KeyError:
            raise DlpError(f"the pool has no slots for module {module!r}") from None

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * self.n_slots

    # ------------------------------------------------------------------------- catalogue
    def register(
        self, name: str, path: str | Path, replace: bool = False, *, validate: bool = True
    ) -> None:
        """Add an adapter directory under ``name``. With ``validate`` (default) it is loaded
        and checked now (and kept in the host tier), so a bad adapter fails at registration."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            # load_adapter words the precise reason (missing dir, missing config, ...).
            load_adapter(path, name=name, base_shapes=self.base_shapes, max_rank=self.max_rank)
        entry = self._add_entry(name, path, None, replace)
        if validate:
            try:
                self._host_entry(name)
            except AdapterValidationError:
                with self._lock:
                    if self._catalogue.get(name) is entry:
                        del self._catalogue[name]
                raise

    def add(self, adapter: LoraAdapter, replace: bool = False) -> None:
        """Register an in-memory adapter (tests, benchmarks, freshly trained adapters)."""
        self._check_adapter(adapter, source=f"adapter {adapter.name!r}")
        self._add_entry(adapter.name, None, adapter, replace)

    def register_dir(self, root: str | Path) -> list[str]:
        """Register every adapter directory directly under ``root`` (name = directory name)."""
        root = Path(root)
        names = []
        for sub in sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()):
            self.register(sub.name, sub, replace=True)
            names.append(sub.name)
        return names

    def _add_entry(
        self, name: str, path: Path | None, adapter: LoraAdapter | None, replace: bool
    ) -> _CatalogueEntry:
        if not isinstance(name, str) or not name or "," in name or "=" in name:
            raise InvalidMixError(
                f"adapter name {name!r} must be non-empty, without ',' or '='", field="name"
            )
        with self._lock:
            old = self._catalogue.get(name)
            if old is not None:
                if not old.removing and not replace:
                    raise DlpError(f"adapter {name!r} is already registered (use replace)")
                if self._pins[name]:  # also a removed-but-still-running one: its slot is live
                    raise AdapterInUseError(
                        f"adapter {name!r} is in use by a running batch; retry once it finishes"
                    )
                self._forget(name)
            entry = _CatalogueEntry(name, path, adapter, next(self._generations))
            self._catalogue[name] = entry
            return entry

    def unregister(self, name: str) -> bool:
        """Remove ``name``. If a running batch pins it, removal is deferred until its lease is
        released (new acquires already see it as unknown). Returns True if removed now."""
        with self._lock:
            entry = self._catalogue.get(name)
            if entry is None or entry.removing:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            if self._pins[name]:
                entry.removing = True
                return False
            del self._catalogue[name]
            self._forget(name)
            return True

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, e in self._catalogue.items() if not e.removing)

    def path_of(self, name: str) -> Path | None:
        with self._lock:
            return self._entry(name).path

    def _entry(self, name: str) -> _CatalogueEntry:
        entry = self._catalogue.get(name)
        if entry is None or entry.removing:
            known = sorted(n for n, e in self._catalogue.items() if not e.removing)
            raise UnknownAdapterError(
                f"unknown adapter {name!r} (registered: {', '.join(known[:20]) or 'none'})"
            )
        return entry

    def _forget(self, name: str) -> None:
        """Drop every copy of ``name`` (caller holds the lock; name is not pinned)."""
        self._host.drop(name)
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._slot_owner[slot] = None  # stale rows are zeroed/overwritten on the next load
            self._zero_slot(slot)

    # ------------------------------------------------------------------------- host tier
    def _check_adapter(self, adapter: LoraAdapter, source: str) -> None:
        for module, (a, b) in adapter.weights.items():
            if module not in self.base_shapes:
                raise AdapterValidationError(f"{source}: unknown target module {module!r}")
            if module not in self._a:
                raise AdapterValidationError(
                    f"{source}: targets module {module!r}, but this server only serves LoRA on "
                    f"{self.target_modules!r}"
                )
            d_in, d_out = self.base_shapes[module]
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise AdapterValidationError(
                    f"{source}: module {module!r} shapes A{tuple(a.shape)} B{tuple(b.shape)} do "
                    f"not fit the base layer {d_in}->{d_out}"
                )
            if a.shape[0] > self.max_rank:
                raise AdapterValidationError(
                    f"{source}: rank {a.shape[0]} is above the maximum rank {self.max_rank}"
                )

    def _host_entry(self, name: str) -> HostAdapter:
        """Host copy of ``name``, loading it from disk once even with concurrent callers.
        Runs the disk read outside the lock (call it from a worker thread in async code)."""
        with self._lock:
            entry = self._entry(name)
            host = self._host.get(name, entry.generation)
            if host is not None:
                return host
            pending = self._loading.get(name)
            owner = pending is None
            if owner:
                pending = concurrent.futures.Future()
                self._loading[name] = pending
        if not owner:
            return pending.result()
        try:
            if entry.adapter is not None:
                adapter = entry.adapter
            else:
                adapter = load_adapter(
                    entry.path,
                    name=name,
                    base_shapes=self.base_shapes,
                    max_rank=self.max_rank,
                    dtype=self.dtype,
                )
                self._check_adapter(adapter, source=f"adapter {entry.path}")
            host = to_host(
                adapter,
                self.base_shapes,
                self.dtype,
                generation=entry.generation,
                pin=self._pin_host,
            )
        except BaseException as exc:
            with self._lock:
                self._loading.pop(name, None)
            pending.set_exception(exc)
            raise
        with self._lock:
            self._loading.pop(name, None)
            self._counters.host_loads += 1
            current = self._catalogue.get(name)
            if current is not None and current.generation == entry.generation:
                self._host.put(host)
        pending.set_result(host)
        return host

    # ----------------------------------------------------------------------- device slots
    def _slot_views(self, slot: int, layout: tuple[tuple[str, int], ...]) -> list[torch.Tensor]:
        key = (slot, layout)
        views = self._dst_views.get(key)
        if views is None:
            if len(self._dst_views) > 8 * self.n_slots + 64:
                self._dst_views.clear()  # many distinct layouts: keep the cache bounded
            views = []
            for module, rank in layout:
                views += [self._a[module][slot, :rank], self._b_t[module][slot, :rank]]
            self._dst_views[key] = views
        return views

    def _zero_slot(self, slot: int) -> None:
        views = []
        for module, rank in self._slot_ranks[slot].items():
            views += [self._a[module][slot, :rank], self._b_t[module][slot, :rank]]
        if views:
            torch._foreach_zero_(views)
        self._slot_ranks[slot] = {}
        self._slot_versions[slot] += 1

    def _copy_into_slot(self, slot: int, host: HostAdapter) -> None:
        """Write ``host`` into ``slot``: its rank rows are copied, rows a previous occupant
        left beyond the new ranks (or in modules it does not target) are zeroed.

        Per load: (CUDA) one H2D copy of the flat host buffer into a staging buffer, then one
        multi-tensor copy into the slot views. View lists are cached per layout, so the Python
        work does not scale with module count after the first load of a layout.
        """
        previous = self._slot_ranks[slot]
        ranks = host.ranks()
        if previous and previous != ranks:
            stale = []
            for module, old_rank in previous.items():
                new_rank = ranks.get(module, 0)
                if old_rank > new_rank:
                    stale += [
                        self._a[module][slot, new_rank:old_rank],
                        self._b_t[module][slot, new_rank:old_rank],
                    ]
            if stale:
                torch._foreach_zero_(stale)
        if self.device.type == "cpu":
            sources = host.own_views
        else:
            numel = host.flat.numel()
            if self._staging is None or self._staging.numel() < numel:
                self._staging = torch.empty(numel, dtype=self.dtype, device=self.device)
                self._staging_views.clear()
            self._staging[:numel].copy_(host.flat, non_blocking=host.flat.is_pinned())
            sources = self._staging_views.get(host.layout)
            if sources is None:
                sources = host.view_list(self._staging[:numel])
                self._staging_views[host.layout] = sources
        torch._foreach_copy_(self._slot_views(slot, host.layout), sources)
        self._slot_versions[slot] += 1
        self._slot_ranks[slot] = ranks
        self._slot_scaling[slot] = host.scaling
        self._slot_rank[slot] = host.rank

    def _try_place(self, names: Sequence[str], hosts: Mapping[str, HostAdapter]) -> PoolLease | int:
        """Place and pin ``names``; returns the lease, or how many could be placed now."""
        for name in names:
            entry = self._entry(name)  # unknown / removed while we waited
            host = hosts.get(name)
            slot = self._resident.get(name)
            if slot is None and (host is None or host.generation != entry.generation):
                raise _Retry(name)
        wanted = set(names)
        missing = [n for n in names if n not in self._resident]
        free = [s for s, owner in enumerate(self._slot_owner) if owner is None]
        evictable = [n for n in self._resident if not self._pins[n] and n not in wanted]
        if len(missing) > len(free) + len(evictable):
            return len(names) - len(missing) + len(free) + len(evictable)
        for name in names:
            if name in self._resident:
                self._counters.hits += 1
                self._resident.move_to_end(name)
        start = time.perf_counter()
        loaded_bytes = 0
        for name in missing:
            if free:
                slot = free.pop(0)
            else:
                victim = evictable.pop(0)  # least recently used unpinned adapter
                slot = self._resident.pop(victim)
                self._slot_owner[slot] = None
                self._counters.evictions += 1
            self._copy_into_slot(slot, hosts[name])
            self._slot_owner[slot] = name
            self._resident[name] = slot
            self._host.touch(name)
            self._counters.loads += 1
            loaded_bytes += hosts[name].nbytes
        if missing:
            elapsed = time.perf_counter() - start
            self._counters.load_seconds += elapsed
            self._counters.bytes_loaded += loaded_bytes
            self.last_load_ms = elapsed * 1e3
        for name in names:
            self._pins[name] += 1
        slots = {n: self._resident[n] for n in names}
        lease = PoolLease(self, slots, {n: self._slot_scaling[slots[n]] for n in names})
        self._leases[lease.lease_id] = lease
        return lease

    def _normalise(self, names: Collection[str] | AdapterMix) -> list[str]:
        if isinstance(names, AdapterMix):
            names = names.names
        if isinstance(names, str):
            names = [names]
        unique = sorted(set(names))
        with self._lock:
            for name in unique:
                self._entry(name)
        if len(unique) > self.n_slots:
            raise PoolCapacityError(
                f"{len(unique)} distinct adapters requested at once, the pool has "
                f"{self.n_slots} slots: split the batch (plan_batches)",
                requested=len(unique),
                max_fit=self.n_slots,
            )
        return unique

    def _cached_hosts(self, names: Sequence[str]) -> tuple[dict[str, HostAdapter], list[str]]:
        hosts, need = {}, []
        with self._lock:
            for name in names:
                entry = self._entry(name)
                host = self._host.get(name, entry.generation, count=False)
                if host is not None:
                    hosts[name] = host
                elif name not in self._resident:
                    need.append(name)
        return hosts, need

    async def acquire(
        self,
        names: Collection[str] | AdapterMix,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> PoolLease:
        """Pin ``names`` in device slots (loading what is missing) and return the lease.

        Raises UnknownAdapterError for unregistered names, PoolCapacityError when more distinct
        adapters are asked for than slots exist (``max_fit`` says how many fit: split the
        batch), PoolBusyError when ``wait`` is False (or ``timeout`` passes) and other leases
        pin the slots needed. Otherwise waits until enough slots are released.
        """
        unique = self._normalise(names)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            hosts, need = self._cached_hosts(unique)
            if need:
                loaded = await asyncio.gather(
                    *(asyncio.to_thread(self._host_entry, n) for n in need)
                )
                hosts.update(zip(need, loaded, strict=True))
            with self._lock:
                try:
                    placed = self._try_place(unique, hosts)
                except _Retry:
                    continue
                if isinstance(placed, PoolLease):
                    return placed
                if not wait or (deadline is not None and loop.time() >= deadline):
                    raise self._busy(unique, placed)
                waiter: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, waiter))
                self._counters.waits += 1
            try:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                with self._lock:
                    self._async_waiters = [w for w in self._async_waiters if w[1] is not waiter]
                # one last try happens at the top of the loop; the deadline check raises.

    def acquire_sync(
        self,
        names: Collection[str] | AdapterMix,
        *,
        wait: bool = True,
        timeout: float | None = None,
    ) -> PoolLease:
        """Blocking :meth:`acquire` for threads without an event loop."""
        unique = self._normalise(names)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            hosts, need = self._cached_hosts(unique)
            for name in need:
                hosts[name] = self._host_entry(name)
            with self._lock:
                try:
                    placed = self._try_place(unique, hosts)
                except _Retry:
                    continue
                if isinstance(placed, PoolLease):
                    return placed
                remaining = None if deadline is None else deadline - time.monotonic()
                if not wait or (remaining is not None and remaining <= 0):
                    raise self._busy(unique, placed)
                self._counters.waits += 1
                self._slot_cond.wait(remaining)

    def _busy(self, names: Sequence[str], fits: int) -> PoolBusyError:
        return PoolBusyError(
            f"{len(names)} adapters requested but only {fits} can be placed now: the other "
            f"slots are pinned by running batches",
            requested=len(names),
            max_fit=fits,
        )

    def release(self, lease: PoolLease) -> None:
        """Unpin ``lease``'s adapters (idempotent). They stay resident until evicted."""
        with self._lock:
            if lease.released:
                return
            lease.released = True
            self._leases.pop(lease.lease_id, None)
            for name in lease.slots:
                self._pins[name] -= 1
                if self._pins[name] <= 0:
                    del self._pins[name]
                    entry = self._catalogue.get(name)
                    if entry is not None and entry.removing:
                        del self._catalogue[name]
                        self._forget(name)
            waiters, self._async_waiters = self._async_waiters, []
            self._slot_cond.notify_all()
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_resolve, waiter)

    # ----------------------------------------------------------------- batch construction
    def row_scales(
        self,
        lease: PoolLease | None,
        mixes: Sequence[AdapterMix],
        slot_ids: Sequence[int] | torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``[rows, U]`` with w_i * s_i of row b's mix in the column of adapter i's slot.

        Columns follow ``slot_ids`` (default: the sorted slots of the adapters in ``mixes``,
        i.e. :meth:`batch_slot_ids`). Every adapter of ``mixes`` must be pinned (by ``lease``,
        or by any live lease when ``lease`` is None).
        """
        slots_of, scaling_of = self._slot_maps(lease, mixes)
        if slot_ids is None:
            slot_ids = sorted(set(slots_of.values()))
        elif isinstance(slot_ids, torch.Tensor):
            slot_ids = slot_ids.tolist()
        column = {slot: j for j, slot in enumerate(slot_ids)}
        scales = torch.zeros(len(mixes), len(slot_ids), dtype=torch.float32)
        for row, mix in enumerate(mixes):
            for name, weight in mix.entries:
                slot = slots_of[name]
                if slot not in column:
                    raise InvalidMixError(f"adapter {name!r} (slot {slot}) is not in slot_ids")
                scales[row, column[slot]] += weight * scaling_of[name]
        return scales.to(device or self.device)

    def batch_slot_ids(self, lease: PoolLease | None, mixes: Sequence[AdapterMix]) -> list[int]:
        slots_of, _ = self._slot_maps(lease, mixes)
        return sorted(set(slots_of.values()))

    def batch_context(
        self,
        lease: PoolLease | None,
        mixes: Sequence[AdapterMix],
        device: torch.device | str | None = None,
    ) -> LoraBatchContext:
        """Everything the fused layers need for one forward whose row b uses ``mixes[b]``.

        Also builds the rank-column selection (``col_index`` into the flattened [S*R] slot
        rows, ``col_scales``) so that each adapter costs its real rank, not R.
        """
        device = torch.device(device or self.device)
        slot_ids = self.batch_slot_ids(lease, mixes)
        row_scales = self.row_scales(lease, mixes, slot_ids, device="cpu")
        with self._lock:
            ranks = [self._slot_rank[s] for s in slot_ids]
        index = [
            s * self.max_rank + k for s, r in zip(slot_ids, ranks, strict=True) for k in range(r)
        ]
        repeats = torch.tensor(ranks, dtype=torch.long)
        col_scales = row_scales.repeat_interleave(repeats, dim=1) if slot_ids else row_scales
        non_blocking = device.type == "cuda"
        return LoraBatchContext(
            slot_ids=torch.tensor(slot_ids, dtype=torch.long).to(device, non_blocking=False),
            row_scales=row_scales.to(device, dtype=self.dtype, non_blocking=non_blocking),
            col_index=torch.tensor(index, dtype=torch.long).to(device),
            col_scales=col_scales.to(device, dtype=self.dtype),
        )

    def _slot_maps(
        self, lease: PoolLease | None, mixes: Sequence[AdapterMix]
    ) -> tuple[dict[str, int], dict[str, float]]:
        needed = {name for mix in mixes for name in mix.names}
        if lease is not None:
            if lease.released:
                raise DlpError(f"lease {lease.lease_id} was already released")
            slots = {n: lease.slot_of(n) for n in needed}
            return slots, {n: lease.scaling(n) for n in needed}
        with self._lock:
            slots, scalings = {}, {}
            for name in needed:
                if not self._pins[name]:
                    raise InvalidMixError(f"adapter {name!r} is not pinned by any lease")
                slots[name] = self._resident[name]
                scalings[name] = self._slot_scaling[slots[name]]
            return slots, scalings

    # ------------------------------------------------------------------------ reporting
    def slot_version(self, slot: int) -> int:
        """How many times ``slot``'s tensors have been written: equal versions mean equal
        contents (a copy of the slot made at that version is still current)."""
        return self._slot_versions[slot]

    def resident(self) -> list[str]:
        """Device-resident adapters, least recently used first."""
        with self._lock:
            return list(self._resident)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {
                "hits": c.hits,
                "loads": c.loads,
                "evictions": c.evictions,
                "bytes_loaded": c.bytes_loaded,
                "load_ms_total": c.load_seconds * 1e3,
                "last_load_ms": self.last_load_ms,
                "host_hits": self._host.hits,
                "host_loads": c.host_loads,
                "host_evictions": self._host.evictions,
                "waits": c.waits,
                "resident": list(self._resident),
                "host_resident": self._host.names(),
                "pinned": sorted(self._pins),
                "slots": self.n_slots,
                "free_slots": sum(o is None for o in self._slot_owner),
                "slot_bytes": self.slot_bytes,
                "device_bytes": self.device_bytes,
                "host_bytes": self._host.nbytes,
                "host_budget_bytes": self.host_budget_bytes,
                "registered": len([e for e in self._catalogue.values() if not e.removing]),
                "max_rank": self.max_rank,
            }


class _Retry(Exception):
    """The host copy went stale (replaced adapter) between load and placement."""


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def plan_batches(mixes: Sequence[AdapterMix | Iterable[str]], capacity: int) -> list[list[int]]:
    """Split rows into sub-batches whose union of adapters fits ``capacity`` slots.

    First-fit in row order: each row joins the first sub-batch it fits in, so rows keep their
    relative order inside a sub-batch and the first sub-batch holds the oldest rows. A single
    row that needs more than ``capacity`` adapters cannot be served and raises
    PoolCapacityError.
    """
    if capacity < 1:
        raise PoolCapacityError("capacity must be >= 1", requested=0, max_fit=0)
    groups: list[tuple[set[str], list[int]]] = []
    for row, mix in enumerate(mixes):
        names = set(mix.names if isinstance(mix, AdapterMix) else mix)
        if len(names) > capacity:
            raise PoolCapacityError(
                f"row {row} needs {len(names)} adapters, the pool has {capacity} slots",
                requested=len(names),
                max_fit=capacity,
            )
        for union, rows in groups:
            if len(union | names) <= capacity:
                union |= names
                rows.append(row)
                break
        else:
            groups.append((set(names), [row]))
    return [rows for _, rows in groups]
