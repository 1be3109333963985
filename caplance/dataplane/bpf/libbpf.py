"""A small ctypes layer over Debian's ``libbpf1``: exactly what the kernel data plane needs.

Why ctypes and not a binding: the Python bindings for libbpf on PyPI are either unmaintained
or pull in BCC (a compiler at run time, kernel headers); pyroute2 can attach tc programs but
not load BTF-defined maps or map-in-map. libbpf itself is a Debian package
(``libbpf1``) with a stable C ABI, and we need about fifteen of its functions: open and load
an object, find its maps and programs, create maps, update and read elements, create a tc
hook and attach to it, attach XDP, and run a program on a test packet
(``BPF_PROG_TEST_RUN``). Every failure is an :class:`BpfError` naming the operation and the
object, with libbpf's own log (the verifier's output, say) attached.

Struct layouts follow ``/usr/include/bpf/libbpf.h`` and ``bpf.h`` of libbpf 1.1; each starts
with its own ``sz``, so newer libbpf versions accept them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from collections.abc import Iterator
from typing import Any

from caplance.errors import CaplanceError

__all__ = ["BpfError", "BpfObject", "available", "map_create", "map_delete", "map_lookup", "map_mmap",
           "map_update", "tc_attach", "tc_detach", "tc_hook_destroy", "test_run", "xdp_attach", "xdp_detach"]

BPF_MAP_TYPE_ARRAY = 2
BPF_F_MMAPABLE = 1 << 10
BPF_F_INNER_MAP = 1 << 12
BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class BpfError(CaplanceError):
    """A libbpf call failed: ``operation`` on ``target``, with ``code`` (an errno) and
    libbpf's log lines."""

    def __init__(self, operation: str, target: str, code: int, log: str = "") -> None:
        self.operation = operation
        self.target = target
        self.code = code
        self.log = log
        detail = f"cannot {operation} {target}: {os.strerror(code)} (errno {code})"
        super().__init__(detail + (f"\n{log}" if log else ""))


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32)]


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32)]


class _XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


_PRINT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib: Any = None
_libc: Any = None
_log: list[str] = []
_printer: Any = None


def _load() -> Any:
    """libbpf.so.1, with its functions typed; raises :class:`BpfError` if it is missing."""
    global _lib, _libc, _printer
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError("load", "libbpf (Debian's libbpf1)", errno.ENOENT, str(exc)) from exc
    _libc = ctypes.CDLL(None)
    p, i, u32, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    for function, result, arguments in (
        ("bpf_object__open_file", p, [s, p]), ("bpf_object__load", i, [p]), ("bpf_object__close", None, [p]),
        ("bpf_object__find_map_by_name", p, [p, s]), ("bpf_object__find_program_by_name", p, [p, s]),
        ("bpf_map__fd", i, [p]), ("bpf_program__fd", i, [p]), ("bpf_map__set_max_entries", i, [p, u32]),
        ("bpf_map__key_size", u32, [p]), ("bpf_map__value_size", u32, [p]), ("bpf_map__max_entries", u32, [p]),
        ("bpf_map_create", i, [i, s, u32, u32, u32, p]), ("bpf_map_update_elem", i, [i, p, p, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", i, [i, p, p]), ("bpf_map_delete_elem", i, [i, p]),
        ("bpf_map_get_next_key", i, [i, p, p]), ("bpf_tc_hook_create", i, [p]), ("bpf_tc_hook_destroy", i, [p]),
        ("bpf_tc_attach", i, [p, p]), ("bpf_tc_detach", i, [p, p]), ("bpf_xdp_attach", i, [i, i, u32, p]),
        ("bpf_xdp_detach", i, [i, u32, p]), ("bpf_prog_test_run_opts", i, [i, p]), ("libbpf_set_print", p, [p]),
        ("libbpf_num_possible_cpus", i, []),
    ):
        fn = getattr(lib, function)
        fn.restype, fn.argtypes = result, arguments
    _libc.vsnprintf.restype = i
    _libc.vsnprintf.argtypes = [p, ctypes.c_size_t, s, p]

    def record(level: int, fmt: bytes, args: int) -> int:
        buffer = ctypes.create_string_buffer(4096)
        _libc.vsnprintf(buffer, len(buffer), fmt, args)
        _log.append(buffer.value.decode(errors="replace").rstrip())
        del _log[:-200]
        return 0

    _printer = _PRINT(record)
    lib.libbpf_set_print(ctypes.cast(_printer, ctypes.c_void_p))
    _lib = lib
    return lib


def available() -> tuple[bool, str]:
    """Whether libbpf can be loaded here, and why not."""
    try:
        _load()
    except BpfError as exc:
        return False, str(exc)
    return True, ""


def possible_cpus() -> int:
    return int(_load().libbpf_num_possible_cpus())


def _check(result: int, operation: str, target: str) -> int:
    if result < 0:
        raise BpfError(operation, target, -result, "\n".join(_log[-40:]))
    return result


class BpfObject:
    """A compiled BPF object file: open, size its maps, load, then look up maps and programs."""

    def __init__(self, path: str) -> None:
        lib = _load()
        _log.clear()
        self.path = path
        self._handle = lib.bpf_object__open_file(path.encode(), None)
        if not self._handle:
            raise BpfError("open BPF object", path, ctypes.get_errno() or errno.EINVAL, "\n".join(_log[-20:]))

    def _map(self, name: str) -> Any:
        found = _load().bpf_object__find_map_by_name(self._handle, name.encode())
        if not found:
            raise BpfError("find map", f"{name} in {self.path}", errno.ENOENT)
        return found

    def set_max_entries(self, name: str, entries: int) -> None:
        _check(_load().bpf_map__set_max_entries(self._map(name), entries), "size map", name)

    def map_sizes(self, name: str) -> tuple[int, int, int]:
        """(key size, value size, max entries) of map ``name``."""
        lib, found = _load(), self._map(name)
        return lib.bpf_map__key_size(found), lib.bpf_map__value_size(found), lib.bpf_map__max_entries(found)

    def load(self) -> None:
        _log.clear()
        _check(_load().bpf_object__load(self._handle), "load BPF object", self.path)

    def map_fd(self, name: str) -> int:
        return _check(_load().bpf_map__fd(self._map(name)), "get the fd of map", name)

    def program_fd(self, name: str) -> int:
        found = _load().bpf_object__find_program_by_name(self._handle, name.encode())
        if not found:
            raise BpfError("find program", f"{name} in {self.path}", errno.ENOENT)
        return _check(_load().bpf_program__fd(found), "get the fd of program", name)

    def close(self) -> None:
        if self._handle:
            _load().bpf_object__close(self._handle)
            self._handle = None


def map_create(map_type: int, key_size: int, value_size: int, entries: int, *, flags: int = 0,
               name: str = "caplance") -> int:
    """A new map's fd (the caller closes it)."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    return _check(_load().bpf_map_create(map_type, name.encode()[:15], key_size, value_size, entries,
                                         ctypes.byref(opts)), "create map", name)


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    _check(_load().bpf_map_update_elem(fd, key, value, flags), "update map element", f"fd {fd}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under ``key``, or None if there is none."""
    value = ctypes.create_string_buffer(value_size)
    result = _load().bpf_map_lookup_elem(fd, key, value)
    if result == -errno.ENOENT:
        return None
    _check(result, "look up map element", f"fd {fd}")
    return value.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    result = _load().bpf_map_delete_elem(fd, key)
    if result == -errno.ENOENT:
        return False
    _check(result, "delete map element", f"fd {fd}")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    key = None
    following = ctypes.create_string_buffer(key_size)
    lib = _load()
    while lib.bpf_map_get_next_key(fd, key, following) == 0:
        key = following.raw
        yield key


def map_mmap(fd: int, size: int) -> mmap.mmap:
    """The values of an ``BPF_F_MMAPABLE`` array map, mapped into memory (read and write)."""
    length = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def tc_attach(ifindex: int, prog_fd: int, *, priority: int = 1, handle: int = 1) -> bool:
    """Attach a program to ``ifindex``'s clsact ingress (creating the qdisc if needed;
    replacing a program a crashed run left under the same handle); True if the qdisc was
    made here."""
    lib = _load()
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)
    made = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if made not in (0, -errno.EEXIST):
        _check(made, "create the tc hook on", f"ifindex {ifindex}")
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=BPF_TC_F_REPLACE, handle=handle,
                   priority=priority)
    _check(lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), "attach the tc program to",
           f"ifindex {ifindex}")
    return bool(made == 0)


def tc_detach(ifindex: int, *, priority: int = 1, handle: int = 1) -> None:
    lib = _load()
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=handle, priority=priority)
    result = lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if result not in (0, -errno.ENOENT, -errno.ENODEV):
        _check(result, "detach the tc program from", f"ifindex {ifindex}")


def tc_hook_destroy(ifindex: int) -> None:
    """Remove ``ifindex``'s clsact qdisc (and any filter still on it)."""
    hook = _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS | 2)  # and egress
    result = _load().bpf_tc_hook_destroy(ctypes.byref(hook))
    if result not in (0, -errno.ENOENT, -errno.ENODEV, -errno.EINVAL):
        _check(result, "remove the tc hook from", f"ifindex {ifindex}")


def xdp_attach(ifindex: int, prog_fd: int, *, native: bool) -> None:
    flags = XDP_FLAGS_DRV_MODE if native else XDP_FLAGS_SKB_MODE
    _check(_load().bpf_xdp_attach(ifindex, prog_fd, flags, None), "attach the XDP program to", f"ifindex {ifindex}")


def xdp_detach(ifindex: int, *, native: bool) -> None:
    flags = XDP_FLAGS_DRV_MODE if native else XDP_FLAGS_SKB_MODE
    result = _load().bpf_xdp_detach(ifindex, flags, None)
    if result not in (0, -errno.ENODEV):
        _check(result, "detach the XDP program from", f"ifindex {ifindex}")


def test_run(prog_fd: int, data: bytes, *, repeat: int = 1, out_size: int = 65535 + 256) -> tuple[int, bytes, int]:
    """Run a program on ``data`` (``BPF_PROG_TEST_RUN``): (return value, the packet as the
    program left it, mean ns per run)."""
    out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p),
                        data_out=ctypes.cast(out, ctypes.c_void_p), data_size_in=len(data), data_size_out=out_size,
                        repeat=repeat)
    _check(_load().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test-run program", f"fd {prog_fd}")
    return opts.retval, out.raw[: opts.data_size_out], opts.duration
