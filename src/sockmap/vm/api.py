"""The seams between the eBPF VM and the userspace engine that drives it.

The VM runs validated bytecode against a context (the message) and calls back into
the engine for everything outside the program: maps, the redirect target, the
socket's cookie, time and randomness. Both sides code against these protocols.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["HelperEnv", "VmMap"]


class VmMap(Protocol):
    """A userspace map as a program sees it (ARRAY, HASH, SOCKMAP, SOCKHASH)."""

    @property
    def map_type(self) -> int:
        """``MapType`` value."""

    @property
    def key_size(self) -> int: ...

    @property
    def value_size(self) -> int: ...

    @property
    def max_entries(self) -> int: ...

    def vm_lookup(self, key: bytes) -> bytearray | None:
        """The live value storage for ``key`` (writes through it change the map), or None.

        For SOCKMAP/SOCKHASH this is never called by the VM (programs redirect instead).
        """

    def vm_update(self, key: bytes, value: bytes, flags: int) -> int:
        """Update from a program: 0, or a negative errno as the kernel helper returns."""

    def vm_delete(self, key: bytes) -> int:
        """Delete from a program: 0, or a negative errno."""


class HelperEnv(Protocol):
    """What one program run may ask of the engine (one env per message)."""

    def redirect(self, smap: VmMap, key: bytes, flags: int) -> int:
        """``bpf_sk_redirect_map``/``_hash``/``msg_redirect_*``: choose the target.

        Returns SK_PASS (1) when a socket is at ``key`` and the flags are valid
        (only BPF_F_INGRESS), else SK_DROP (0) — the kernel's answer.
        """

    def socket_cookie(self) -> int:
        """``bpf_get_socket_cookie`` of the socket the message came from."""

    def ktime_ns(self) -> int: ...

    def prandom_u32(self) -> int: ...

    def apply_bytes(self, n: int) -> None:
        """SK_MSG ``bpf_msg_apply_bytes``."""

    def cork_bytes(self, n: int) -> None:
        """SK_MSG ``bpf_msg_cork_bytes``."""

    def sock_update(self, smap: VmMap, key: bytes, flags: int) -> int:
        """SOCK_OPS ``bpf_sock_map_update``/``bpf_sock_hash_update``: put the event's
        socket into ``smap`` under ``key``; 0 or a negative errno."""
