"""Loading, verifier errors, and attaching programs to socket maps on the real kernel."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator

import pytest

from sockmap import asm, programs
from sockmap.abi import AttachType, Cmd, ProgType
from sockmap.asm import R0, R1, R2
from sockmap.errors import BpfError, KeyNotFound, UnsupportedSocket, VerifierError
from sockmap.kernel import programs as loader
from sockmap.kernel import syscall
from sockmap.kernel.attach import attach, detach, query
from sockmap.kernel.engine import KernelEngine
from sockmap.kernel.maps import ArrayMap, HashMap, Map, SockHash, SockMap
from sockmap.kernel.programs import Prog, load_program

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("bpf")]

SOCK_MAPS = pytest.mark.parametrize("cls", [SockMap, SockHash], ids=["sockmap", "sockhash"])

# attach type -> (program type it needs, a program of that type)
ATTACH_KINDS: dict[AttachType, tuple[ProgType, Callable[[], asm.Program]]] = {
    AttachType.SK_SKB_STREAM_PARSER: (ProgType.SK_SKB, programs.whole_segment),
    AttachType.SK_SKB_STREAM_VERDICT: (ProgType.SK_SKB, programs.pass_),
    AttachType.SK_SKB_VERDICT: (ProgType.SK_SKB, programs.pass_),
    AttachType.SK_MSG_VERDICT: (ProgType.SK_MSG, programs.pass_),
}


@pytest.fixture
def objs() -> Iterator[list[Map | Prog]]:
    """Maps and programs appended here are closed at teardown (programs first)."""
    made: list[Map | Prog] = []
    yield made
    for o in sorted(made, key=lambda o: isinstance(o, Map)):
        o.close()


@pytest.fixture
def load(objs) -> Callable[..., Prog]:
    def _load(program: asm.Program | bytes, ptype: ProgType, **kw: object) -> Prog:
        p = load_program(program, ptype, **kw)
        objs.append(p)
        return p

    return _load


@pytest.fixture
def new_map(objs) -> Callable[..., Map]:
    def _new(cls: type[SockMap] | type[ArrayMap], n: int = 2, **kw: int) -> Map:
        m = cls.new(n, **kw)
        objs.append(m)
        return m

    return _new


@pytest.fixture
def prog_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(log_level, log_size, errno) of every BPF_PROG_LOAD while the test runs."""
    seen: list[tuple[int, int, int]] = []
    real = syscall.bpf_call

    def spy(cmd: int, attr: syscall.Buffer) -> tuple[int, int]:
        res, err = real(cmd, attr)
        if cmd == Cmd.PROG_LOAD:
            level, size = struct.unpack_from("<II", attr, 24)
            seen.append((level, size, err))
        return res, err

    monkeypatch.setattr(syscall, "bpf_call", spy)
    return seen


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("ptype", [ProgType.SK_SKB, ProgType.SK_MSG, ProgType.SOCK_OPS])
def test_load_trivial(load, ptype: ProgType) -> None:
    p = load(programs.pass_(), ptype)
    info = p.info()
    assert info.type == ptype
    assert info.name == p.name == "pass"
    assert info.map_ids == ()
    assert info.id > 0
    assert info.xlated_len == 8 * p.insn_count == 16
    assert ptype.name in repr(p)
    p.close()
    assert p.closed
    with pytest.raises(BpfError) as exc:
        p.info()
    assert exc.value.errno == errno.EBADF
    p.close()  # twice is fine


def test_info_lists_the_maps_a_program_uses(load, new_map) -> None:
    sm, peers, other = new_map(SockMap), new_map(HashMap), new_map(SockHash)
    p = load(programs.redirect_peer(sm, peers), ProgType.SK_SKB)
    info = p.info()
    assert info.name == "redirect_peer"
    assert sorted(info.map_ids) == sorted([sm.info().id, peers.info().id])
    assert other.info().id not in info.map_ids
    q = load(programs.redirect_key(sm, 0), ProgType.SK_SKB)
    assert q.info().map_ids == (sm.info().id,)


def test_program_names_are_sanitised_and_truncated(load) -> None:
    p = load(programs.pass_(), ProgType.SK_SKB, name="my-prog.v2")
    assert p.name == "my_prog_v2" == p.info().name
    q = load(programs.pass_(), ProgType.SK_SKB, name="a_very_long_program_name")
    assert q.info().name == "a_very_long_pro"  # 15 bytes + NUL


# ------------------------------------------------------------------ verifier errors

REJECTED: list[tuple[str, list[asm.Item], int, str]] = [
    ("exit-without-r0", [asm.exit_()], errno.EACCES, "R0 !read_ok"),
    ("uninitialised-r2", [asm.mov(R0, R2), asm.exit_()], errno.EACCES, "R2 !read_ok"),
    (
        "ctx-read-out-of-bounds",
        [asm.ldx(asm.W, R0, R1, 4000), asm.exit_()],
        errno.EACCES,
        "invalid bpf_context access off=4000",
    ),
    (
        "ctx-write",
        [asm.st(asm.W, R1, 0, 1), asm.mov(R0, 0), asm.exit_()],
        errno.EACCES,
        "invalid bpf_context access off=0",
    ),
    (
        "unknown-helper",
        [asm.call(9999), asm.mov(R0, 0), asm.exit_()],
        errno.EINVAL,
        "invalid func unknown#9999",
    ),
    (
        "unreachable-insn",
        [asm.mov(R0, 0), asm.exit_(), asm.mov(R0, 1), asm.exit_()],
        errno.EINVAL,
        "unreachable insn 2",
    ),
]


@pytest.mark.parametrize(
    ("insns", "err", "reason"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
def test_rejected_program_raises_verifier_error_with_log(
    load, prog_loads, insns, err: int, reason: str
) -> None:
    prog = asm.Program(insns, name="bad_one")
    with pytest.raises(VerifierError) as exc:
        load(prog, ProgType.SK_SKB)
    e = exc.value
    assert e.errno == err
    assert reason in e.log
    assert e.log.strip()
    text = str(e)
    first = text.splitlines()[0]
    assert first.startswith(f"[{errno.errorcode[err]}] load SK_SKB program 'bad_one'")
    assert reason in first  # the reason line is picked out of the log
    assert "verifier log (last lines):" in text
    # quiet first, then once more with the log
    assert [(level, e_) for level, _, e_ in prog_loads] == [(0, err), (1, err)]


def test_raw_garbage_bytes_are_rejected_with_the_kernel_log(load) -> None:
    with pytest.raises(VerifierError) as exc:
        load(b"\xff" * 8, ProgType.SK_SKB, name="raw")
    assert exc.value.errno == errno.EINVAL
    assert "last insn is not an exit or jmp" in exc.value.log
    assert "program 'raw'" in str(exc.value)


@pytest.mark.parametrize("size", [0, 4, 12, 17])
def test_raw_bytes_not_whole_instructions(load, prog_loads, size: int) -> None:
    with pytest.raises(VerifierError) as exc:
        load(b"\x95" + bytes(size - 1) if size else b"", ProgType.SK_SKB, name="raw")
    assert exc.value.errno == errno.EINVAL
    assert f"is {size} bytes" in str(exc.value)
    assert "program 'raw'" in str(exc.value)
    assert prog_loads == []  # refused before the syscall


def test_log_grows_on_enospc_until_the_whole_log_fits(
    load, prog_loads, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a program whose verifier log is a few KiB
    prog = asm.Program([asm.mov(R0, 0)] * 60 + [asm.mov(R0, R2), asm.exit_()], name="biglog")
    with pytest.raises(VerifierError) as full:
        load(prog, ProgType.SK_SKB)
    reference = full.value.log
    assert len(reference) > 1000
    prog_loads.clear()
    monkeypatch.setattr(loader, "_LOG_START", 64)
    with pytest.raises(VerifierError) as grown:
        load(prog, ProgType.SK_SKB)
    assert grown.value.log == reference
    assert grown.value.errno == full.value.errno == errno.EACCES
    sizes = [size for level, size, _ in prog_loads if level]
    errs = [e for level, _, e in prog_loads if level]
    assert sizes[0] == 64
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == len(sizes)
    assert len(sizes) >= 3
    assert errs[:-1] == [errno.ENOSPC] * (len(errs) - 1)  # too small: ENOSPC ...
    assert errs[-1] == errno.EACCES  # ... until it fits, then the real answer
    assert sizes[-1] > len(reference) >= sizes[-2] - 1


# ------------------------------------------------------------------ attach / detach / query


@SOCK_MAPS
@pytest.mark.parametrize("kind", list(ATTACH_KINDS), ids=lambda k: k.name)
def test_attach_query_detach(load, new_map, cls, kind: AttachType) -> None:
    ptype, make = ATTACH_KINDS[kind]
    m = new_map(cls)
    p = load(make(), ptype)
    assert query(m, kind) == []
    attach(m, p, kind)
    assert query(m, kind) == [p.info().id]
    attach(m, p, kind)  # attaching the same program again is allowed
    assert query(m, kind) == [p.info().id]
    detach(m, p, kind)
    assert query(m, kind) == []
    with pytest.raises(KeyNotFound) as exc:  # nothing attached any more
        detach(m, p, kind)
    assert exc.value.errno == errno.ENOENT
    assert "detach" in str(exc.value)


@SOCK_MAPS
def test_attach_replaces_the_program(load, new_map, cls) -> None:
    m = new_map(cls)
    a = load(programs.pass_(), ProgType.SK_SKB)
    b = load(programs.drop(), ProgType.SK_SKB)
    attach(m, a, AttachType.SK_SKB_VERDICT)
    attach(m, b, AttachType.SK_SKB_VERDICT)
    assert query(m, AttachType.SK_SKB_VERDICT) == [b.info().id]
    with pytest.raises(KeyNotFound):  # detach names the program: the replaced one is gone
        detach(m, a, AttachType.SK_SKB_VERDICT)
    detach(m, b, AttachType.SK_SKB_VERDICT)


@SOCK_MAPS
@pytest.mark.parametrize(
    ("first", "second"),
    [
        (AttachType.SK_SKB_VERDICT, AttachType.SK_SKB_STREAM_VERDICT),
        (AttachType.SK_SKB_STREAM_VERDICT, AttachType.SK_SKB_VERDICT),
    ],
    ids=["verdict-then-stream", "stream-then-verdict"],
)
def test_conflicting_verdict_kinds_are_ebusy(
    load, new_map, cls, first: AttachType, second: AttachType
) -> None:
    m = new_map(cls)
    p = load(programs.pass_(), ProgType.SK_SKB)
    attach(m, p, first)
    with pytest.raises(BpfError) as exc:
        attach(m, p, second)
    assert exc.value.errno == errno.EBUSY
    assert str(exc.value).startswith("[EBUSY] attach ")
    assert "detach it first" in str(exc.value)
    # Surprise: even *querying* the other verdict kind is EBUSY while one is attached.
    with pytest.raises(BpfError) as q:
        query(m, second)
    assert q.value.errno == errno.EBUSY
    assert "query" in str(q.value)
    assert query(m, first) == [p.info().id]
    detach(m, p, first)  # the first one still detaches
    attach(m, p, second)  # and then the other kind is free
    assert query(m, second) == [p.info().id]
    detach(m, p, second)


WRONG_TYPE = [
    (ProgType.SK_MSG, AttachType.SK_SKB_STREAM_PARSER),
    (ProgType.SK_MSG, AttachType.SK_SKB_STREAM_VERDICT),
    (ProgType.SK_MSG, AttachType.SK_SKB_VERDICT),
    (ProgType.SK_SKB, AttachType.SK_MSG_VERDICT),
    (ProgType.SOCK_OPS, AttachType.SK_SKB_STREAM_VERDICT),
    (ProgType.SOCKET_FILTER, AttachType.SK_SKB_VERDICT),
    (ProgType.SK_SKB, AttachType.CGROUP_INET_INGRESS),  # not a sockmap attach type at all
]


@SOCK_MAPS
@pytest.mark.parametrize(
    ("ptype", "kind"), WRONG_TYPE, ids=[f"{p.name}-as-{k.name}" for p, k in WRONG_TYPE]
)
def test_wrong_program_type_for_attach_type_is_einval(
    load, new_map, cls, ptype: ProgType, kind: AttachType
) -> None:
    m = new_map(cls)
    p = load(programs.pass_(), ptype)
    with pytest.raises(BpfError) as exc:
        attach(m, p, kind)
    assert type(exc.value) is BpfError
    assert exc.value.errno == errno.EINVAL
    assert str(exc.value).startswith("[EINVAL] attach ")
    assert "'pass'" in str(exc.value)


def test_attach_to_a_non_socket_map_is_eopnotsupp(load, new_map) -> None:
    arr = new_map(ArrayMap, 1)
    p = load(programs.pass_(), ProgType.SK_SKB)
    with pytest.raises(BpfError) as exc:
        attach(arr, p, AttachType.SK_SKB_VERDICT)
    assert not isinstance(exc.value, UnsupportedSocket)  # the map is wrong, not a socket
    assert exc.value.errno == errno.EOPNOTSUPP
    assert "attach verdict" in str(exc.value)
    assert "to array" in str(exc.value)


def test_attach_to_a_non_socket_map_hint_is_about_the_map(load, new_map) -> None:
    arr = new_map(ArrayMap, 1)
    p = load(programs.pass_(), ProgType.SK_SKB)
    with pytest.raises(BpfError) as exc:
        attach(arr, p, AttachType.SK_SKB_VERDICT)
    assert "may be inserted" not in str(exc.value)
    assert "SOCKMAP" in str(exc.value) or "sockmap" in str(exc.value).split(":", 1)[1]


def test_attach_with_closed_program_or_map_is_ebadf(load, new_map) -> None:
    m = new_map(SockMap)
    p = load(programs.pass_(), ProgType.SK_SKB)
    p.close()
    with pytest.raises(BpfError) as e1:
        attach(m, p, AttachType.SK_SKB_VERDICT)
    assert e1.value.errno == errno.EBADF
    q = load(programs.pass_(), ProgType.SK_SKB)
    m.close()
    with pytest.raises(BpfError) as e2:
        attach(m, q, AttachType.SK_SKB_VERDICT)
    assert e2.value.errno == errno.EBADF


# ------------------------------------------------------------------ the engine's attach


def _attached(m: SockMap) -> dict[AttachType, list[int]]:
    out = {}
    for kind in (
        AttachType.SK_SKB_STREAM_PARSER,
        AttachType.SK_SKB_STREAM_VERDICT,
        AttachType.SK_MSG_VERDICT,
    ):
        out[kind] = query(m, kind)
    return out


def test_engine_attach_and_detach() -> None:
    with KernelEngine() as eng:
        m = eng.sockmap(2)
        att = eng.attach(
            m,
            parser=programs.whole_segment(),
            verdict=programs.pass_(),
            msg_verdict=programs.pass_(),
        )
        assert att.verdict_kind == AttachType.SK_SKB_STREAM_VERDICT
        assert att.parser is not None
        assert att.verdict is not None
        assert att.msg_verdict is not None
        assert att.msg_verdict.prog_type == ProgType.SK_MSG
        assert _attached(m) == {
            AttachType.SK_SKB_STREAM_PARSER: [att.parser.info().id],
            AttachType.SK_SKB_STREAM_VERDICT: [att.verdict.info().id],
            AttachType.SK_MSG_VERDICT: [att.msg_verdict.info().id],
        }
        att.detach()
        assert not any(_attached(m).values()), _attached(m)
        h = eng.sockhash(2)
        only = eng.attach(h, verdict=programs.drop())
        assert only.verdict_kind == AttachType.SK_SKB_VERDICT
        assert only.verdict is not None
        assert query(h, AttachType.SK_SKB_VERDICT) == [only.verdict.info().id]
        only.detach()
        assert query(h, AttachType.SK_SKB_VERDICT) == []


def test_engine_attach_rolls_back_when_the_verdict_attach_fails(load) -> None:
    with KernelEngine() as eng:
        m = eng.sockmap(2)
        squatter = load(programs.drop(), ProgType.SK_SKB)
        attach(m, squatter, AttachType.SK_SKB_VERDICT)  # makes STREAM_VERDICT EBUSY
        with pytest.raises(BpfError) as exc:
            eng.attach(m, parser=programs.whole_segment(), verdict=programs.pass_())
        assert exc.value.errno == errno.EBUSY
        # the parser, attached first, was detached again; the squatter is untouched
        assert query(m, AttachType.SK_SKB_STREAM_PARSER) == []
        assert query(m, AttachType.SK_SKB_VERDICT) == [squatter.info().id]
        detach(m, squatter, AttachType.SK_SKB_VERDICT)


def test_engine_attach_rolls_back_when_the_last_attach_fails(load) -> None:
    with KernelEngine() as eng:
        m = eng.sockmap(2)
        wrong = load(programs.pass_(), ProgType.SK_SKB)  # an SK_SKB program as sk_msg verdict
        with pytest.raises(BpfError) as exc:
            eng.attach(
                m, parser=programs.whole_segment(), verdict=programs.pass_(), msg_verdict=wrong
            )
        assert exc.value.errno == errno.EINVAL
        assert "sk_msg verdict" in str(exc.value)
        assert not any(_attached(m).values()), _attached(m)
        # the map is usable afterwards
        att = eng.attach(m, parser=programs.whole_segment(), verdict=programs.pass_())
        assert att.parser is not None
        assert query(m, AttachType.SK_SKB_STREAM_PARSER) == [att.parser.info().id]
