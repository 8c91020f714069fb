"""The sans-IO strparser: same messages whatever the split, the kernel's parse_msg contract."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sockmap.errors import StreamError
from sockmap.userspace.strparser import NEED_DATA, StrParser


def length_prefixed(prefix: memoryview, available: int) -> int:
    """4-byte big-endian length of the body, then the body."""
    del available
    if len(prefix) < 4:
        return 0
    return int(struct.unpack(">I", prefix[:4])[0]) + 4


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def drain(p: StrParser) -> list[bytes]:
    out = []
    while (m := p.next_message()) is not NEED_DATA:
        assert isinstance(m, bytes)
        out.append(m)
    return out


def feed_split(data: bytes, cuts: list[int], limit: int = 1 << 20) -> list[bytes]:
    p = StrParser(length_prefixed, limit)
    msgs: list[bytes] = []
    pos = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut <= pos:
            continue
        p.feed(data[pos:cut])
        msgs += drain(p)
        pos = cut
    assert p.buffered == 0
    return msgs


BODIES = [b"", b"a", b"hello", bytes(range(256)) * 3, b"x" * 70000]


def test_one_byte_at_a_time_gives_the_same_messages():
    data = b"".join(frame(b) for b in BODIES)
    assert feed_split(data, list(range(len(data)))) == [frame(b) for b in BODIES]


@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=20),
    st.lists(st.integers(min_value=0, max_value=8000), max_size=40),
)
def test_random_splits_give_the_same_messages(bodies: list[bytes], cuts: list[int]):
    data = b"".join(frame(b) for b in bodies)
    assert feed_split(data, cuts) == [frame(b) for b in bodies]


def test_need_more_header_then_body():
    p = StrParser(length_prefixed, 1000)
    p.feed(b"\0\0\0")
    assert p.next_message() is NEED_DATA
    assert p.stats.need_more_hdr == 1
    p.feed(b"\x05abcd")
    assert p.next_message() is NEED_DATA  # the header says 9 bytes; 8 are in
    p.feed(b"e")
    assert p.next_message() == b"\0\0\0\x05abcde"
    assert p.stats.msgs == 1
    assert p.stats.bytes == 9


def test_parser_that_returns_everything_is_whole_segment():
    p = StrParser(lambda prefix, available: available, 1000)
    p.feed(b"abc")
    p.feed(b"def")
    assert p.next_message() == b"abcdef"
    assert p.next_message() is NEED_DATA


def test_message_of_exactly_the_limit_passes_and_one_over_fails():
    ok = StrParser(length_prefixed, 104)
    ok.feed(frame(b"x" * 100))
    assert ok.next_message() == frame(b"x" * 100)
    over = StrParser(length_prefixed, 104)
    over.feed(frame(b"x" * 101)[:8])
    with pytest.raises(StreamError) as ei:
        over.next_message()
    assert ei.value.errno == errno.EMSGSIZE
    assert over.stats.msg_too_big == 1
    with pytest.raises(StreamError):  # the stream stays broken
        over.feed(b"more")


def test_no_length_within_the_limit_is_emsgsize():
    p = StrParser(lambda prefix, available: 0, 10)
    p.feed(b"0123456789")
    with pytest.raises(StreamError) as ei:
        p.next_message()
    assert ei.value.errno == errno.EMSGSIZE


def test_negative_return_is_the_socket_error():
    p = StrParser(lambda prefix, available: -errno.EPROTO, 100)
    p.feed(b"junk")
    with pytest.raises(StreamError) as ei:
        p.next_message()
    assert ei.value.errno == errno.EPROTO
    assert p.error == errno.EPROTO
    assert p.stats.aborts == 1


def test_prefix_size_limits_what_the_parser_sees():
    seen: list[int] = []

    def parse(prefix: memoryview, available: int) -> int:
        seen.append(len(prefix))
        return available

    p = StrParser(parse, 1 << 20, prefix_size=4)
    p.feed(b"x" * 1000)
    assert p.next_message() == b"x" * 1000
    assert seen == [4]
