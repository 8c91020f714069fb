"""The error hierarchy, and the kernel layer driven through its one seam with a fake bpf().

Nothing here needs the kernel: ``sockmap.kernel.syscall.bpf_call`` is replaced by a fake
``(cmd, attr) -> (result, errno)``, so these pass unprivileged.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import struct
from collections.abc import Callable, Iterator

import pytest

from sockmap import errors, programs
from sockmap.abi import Cmd, MapType, ProgType
from sockmap.errors import (
    BpfError,
    KeyExists,
    KeyNotFound,
    MapFull,
    PermissionDenied,
    SockmapError,
    VerifierError,
    bpf_error,
    errno_name,
    hint,
)
from sockmap.kernel import features, syscall
from sockmap.kernel import programs as loader
from sockmap.kernel.maps import ArrayMap, Map, MapSpec, SockMap
from sockmap.kernel.programs import load_program

# ------------------------------------------------------------------ the error table

CLASSES = [
    (errno.ENOENT, KeyNotFound),
    (errno.EEXIST, KeyExists),
    (errno.E2BIG, MapFull),
    (errno.EPERM, PermissionDenied),
    (errno.EACCES, PermissionDenied),
    (errno.EOPNOTSUPP, BpfError),  # UnsupportedSocket only where a socket was inserted
    (errno.EINVAL, BpfError),
    (errno.EBADF, BpfError),
    (errno.EBUSY, BpfError),
    (errno.ENOSPC, BpfError),
    (errno.ENOTSOCK, BpfError),
]


@pytest.mark.parametrize(("err", "cls"), CLASSES, ids=[errno.errorcode[e] for e, _ in CLASSES])
def test_bpf_error_maps_errno_to_class(err: int, cls: type[BpfError]) -> None:
    e = bpf_error(err, "frobnicate sockmap key 3")
    assert type(e) is cls
    assert isinstance(e, BpfError)
    assert isinstance(e, OSError)
    assert isinstance(e, SockmapError)
    assert e.errno == err
    assert e.strerror is not None
    assert e.strerror.startswith(f"frobnicate sockmap key 3: {os.strerror(err)}")


def test_python_kinds_match_too() -> None:
    assert isinstance(bpf_error(errno.ENOENT, "x"), KeyError)
    assert isinstance(bpf_error(errno.EPERM, "x"), PermissionError)
    assert isinstance(bpf_error(errno.EACCES, "x"), PermissionError)
    with pytest.raises(KeyError):
        raise bpf_error(errno.ENOENT, "look up")


# errno -> a word its hint must contain
HINTS = [
    (errno.EPERM, "CAP_BPF"),
    (errno.EACCES, "capabilities"),
    (errno.EBADF, "not open"),
    (errno.EOPNOTSUPP, "not support"),
    (errno.E2BIG, "max_entries"),
    (errno.ENOSPC, "value_size=8"),
    (errno.EBUSY, "detach it first"),
    (errno.ENOSYS, "no bpf() syscall"),
    (errno.ENOTSOCK, "not a socket"),
]


@pytest.mark.parametrize(("err", "word"), HINTS, ids=[errno.errorcode[e] for e, _ in HINTS])
def test_message_names_operation_errno_and_hint(err: int, word: str) -> None:
    e = bpf_error(err, "insert fd 7 into sockmap key 0")
    text = str(e)
    assert text.startswith(f"[{errno_name(err)}] insert fd 7 into sockmap key 0: ")
    assert os.strerror(err) in text
    assert word in hint(err)
    assert f"({hint(err)})" in text


def test_no_hint_no_parentheses() -> None:
    assert hint(errno.EINTR) == ""
    assert str(bpf_error(errno.EINTR, "wait")) == f"[EINTR] wait: {os.strerror(errno.EINTR)}"


def test_extra_hint_replaces_the_general_one() -> None:
    text = str(bpf_error(errno.EINVAL, "delete sockmap key 9", "the slot is empty"))
    assert text.endswith("(the slot is empty)")
    text2 = str(bpf_error(errno.EPERM, "create", "do this instead"))
    assert "CAP_BPF" not in text2
    assert "(do this instead)" in text2


@pytest.mark.parametrize(
    ("err", "name"),
    [
        (errno.EOPNOTSUPP, "EOPNOTSUPP"),  # Python's errorcode says ENOTSUP (same number)
        (errno.ENOENT, "ENOENT"),
        (errno.E2BIG, "E2BIG"),
        (errno.EAGAIN, "EAGAIN"),  # not EWOULDBLOCK
        (4242, "errno 4242"),
    ],
)
def test_errno_name(err: int, name: str) -> None:
    assert errno_name(err) == name


def test_eopnotsupp_is_printed_with_the_kernel_name() -> None:
    assert errno.errorcode[errno.EOPNOTSUPP] == "ENOTSUP"  # why errno_name exists
    text = str(bpf_error(errno.EOPNOTSUPP, "insert"))
    assert text.startswith("[EOPNOTSUPP] insert")
    assert "ENOTSUP]" not in text


def test_key_not_found_str_is_not_repr_quoted() -> None:
    e = bpf_error(errno.ENOENT, "look up key 1")
    assert str(e).startswith("[ENOENT] look up key 1")
    assert not str(e).startswith(("'", '"'))


def test_unknown_errno_gets_the_base_class() -> None:
    e = bpf_error(4242, "mystery")
    assert type(e) is BpfError
    assert str(e).startswith("[errno 4242] mystery: ")


def test_verifier_error_shows_the_last_log_lines() -> None:
    log = "".join(f"line-{i:02d}\n" for i in range(30))
    e = VerifierError(errno.EACCES, "load SK_SKB program 'p': the verifier refused it", log)
    text = str(e)
    assert text.startswith("[EACCES] load SK_SKB program 'p'")
    assert "verifier log (last lines):" in text
    shown = text.split("verifier log (last lines):\n", 1)[1].splitlines()
    assert shown == [f"line-{i:02d}" for i in range(10, 30)]
    assert e.log == log
    assert e.errno == errno.EACCES


def test_verifier_error_without_log_is_one_line() -> None:
    e = VerifierError(errno.EINVAL, "program 'x' is 3 bytes")
    assert str(e) == "[EINVAL] program 'x' is 3 bytes"
    assert e.log == ""


def test_every_public_error_is_a_sockmap_error() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, SockmapError), name


# ------------------------------------------------------------------ the seam


class FakeKernel:
    """A scriptable bpf(): ``handlers[cmd](attr) -> (result, errno)``; records every call."""

    def __init__(self) -> None:
        self.calls: list[Cmd] = []
        self.handlers: dict[Cmd, Callable[[syscall.Buffer], tuple[int, int]]] = {}
        self.fds: list[int] = []

    def __call__(self, cmd: int, attr: syscall.Buffer) -> tuple[int, int]:
        c = Cmd(cmd)
        self.calls.append(c)
        handler = self.handlers.get(c)
        if handler is None:
            return -1, errno.ENOSYS
        return handler(attr)

    def new_fd(self) -> int:
        """A real fd (of /dev/null) to hand out as a kernel object's fd."""
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds.append(fd)
        return fd


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    fake = FakeKernel()
    monkeypatch.setattr(syscall, "bpf_call", fake)
    yield fake
    for fd in fake.fds:
        syscall.close_fd(fd)


def test_fake_sees_the_packed_attr(kernel: FakeKernel) -> None:
    seen: list[tuple[int, ...]] = []

    def create(attr: syscall.Buffer) -> tuple[int, int]:
        seen.append(struct.unpack_from("<5I", attr, 0))
        return kernel.new_fd(), 0

    kernel.handlers[Cmd.MAP_CREATE] = create
    m = SockMap.new(7)
    try:
        assert seen == [(int(MapType.SOCKMAP), 4, 8, 7, 0)]
        assert m.fd in kernel.fds
    finally:
        m.close()


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES])
def test_map_create_refused_is_permission_denied(kernel: FakeKernel, err: int) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (-1, err)
    with pytest.raises(PermissionDenied) as exc:
        Map.create(MapSpec(MapType.SOCKMAP, 4, 8, 4))
    e = exc.value
    assert e.errno == err
    assert isinstance(e, PermissionError)
    assert "create SOCKMAP map (key 4 B, value 8 B, 4 entries)" in str(e)
    assert kernel.calls == [Cmd.MAP_CREATE]
    if err == errno.EPERM:
        assert "CAP_BPF" in str(e)


def _log_request(attr: syscall.Buffer) -> tuple[int, int, int]:
    """(log_level, log_size, log_buf address) of a BPF_PROG_LOAD attr."""
    level, size = struct.unpack_from("<II", attr, 24)
    (buf,) = struct.unpack_from("<Q", attr, 32)
    return level, size, buf


def _write_log(buf: int, size: int, text: bytes) -> None:
    """Write what the kernel would: as much of ``text`` as fits, NUL-terminated."""
    n = min(len(text), size - 1)
    ctypes.memmove(buf, text[:n] + b"\0", n + 1)


VERIFIER_LOG = b"".join(b"%d: (b7) r0 = 0\n" % i for i in range(200)) + b"R0 !read_ok\n"
VERIFIER_LOG += b"processed 201 insns (limit 1000000) max_states_per_insn 0\n"


def test_refused_program_is_retried_with_a_log_buffer(kernel: FakeKernel) -> None:
    requests: list[tuple[int, int]] = []

    def prog_load(attr: syscall.Buffer) -> tuple[int, int]:
        level, size, buf = _log_request(attr)
        requests.append((level, size))
        if level == 0:
            assert (size, buf) == (0, 0)  # the quiet first try asks for no log
            return -1, errno.EACCES
        _write_log(buf, size, VERIFIER_LOG)
        return -1, errno.EACCES

    kernel.handlers[Cmd.PROG_LOAD] = prog_load
    with pytest.raises(VerifierError) as exc:
        load_program(programs.pass_(), ProgType.SK_SKB)
    e = exc.value
    assert requests == [(0, 0), (1, loader._LOG_START)]
    assert e.errno == errno.EACCES
    assert e.log == VERIFIER_LOG.decode()
    first = str(e).splitlines()[0]
    assert first == (
        "[EACCES] load SK_SKB program 'pass' (2 insns): the verifier refused it: R0 !read_ok"
    )
    assert str(e).endswith("processed 201 insns (limit 1000000) max_states_per_insn 0")


def test_log_buffer_grows_on_enospc(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "_LOG_START", 64)
    sizes: list[int] = []

    def prog_load(attr: syscall.Buffer) -> tuple[int, int]:
        level, size, buf = _log_request(attr)
        if level == 0:
            return -1, errno.EINVAL
        sizes.append(size)
        _write_log(buf, size, VERIFIER_LOG)
        return (-1, errno.ENOSPC) if size <= len(VERIFIER_LOG) else (-1, errno.EINVAL)

    kernel.handlers[Cmd.PROG_LOAD] = prog_load
    with pytest.raises(VerifierError) as exc:
        load_program(programs.pass_(), ProgType.SK_SKB)
    assert sizes[0] == 64
    assert all(b > a for a, b in itertools.pairwise(sizes))
    assert sizes[-1] > len(VERIFIER_LOG) >= sizes[-2]
    assert exc.value.log == VERIFIER_LOG.decode()  # the whole log, not a truncated one
    assert exc.value.errno == errno.EINVAL  # the errno of the refusal, not ENOSPC


def test_log_growth_stops_at_the_maximum(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_LOG_START", 64)
    monkeypatch.setattr(loader, "_LOG_MAX", 4096)
    sizes: list[int] = []

    def prog_load(attr: syscall.Buffer) -> tuple[int, int]:
        level, size, buf = _log_request(attr)
        if level == 0:
            return -1, errno.EACCES
        sizes.append(size)
        _write_log(buf, size, b"x" * 100_000)
        return -1, errno.ENOSPC  # never fits

    kernel.handlers[Cmd.PROG_LOAD] = prog_load
    with pytest.raises(VerifierError) as exc:
        load_program(programs.pass_(), ProgType.SK_SKB)
    assert sizes == [64, 256, 1024, 4096]
    assert exc.value.errno == errno.EACCES
    assert len(exc.value.log) == 4095  # the truncated log is still handed over


def test_program_accepted_on_the_second_try_is_kept(kernel: FakeKernel) -> None:
    def prog_load(attr: syscall.Buffer) -> tuple[int, int]:
        level, _, _ = _log_request(attr)
        return (-1, errno.EAGAIN) if level == 0 else (kernel.new_fd(), 0)

    kernel.handlers[Cmd.PROG_LOAD] = prog_load
    with load_program(programs.pass_(), ProgType.SK_SKB) as p:
        assert p.fd in kernel.fds
        assert p.insn_count == 2
    assert kernel.calls == [Cmd.PROG_LOAD, Cmd.PROG_LOAD]


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.EPERM, PermissionDenied),
        (errno.E2BIG, MapFull),
        (errno.ENOMEM, BpfError),
        (errno.EBADF, BpfError),
    ],
    ids=["EPERM", "E2BIG", "ENOMEM", "EBADF"],
)
def test_non_verifier_refusals_are_not_retried(
    kernel: FakeKernel, err: int, cls: type[BpfError]
) -> None:
    kernel.handlers[Cmd.PROG_LOAD] = lambda attr: (-1, err)
    with pytest.raises(BpfError) as exc:
        load_program(programs.pass_(), ProgType.SK_MSG)
    assert type(exc.value) is cls
    assert not isinstance(exc.value, VerifierError)
    assert exc.value.errno == err
    assert "load SK_MSG program 'pass'" in str(exc.value)
    assert kernel.calls == [Cmd.PROG_LOAD]


def test_bpf_access_explains_eperm(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (-1, errno.EPERM)
    monkeypatch.setattr(features, "capabilities", lambda: dict.fromkeys(features.CAPS, False))
    monkeypatch.setattr(features, "_sysctl", lambda name: "2")
    permitted, why = features.bpf_access()
    assert permitted is False
    assert "EPERM" in why
    assert "lacks CAP_BPF, CAP_NET_ADMIN (and CAP_SYS_ADMIN)" in why
    assert "kernel.unprivileged_bpf_disabled=2" in why
    assert "run as root" in why


def test_bpf_access_names_only_the_missing_capabilities(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (-1, errno.EPERM)
    caps = dict.fromkeys(features.CAPS, False) | {"CAP_NET_ADMIN": True}
    monkeypatch.setattr(features, "capabilities", lambda: caps)
    monkeypatch.setattr(features, "_sysctl", lambda name: "0")
    _, why = features.bpf_access()
    assert "lacks CAP_BPF (and CAP_SYS_ADMIN)" in why  # CAP_NET_ADMIN is there: not named
    assert "unprivileged_bpf_disabled" not in why  # 0 blocks nothing


def test_bpf_access_with_sys_admin_does_not_blame_capabilities(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (-1, errno.EPERM)
    caps = dict.fromkeys(features.CAPS, False) | {"CAP_SYS_ADMIN": True}
    monkeypatch.setattr(features, "capabilities", lambda: caps)
    monkeypatch.setattr(features, "_sysctl", lambda name: None)
    permitted, why = features.bpf_access()
    assert permitted is False
    assert why.startswith("bpf() refused with EPERM; ")
    assert "lacks" not in why


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.ENOSYS, "no bpf() syscall (ENOSYS)"),
        (errno.EINVAL, "bpf() failed: [EINVAL]"),
    ],
)
def test_bpf_access_other_refusals(kernel: FakeKernel, err: int, words: str) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (-1, err)
    permitted, why = features.bpf_access()
    assert permitted is False
    assert words in why


def test_bpf_access_permitted_closes_its_probe(kernel: FakeKernel) -> None:
    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (kernel.new_fd(), 0)
    assert features.bpf_access() == (True, "bpf() is permitted")
    (fd,) = kernel.fds
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF


def test_map_ops_go_through_the_seam(kernel: FakeKernel) -> None:
    store: dict[bytes, bytes] = {}

    def update(attr: syscall.Buffer) -> tuple[int, int]:
        _, _, kaddr, vaddr, flags = struct.unpack_from("<IIQQQ", attr, 0)
        key, value = ctypes.string_at(kaddr, 4), ctypes.string_at(vaddr, 8)
        if flags == 1 and key in store:
            return -1, errno.EEXIST
        store[key] = value
        return 0, 0

    def lookup(attr: syscall.Buffer) -> tuple[int, int]:
        _, _, kaddr, vaddr, _ = struct.unpack_from("<IIQQQ", attr, 0)
        key = ctypes.string_at(kaddr, 4)
        if key not in store:
            return -1, errno.ENOENT
        ctypes.memmove(vaddr, store[key], 8)
        return 0, 0

    kernel.handlers[Cmd.MAP_CREATE] = lambda attr: (kernel.new_fd(), 0)
    kernel.handlers[Cmd.MAP_UPDATE_ELEM] = update
    kernel.handlers[Cmd.MAP_LOOKUP_ELEM] = lookup
    with ArrayMap.new(4) as m:
        m[2] = 0x1122
        assert m.lookup_int(2) == 0x1122
        with pytest.raises(KeyExists) as e1:
            m.update(2, 1, 1)
        assert "update array key 2" in str(e1.value)
        with pytest.raises(KeyNotFound) as e2:
            m.lookup(3)
        assert "look up array key 3" in str(e2.value)
    assert store == {struct.pack("<I", 2): struct.pack("<Q", 0x1122)}


@pytest.mark.parametrize("bad", [-1, -5])
def test_negative_fd_is_ebadf_without_a_syscall(kernel: FakeKernel, bad: int) -> None:
    with pytest.raises(BpfError) as exc:
        syscall.check_fd(bad, "insert")
    assert exc.value.errno == errno.EBADF
    assert kernel.calls == []


def test_check_fd_types() -> None:
    class HasFileno:
        def fileno(self) -> int:
            return 12

    assert syscall.check_fd(3, "insert") == 3
    assert syscall.check_fd(HasFileno(), "insert") == 12
    for bad in (True, 1.0, "3", None):
        with pytest.raises(TypeError):
            syscall.check_fd(bad, "insert")
