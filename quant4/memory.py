"""Where quant4 keeps its large weight tensors: memory the Linux kernel may back with 2 MiB pages.

Decode streams every weight byte once per token (3.8 GB for a 7B Q4_0 model). In 4 KiB pages that is one TLB
miss and one page walk per 4 KiB of each weight stream; in 2 MiB pages it is 512 times fewer. On the Zen 4 test
machine a 7B int8-activation decode step ran 1.03x faster with the weights in 2 MiB pages (median over 8 rounds
in turns in one process, README "Speed").

Linux backs anonymous memory with 2 MiB pages ("transparent huge pages") where the process asks for them with
madvise(MADV_HUGEPAGE) (THP mode "madvise", a common distribution default; "always" gives them unasked).
torch's allocator does not ask (unless THP_MEM_ALLOC_ENABLE=1), so quant4 allocates its weight buffers itself:
a private anonymous mapping per tensor (a shared one would be shmem, which THP usually skips), its first 2 MiB
boundary used as the tensor's start, the whole 2 MiB pages inside the tensor advised. The tail past the last
whole 2 MiB page stays in 4 KiB pages, so a tensor never holds more than its own bytes plus less than 4 KiB
resident, and a mapping nobody writes (an all-zero tensor, a KV cache's unused end) is never resident.
Nothing here changes a value or a stored byte: the format on disk is the same.

Weights of 16 KiB up to 2 MiB (a small model's projections) that adopt() takes are packed together into shared
2 MiB pages (_shared_page_copy). empty() and zeros() below 2 MiB use torch's allocator.

Off when the kernel cannot do it (not Linux, THP "never") or when the environment sets QUANT4_HUGE_PAGES=0.
"""
from __future__ import annotations

import mmap
import os
import sys
import threading
import weakref
from functools import lru_cache
from typing import Optional

import torch

HUGE_PAGE = 2 << 20                     # bytes in an x86-64 / arm64 transparent huge page
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


@lru_cache(maxsize=None)
def huge_pages_available() -> bool:
    """True if large weight tensors go to memory advised for 2 MiB pages (see the module docstring)."""
    if os.environ.get("QUANT4_HUGE_PAGES", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_MODE) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _aligned_mapping(nbytes: int):
    """(a new private anonymous mapping of nbytes + HUGE_PAGE bytes, the offset in it of its first 2 MiB
    boundary), the whole 2 MiB pages of the nbytes from there advised for huge pages; None if mmap fails."""
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    view = memoryview(m)
    try:
        start = torch.frombuffer(view, dtype=torch.uint8, count=1).data_ptr()
    finally:
        view.release()
    offset = -start % HUGE_PAGE
    try:
        m.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:          # a kernel that refuses the advice: the memory is still ordinary memory
        pass
    return m, offset


def _fresh_mapping(shape, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A tensor on a new mapping (reads as zeros), its whole 2 MiB pages advised; None where empty() and
    zeros() use torch's allocator (small, not offered, not the CPU device, or the mapping failed)."""
    shape = tuple(int(s) for s in shape)
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not huge_pages_available() or torch.get_default_device().type != "cpu":
        return None          # (under torch.device("meta"): torch's meta tensor, as asked)
    mapped = _aligned_mapping(nbytes)
    if mapped is None:       # e.g. vm.max_map_count reached: torch's allocator still may have the memory
        return None
    m, offset = mapped
    # frombuffer keeps `m` alive as long as the tensor's storage; the mapping is unmapped when both are gone
    flat = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(dtype).view(shape)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in 2 MiB-page memory when it is at least HUGE_PAGE bytes and
    huge_pages_available(), else from torch's allocator."""
    t = _fresh_mapping(shape, dtype)
    return t if t is not None else torch.empty(tuple(int(s) for s in shape), dtype=dtype)


def zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor placed as empty() places it. A new mapping reads as zeros without being written, so
    its pages become resident only as they are first written (a KV cache grows with the context used)."""
    t = _fresh_mapping(shape, dtype)
    return t if t is not None else torch.zeros(tuple(int(s) for s in shape), dtype=dtype)


_ZERO_MAPPINGS: set = set()   # addresses of the zero mappings adopt made (a stale entry only skips a scan or a copy)


def _zero_mapping(shape, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A tensor on a new private anonymous mapping of its own size (reads as zeros; never resident until
    written, in any size of at least a page), or None where mmap cannot make one."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    if not hasattr(mmap, "MAP_ANONYMOUS") or nbytes < mmap.PAGESIZE:
        return None
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return None
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes).view(dtype).view(tuple(shape))


def adopt(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a contiguous copy of it in 2 MiB-page memory when empty() would put a tensor of its size
    there, or packed with other weights of ARENA_MIN bytes up to HUGE_PAGE into shared 2 MiB pages. For weights
    that stay resident (the tensor is copied once; the caller drops the original). A tensor
    of a page or more whose every byte is 0 (e.g. a symmetric model's zeros; whatever its size, with or without
    huge pages) becomes a fresh mapping, which reads as zeros and is never resident."""
    if t.device.type != "cpu" or torch.get_default_device().type != "cpu":
        return t
    nbytes = t.numel() * t.element_size()
    if t.is_contiguous() and t.data_ptr() in _ZERO_MAPPINGS:
        return t                                 # adopted again (a tied head's tensors): kept, shared
    if (nbytes >= mmap.PAGESIZE and t.is_contiguous()
            and not (nbytes >= HUGE_PAGE and t.data_ptr() % HUGE_PAGE == 0) and not bool(t.view(torch.uint8).any())):
        z = _fresh_mapping(t.shape, t.dtype) if nbytes >= HUGE_PAGE else None
        if z is None:
            z = _zero_mapping(t.shape, t.dtype)
        if z is not None:
            _ZERO_MAPPINGS.add(z.data_ptr())
            return z
    if nbytes < HUGE_PAGE:
        return _shared_page_copy(t) if ARENA_MIN <= nbytes and huge_pages_available() else t
    if not huge_pages_available():
        return t
    if t.is_contiguous() and t.data_ptr() % HUGE_PAGE == 0:
        return t         # made by empty() (or aligned by chance, when the copy is merely skipped)
    out = empty(t.shape, t.dtype)
    out.copy_(t)
    return out


ARENA_MIN = 16 << 10        # weights from this size up to HUGE_PAGE share 2 MiB pages (adopt); smaller: torch's
_ARENA_OPEN = 4             # pages kept open for more tensors (the fullest with room first); beyond that the
                            # fullest are closed (their unused rest is resident with the page, so closing those
                            # wastes the least)
_arena_lock = threading.Lock()
_arena_pages: list = []     # [weakref to the mapping, its huge page's offset in it, bytes used], open pages
_ARENA_PTRS: set = set()    # addresses of tensors placed there (a stale entry only skips a copy)


def _shared_page_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t (ARENA_MIN <= bytes < HUGE_PAGE) packed with other such weights into 2 MiB pages,
    or t itself when it is one already or no mapping can be made. A 135M-parameter model's projections are
    221-442 KB each and sat in 4 KiB pages; packed, its lean decode step took 0.96x and 0.98x as long (medians
    of two A/B runs in turns in one process, Q4_0; a control without huge pages gave 1.03x, docs/speed.md).

    Each page is a mapping of its own, kept alive by the tensors in it (torch.frombuffer), so it is unmapped when
    the last of them is freed: a model that is dropped gives its pages back, except where a tensor of another
    model shares one (at most a 2 MiB page per such tensor)."""
    if t.is_contiguous() and t.data_ptr() in _ARENA_PTRS:
        return t
    nbytes = t.numel() * t.element_size()
    need = (nbytes + 63) // 64 * 64           # each tensor starts on a cache line
    with _arena_lock:
        m = offset = None
        for page in reversed(_arena_pages):          # the fullest page with room first
            mp = page[0]()
            if mp is not None and page[2] + need <= HUGE_PAGE:
                m, offset = mp, page[1] + page[2]
                page[2] += need
                break
        if m is None:
            mapped = _aligned_mapping(HUGE_PAGE)     # a whole 2 MiB-aligned page inside
            if mapped is None:
                return t
            m, offset = mapped
            _arena_pages.append([weakref.ref(m), offset, need])
        _arena_pages[:] = sorted((p for p in _arena_pages if p[0]() is not None and HUGE_PAGE - p[2] >= ARENA_MIN),
                                 key=lambda p: p[2])[:_ARENA_OPEN]
    out = torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset).view(t.dtype).view(t.shape)
    out.copy_(t)
    _ARENA_PTRS.add(out.data_ptr())
    return out


def in_shared_page(t: torch.Tensor) -> bool:
    """True if t was placed by adopt() in a 2 MiB page it shares with other weights."""
    return t.data_ptr() in _ARENA_PTRS


def mapped_bytes(t: torch.Tensor, field: str = "AnonHugePages") -> int:
    """A /proc/self/smaps field summed over the mappings that hold t's memory: "AnonHugePages" (bytes in huge
    pages), "Rss" (resident bytes; the kernel's shared zero page is not counted). 0 where smaps is not
    readable. For tests and diagnostics."""
    lo = t.data_ptr()
    hi = lo + t.numel() * t.element_size()
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(v, 16) for v in head.split("-"))
                    inside = a < hi and b > lo
                elif inside and head == field + ":":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def drop_file_pages(t: torch.Tensor) -> None:
    """If t is a view of a file's memory map (safetensors' tensors are), unmap the pages under it from this
    process (MADV_DONTNEED; the page cache keeps them, and they are read again if anything touches t). A
    copied-from tensor otherwise keeps every page it covers resident while the map lives. Anonymous memory is
    left alone (there DONTNEED would zero it)."""
    pages = _page_range(t)
    if pages is None or not sys.platform.startswith("linux"):
        return
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                a, b = (int(v, 16) for v in fields[0].split("-"))
                if a <= lo and hi <= b:
                    if len(fields) < 6 or not fields[5].strip().startswith("/"):
                        return                           # anonymous (or a special mapping): not ours to drop
                    break
            else:
                return
    except (OSError, ValueError):
        return
    _madvise(pages, mmap.MADV_DONTNEED)


@lru_cache(maxsize=None)
def _libc():
    """The C library, found once (ctypes.util.find_library runs ldconfig); None where it cannot be loaded."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _page_range(t: torch.Tensor):
    """(start, length) of the whole pages covering t's memory, or None for CPU tensors under a page."""
    n = t.numel() * t.element_size()
    if n < mmap.PAGESIZE or t.device.type != "cpu":
        return None
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    return start, (t.data_ptr() + n - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def _madvise(pages, advice: int) -> None:
    import ctypes

    libc = _libc()
    if pages is not None and libc is not None and hasattr(libc, "madvise"):
        libc.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1]), advice)


def page_out(t: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages under a tensor that is no longer needed (MADV_PAGEOUT): a tensor that
    is a view of a file's memory map (transformers reads safetensors that way) otherwise keeps every page it
    covers resident until the map closes. Nothing is lost: file pages are read again and anonymous ones swapped
    if anything touches them. A no-op where the call does not exist (Linux < 5.4, other systems)."""
    _madvise(_page_range(t), 21)      # MADV_PAGEOUT


def release_freed_memory() -> None:
    """Give freed temporaries back to the OS (glibc keeps them in its heap otherwise: a 5.1 GB
    GGUF stayed at 6.2 GB resident after loading, 5.2 GB after this). A no-op where malloc_trim does not exist."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
