"""PagedAdamW: AdamW whose states live in fixed-size pages, resident on the GPU within a budget, else in host memory.

Design
------
Pages. Each parameter's state (float32 moments, or 8-bit codes plus absmax) is cut into pages of at most
`page_bytes` bytes: a page covers elements [start, start + numel) of one parameter, with `numel` a multiple of 256
(the 8-bit block) except for a parameter's last page, and keeps all of its state fields in one byte buffer
(`adamw.state_layout`), so moving a page is one copy. Pages never span parameters.

Placement. A page is *resident* (its buffer on the parameter's device) or *paged out* (its buffer in pinned host
memory). New pages become resident while `resident_bytes + page <= budget`; with the default budget `None` that
means "while they fit": a page whose device allocation raises out-of-memory goes to the host instead.
`evict(nbytes)` moves resident pages to the host, last parameter first, until at least `nbytes` are freed, and
lowers the budget to what stays resident so that the pages do not come back; the freed blocks return to PyTorch's
caching allocator at once (call `torch.cuda.empty_cache()` to hand them to other processes). Setting `budget`
evicts down to it, or promotes paged-out pages (first parameter first) up to it.

Step. All resident pages are updated by one fused launch (the step plan's `fused_adamw.PreparedUpdate`), exactly
as `AdamW` updates whole parameters. Then the paged-out pages stream through a double buffer of two `page_bytes`
device slots, a batch of consecutive pages per slot fill (one page, or several small ones such as LoRA's, one
launch per batch):
    side stream h2d:  copy batch i into slot i % 2     (after the write-back of batch i - 2 left that slot)
    current stream:   update batch i in its slot        (after its copy-in)
    side stream d2h:  copy slot i % 2 back to its pages (after its update)
so batch i + 1 is paged in while batch i is updated and batch i - 1 written back, and the first copy-in overlaps
the resident update; the two copy directions run on separate streams and use both directions of the link. The
batches, their slot views and their kernel tables are laid out at the first step that streams and reused until a
page moves (`_Stream`), so a step issues little more than two copies per page and one launch per batch: with
hundreds of small pages the host, not the link, would otherwise set the pace. The slots are allocated before any
update (an out-of-memory error there leaves every parameter unchanged) and kept with that layout. The current
stream waits for the last write-back before `step()` returns, and host-side reads of paged-out state (`state_dict`,
`evict`) synchronize on it first.
GPU memory held by the optimizer is therefore at most `budget` + 2 * `page_bytes` (the slots, held only while
pages are paged out), plus a few KiB of kernel tables, for any number of parameters; a budget smaller than one
parameter's state pages within that parameter.

Exactness. Every page runs the same element-wise arithmetic as `AdamW` on the same numbers (8-bit pages start on
block boundaries, so each block's absmax is the same), so PagedAdamW's parameters and states equal AdamW's bit
for bit, whatever the budget. On the CPU the "device" is host memory and the copies are synchronous; the code
path (pages, budget, slots) is the same. No unified (managed) memory is used.

`state_dict()` has AdamW's format (whole-parameter tensors, on the CPU), so checkpoints move freely between
AdamW and PagedAdamW and between page sizes and budgets.
"""

from __future__ import annotations

import torch

from nf4lora.optim.adamw import AdamW, DevicePlan, check_count, state_layout, state_views
from nf4lora.optim.fused_adamw import QBLOCK, PreparedUpdate, Segment

# 8 MiB: host<->device copies of a few MiB and more run near the link's rate (an assumption the benchmark's 1/8
# budget rows check against the measured bandwidth), while the double buffer stays at 16 MiB
DEFAULT_PAGE_BYTES = 8 << 20


class _Page:
    """Elements [start, start + numel) of one parameter's state, in one byte buffer on the device or the host."""

    __slots__ = ("param", "start", "numel", "eight_bit", "nbytes", "buffer", "views", "resident", "segment")

    def __init__(self, param: torch.Tensor, start: int, numel: int, eight_bit: bool):
        self.param, self.start, self.numel, self.eight_bit = param, start, numel, eight_bit
        self.nbytes = state_layout(numel, eight_bit)[1]

    @property
    def device(self) -> torch.device:
        return self.param.device

    def __getstate__(self) -> tuple:
        """The page without its views and segment, which `place` rebuilds (torch.save refuses one storage viewed as
        two dtypes)."""
        return self.param, self.start, self.numel, self.eight_bit, self.buffer, self.resident

    def __setstate__(self, state: tuple) -> None:
        param, start, numel, eight_bit, buffer, resident = state
        self.__init__(param, start, numel, eight_bit)
        if not resident and param.is_cuda and not buffer.is_pinned():  # unpickling drops the pinning
            buffer = _host_buffer(buffer.numel(), param.device).copy_(buffer)
        self.place(buffer, resident)

    def place(self, buffer: torch.Tensor, resident: bool) -> None:
        self.buffer, self.resident = buffer, resident
        self.views = state_views(buffer, self.numel, self.eight_bit)
        self.segment = Segment(self.param, None, self.start, self.numel, self.views)


class PagedAdamW(AdamW):
    """AdamW with paged states; see the module docstring for the design.

    Args:
        params, lr, betas, eps, weight_decay, optim_bits, min_8bit_size: as `AdamW`.
        gpu_budget_bytes: device bytes the resident pages may take; None = as many as fit.
        page_bytes: the largest page, in bytes (>= the state of 256 elements).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int = 32, min_8bit_size: int = 4096,
                 gpu_budget_bytes: int | None = None, page_bytes: int = DEFAULT_PAGE_BYTES):
        smallest = state_layout(QBLOCK, False)[1]
        check_count("page_bytes", page_bytes, f">= {smallest} (the state of {QBLOCK} elements)", smallest)
        _check_budget(gpu_budget_bytes)
        self.page_bytes = page_bytes
        self._budget = gpu_budget_bytes
        self._resident_bytes = 0
        self._streams: dict[torch.device, tuple] = {}
        self._writeback: torch.cuda.Event | None = None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
                         min_8bit_size=min_8bit_size)

    def __getstate__(self) -> dict:
        """AdamW's, plus the paging settings; the side streams and the pending write-back are per process."""
        self._wait_writeback()
        return {**super().__getstate__(), "page_bytes": self.page_bytes, "_budget": self._budget,
                "_resident_bytes": self._resident_bytes}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._streams, self._writeback = {}, None

    # -- budget ---------------------------------------------------------------------------------------------------

    @property
    def budget(self) -> int | None:
        """Device bytes the resident pages may take (None: as many as fit). Setting it evicts or promotes pages."""
        return self._budget

    @budget.setter
    def budget(self, nbytes: int | None) -> None:
        _check_budget(nbytes)
        if nbytes is not None and self._resident_bytes > nbytes:
            self._evict(self._resident_bytes - nbytes)
        self._budget = nbytes
        self._promote()

    @property
    def resident_bytes(self) -> int:
        """Bytes of state resident on the device now."""
        return self._resident_bytes

    @property
    def paged_out_bytes(self) -> int:
        """Bytes of state in host memory now."""
        return sum(page.nbytes for page in self._pages() if not page.resident)

    def evict(self, nbytes: int) -> int:
        """Move resident pages to host memory until >= `nbytes` are freed (or none is left); returns bytes freed.

        The budget drops to the bytes still resident, so later steps keep the evicted pages on the host.
        """
        check_count("evict's nbytes", nbytes, "an int >= 0", 0)
        freed = self._evict(nbytes)
        self._budget = self._resident_bytes
        return freed

    def _pages(self, reverse: bool = False):
        params = self._indexed_params()
        for p in reversed(params) if reverse else params:
            state = self.state.get(p)
            if state and "pages" in state:
                yield from reversed(state["pages"]) if reverse else state["pages"]

    def _evict(self, nbytes: int) -> int:
        self._wait_writeback()
        self._plan = None  # it holds the pages' segments
        freed = 0
        for page in self._pages(reverse=True):
            if freed >= nbytes:
                break
            if page.resident:
                host = _host_buffer(page.nbytes, page.device)
                host.copy_(page.buffer)
                page.place(host, resident=False)
                self._resident_bytes -= page.nbytes
                freed += page.nbytes
        return freed

    def _promote(self) -> None:
        self._wait_writeback()
        self._plan = None  # it holds the pages' segments
        for page in self._pages():
            if not page.resident and self._fits(page.nbytes):
                device_buffer = _device_buffer(page.nbytes, page.device)
                if device_buffer is None:
                    return
                device_buffer.copy_(page.buffer)
                page.place(device_buffer, resident=True)
                self._resident_bytes += page.nbytes

    def _fits(self, nbytes: int) -> bool:
        return self._budget is None or self._resident_bytes + nbytes <= self._budget

    # -- state storage (AdamW's hooks) ----------------------------------------------------------------------------

    def page_numel(self, eight_bit: bool) -> int:
        """Elements per full page: the largest multiple of 256 whose state fits in `page_bytes`."""
        per_element = 2 + 8 / QBLOCK if eight_bit else 8
        numel = max(QBLOCK, int(self.page_bytes / per_element) // QBLOCK * QBLOCK)
        while numel > QBLOCK and state_layout(numel, eight_bit)[1] > self.page_bytes:
            numel -= QBLOCK
        return numel

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        eight_bit = self.eight_bit(p)
        size = self.page_numel(eight_bit)
        state["pages"] = []
        for start in range(0, p.numel(), size):
            page = _Page(p, start, min(size, p.numel() - start), eight_bit)
            device_buffer = _device_buffer(page.nbytes, p.device) if self._fits(page.nbytes) else None
            if device_buffer is None:
                page.place(_host_buffer(page.nbytes, p.device, zero=True), resident=False)
            else:
                page.place(device_buffer, resident=True)
                self._resident_bytes += page.nbytes
            state["pages"].append(page)

    def _state_tensors(self, p: torch.Tensor, state: dict) -> dict[str, torch.Tensor]:
        self._wait_writeback()
        if not state["pages"]:  # an empty parameter
            return state_views(torch.zeros(0, dtype=torch.uint8), 0, self.eight_bit(p))
        names = [name for name, *_ in state_layout(p.numel(), self.eight_bit(p))[0]]
        return {name: torch.cat([page.views[name].cpu() for page in state["pages"]]) for name in names}

    def _load_state_tensors(self, p: torch.Tensor, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self._init_state(p, state)
        for page in state["pages"]:
            for name, view in page.views.items():
                first = page.start // QBLOCK if name.startswith("absmax") else page.start
                view.copy_(tensors[name].reshape(-1)[first:first + view.numel()])

    def _clear_state(self) -> None:
        self._wait_writeback()
        self.state.clear()
        self._resident_bytes = 0

    # -- step -----------------------------------------------------------------------------------------------------

    def _split(self, p: torch.Tensor, state: dict) -> tuple[list[Segment], list[_Page]]:
        pages = state["pages"]
        return [page.segment for page in pages if page.resident], [page for page in pages if not page.resident]

    def _reserve(self, plan: DevicePlan) -> None:
        # the slots exist before any update, so an out-of-memory error leaves every parameter unchanged
        if plan.paged_out and plan.stream is None:
            plan.stream = _Stream(plan.device, plan.paged_out, self.page_bytes)

    def _update(self, plan: DevicePlan, grads: list, grad_ptrs: list, scalars: list[list[float]]) -> None:
        if not plan.paged_out:
            plan.update.run(grads, grad_ptrs, scalars)
            return
        # what the first copy-in waits for: the main stream up to here (the previous step's write-backs included),
        # not the resident pages' update, which it overlaps
        ready = torch.cuda.current_stream(plan.device).record_event() if plan.device.type == "cuda" else None
        plan.update.run(grads, grad_ptrs, scalars)
        self._stream(plan.stream, ready, grads, grad_ptrs, scalars)

    def _stream(self, stream: _Stream, ready: torch.cuda.Event | None, grads: list, grad_ptrs: list,
                scalars: list[list[float]]) -> None:
        """Update the paged-out pages through the two slots (module docstring), a batch of pages per slot fill."""
        if stream.device.type != "cuda":
            for copies, update in stream.batches:
                for page, slot in copies:
                    slot.copy_(page.buffer)
                update.run(grads, grad_ptrs, scalars)
                for page, slot in copies:
                    page.buffer.copy_(slot)
            return
        main = torch.cuda.current_stream(stream.device)
        h2d, d2h = self._side_streams(stream.device)
        h2d.wait_event(ready)
        slot_free: list[torch.cuda.Event | None] = [None, None]
        for i, (copies, update) in enumerate(stream.batches):
            with torch.cuda.stream(h2d):
                if slot_free[i % 2] is not None:
                    h2d.wait_event(slot_free[i % 2])
                for page, slot in copies:
                    slot.copy_(page.buffer, non_blocking=True)
            main.wait_stream(h2d)
            update.run(grads, grad_ptrs, scalars)
            d2h.wait_stream(main)
            with torch.cuda.stream(d2h):
                for page, slot in copies:
                    page.buffer.copy_(slot, non_blocking=True)
                slot_free[i % 2] = d2h.record_event()
        main.wait_stream(d2h)
        self._writeback = main.record_event()

    def _side_streams(self, device: torch.device) -> tuple:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _wait_writeback(self) -> None:
        """Block the host until the last step's write-backs to paged-out (host) pages are done."""
        if self._writeback is not None:
            self._writeback.synchronize()
            self._writeback = None


class _Stream:
    """How the paged-out pages of one device stream, laid out once and reused step after step.

    slots: the two `page_bytes` device buffers of the double buffer; batches: per slot fill, the (page, slot view)
    copies and the `PreparedUpdate` of those pages in the slot. Consecutive pages share a batch while they fit a
    slot, so many small pages (LoRA's) cost one launch per slot fill rather than one per page. The owner drops it
    (and with it the slots) whenever a page moves.
    """

    def __init__(self, device: torch.device, paged_out: list[tuple[_Page, int, int]], page_bytes: int):
        self.device = device
        self.slots = [torch.empty(page_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.batches: list[tuple[list[tuple[_Page, torch.Tensor]], PreparedUpdate]] = []
        used = page_bytes
        for page, grad_index, row in paged_out:
            if used + page.nbytes > page_bytes:
                copies, segments, grad_indices, used = [], [], [], 0
                self.batches.append((copies, PreparedUpdate(segments, grad_indices)))
                slot = self.slots[(len(self.batches) - 1) % 2]
            view = slot[used:used + page.nbytes]
            used += page.nbytes
            copies.append((page, view))
            segments.append(Segment(page.param, None, page.start, page.numel,
                                    state_views(view, page.numel, page.eight_bit), row))
            grad_indices.append(grad_index)


def _check_budget(nbytes: int | None) -> None:
    check_count("gpu_budget_bytes", nbytes, "None or >= 0", 0, allow_none=True)


def _device_buffer(nbytes: int, device: torch.device) -> torch.Tensor | None:
    """A zeroed byte buffer on `device`, or None where the device is out of memory."""
    try:
        return torch.zeros(nbytes, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError:
        return None


def _host_buffer(nbytes: int, device: torch.device, zero: bool = False) -> torch.Tensor:
    """A host byte buffer for pages of `device`, pinned when `device` is a GPU so copies can be asynchronous."""
    make = torch.zeros if zero else torch.empty
    return make(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
