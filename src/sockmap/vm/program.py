"""``load()``: validate a program once, prepare its fast path, and run it."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Protocol

from sockmap.abi import ProgType
from sockmap.asm.instruction import Instruction
from sockmap.asm.program import Program, decode
from sockmap.errors import AssemblyError, VmError
from sockmap.vm._semantics import M32, sext
from sockmap.vm.api import HelperEnv, VmMap
from sockmap.vm.context import MsgContext, SkbContext, SockOpsContext, access_table
from sockmap.vm.interp import interpret
from sockmap.vm.memory import Memory, Region, Static
from sockmap.vm.translate import translate
from sockmap.vm.validate import Checked, refusal, validate

__all__ = ["DEFAULT_BUDGET", "MapResolver", "VmProgram", "load"]

DEFAULT_BUDGET = 1_000_000
"""Instructions one run may execute before it is stopped."""
BPF_MAXINSNS = 4096

MapResolver = Callable[[object], VmMap | None] | Mapping[object, VmMap]


class _Encodable(Protocol):
    def encode(self, map_fd: Callable[[object], int] | None = None) -> bytes: ...


def _default_resolve(ref: object) -> VmMap | None:
    return ref if hasattr(ref, "vm_lookup") else None  # type: ignore[return-value]


def _resolver(maps: MapResolver | None) -> Callable[[object], VmMap | None]:
    if maps is None:
        return _default_resolve
    if isinstance(maps, Mapping):
        table = maps

        def by_key(ref: object) -> VmMap | None:
            if hasattr(ref, "vm_lookup"):
                return ref  # type: ignore[return-value]
            return table.get(ref)

        return by_key
    return maps


def _layout(
    program: Program | bytes | bytearray | memoryview,
) -> tuple[list[tuple[int, Instruction]], int]:
    try:
        if isinstance(program, Program):
            placed = program.layout()
        else:
            placed = []
            pc = 0
            for ins in decode(bytes(program)):
                placed.append((pc, ins))
                pc += ins.slots
    except AssemblyError as exc:
        raise refusal(errno.EINVAL, f"malformed program: {exc}") from exc
    n = placed[-1][0] + placed[-1][1].slots if placed else 0
    return placed, n


class VmProgram:
    """A validated program, ready to run in the VM (thread-safe: runs share no state)."""

    def __init__(
        self, checked: Checked, prog_type: ProgType, name: str, fast: bool, budget: int
    ) -> None:
        self.checked = checked
        self.prog_type = prog_type
        self.name = name
        self.budget = budget
        self.maps: list[VmMap] = checked.maps
        self.max_packet_offset: int | None = checked.max_packet_offset
        """Highest packet byte offset the program can look at (-1: none); None if unknown."""
        self.insn_count = len(checked.insns)
        handles = [Region(None, 0, f"map#{i}") for i in range(len(checked.maps))]
        self._static = Static(
            prog_type,
            access_table(prog_type),
            handles,
            self.maps,
            packet_writes=checked.packet_writes,
        )
        self._ctx_type: type = {
            ProgType.SK_MSG: MsgContext,
            ProgType.SOCK_OPS: SockOpsContext,
        }.get(prog_type, SkbContext)
        self.source: str | None = None
        self._fast: Callable[[Memory, object], int] | None = None
        if fast:
            self._fast, self.source = translate(checked, prog_type, budget, name)

    @property
    def fast(self) -> bool:
        """True when runs use the translated function."""
        return self._fast is not None

    def _memory(self, ctx: SkbContext | MsgContext, env: HelperEnv | None) -> Memory:
        return Memory(self._static, ctx, env)

    def _check_ctx(self, ctx: object) -> None:
        if type(ctx) is not self._ctx_type:
            raise VmError(
                f"a {self.prog_type.name} program runs on a {self._ctx_type.__name__}, "
                f"not {type(ctx).__name__}"
            )

    def run(self, ctx: SkbContext | MsgContext, env: HelperEnv | None = None) -> int:
        """Run once; returns r0 as the u64 register value."""
        if type(ctx) is not self._ctx_type:
            self._check_ctx(ctx)
        fast = self._fast
        if fast is not None:
            return fast(Memory(self._static, ctx, env), ctx)
        return interpret(self.checked, Memory(self._static, ctx, env), self.budget)

    def interpret(self, ctx: SkbContext | MsgContext, env: HelperEnv | None = None) -> int:
        """Run once with the reference interpreter (whatever ``fast`` was)."""
        self._check_ctx(ctx)
        return interpret(self.checked, self._memory(ctx, env), self.budget)

    def run_signed(self, ctx: SkbContext | MsgContext, env: HelperEnv | None = None) -> int:
        """r0 as the kernel's ``int`` return of a parser: the low 32 bits, signed."""
        return sext(self.run(ctx, env) & M32, 32)

    def __repr__(self) -> str:
        mode = "fast" if self.fast else "interpreted"
        return f"<VmProgram {self.name!r} {self.prog_type.name} {self.insn_count} insns {mode}>"


def load(
    program: Program | _Encodable | bytes | bytearray | memoryview,
    prog_type: ProgType = ProgType.SK_SKB,
    maps: MapResolver | None = None,
    name: str = "",
    fast: bool = True,
    max_insns: int = BPF_MAXINSNS,
    budget: int = DEFAULT_BUDGET,
) -> VmProgram:
    """Validate ``program`` for ``prog_type`` and prepare it to run.

    ``maps`` resolves each map reference of the program (a ``ld_map_fd`` object, or the
    fd in raw bytes) to a :class:`VmMap`: a callable or a mapping; by default a reference
    that has ``vm_lookup`` is its own map. Raises :class:`VerifierError` (with ``log``)
    when the program is refused.
    """
    if not isinstance(program, Program | bytes | bytearray | memoryview):
        encode = getattr(program, "encode", None)
        if encode is None:
            raise refusal(errno.EINVAL, f"cannot load {type(program).__name__}: not a program")
        items = getattr(program, "items", None)
        program = Program(items) if items is not None else bytes(encode())
    placed, n = _layout(program)
    pname = name or (program.name if isinstance(program, Program) else "")
    checked = validate(placed, n, ProgType(prog_type), _resolver(maps), max_insns)
    return VmProgram(checked, ProgType(prog_type), pname, fast, budget)
