"""Context-manager plumbing shared by everything that has a ``close()``."""

from __future__ import annotations

import contextlib
import errno
import os
from types import TracebackType
from typing import ClassVar, Self

from sockmap.errors import bpf_error

__all__ = ["Closeable", "FdHandle"]


class Closeable:
    """``with obj:`` closes ``obj`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FdHandle(Closeable):
    """A kernel object reached through one fd that this handle owns."""

    kind: ClassVar[str] = "object"

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def fd(self) -> int:
        return self._fd_for("use")

    def _fd_for(self, what: str) -> int:
        """The fd, or EBADF saying that ``what`` was attempted on a closed handle."""
        if self._fd < 0:
            raise bpf_error(
                errno.EBADF,
                f"{what} {self!r}",
                f"the {self.kind} is closed; make a new one",
            )
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Drop our fd; the kernel frees the object once nothing else holds it."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:  # EBADF: already closed behind our back
                    raise

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            self.close()
