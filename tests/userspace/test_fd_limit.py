"""At the open-file limit the userspace engine cannot make its own duplicate of a socket:
the insert fails with EMFILE, says what to do, and leaves map and datapath as they
were (the kernel's maps take no descriptor, so there the same insert succeeds)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import errno, resource, socket, time
from sockmap import programs
from sockmap.errors import BpfError
from sockmap.userspace.engine import UserspaceEngine

eng = UserspaceEngine()
m = eng.sockmap(4)
eng.attach(m, verdict=programs.pass_())
lst = socket.create_server(("127.0.0.1", 0))
a = socket.create_connection(lst.getsockname())
b, _ = lst.accept()
m[0] = a  # room to spare: taken
spare = []
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
try:
    while True:
        spare.append(socket.socket())
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
try:
    m[1] = b
except BpfError as exc:
    print("errno", exc.errno)
    print("message", exc)
else:
    print("taken")
print("held", sorted(k for k, _ in m.items()))
for s in spare:
    s.close()
m[1] = b  # with room again: taken
print("held_after", sorted(k for k, _ in m.items()))
a.sendall(b"x")
got, deadline = b"", time.monotonic() + 5
while not got and time.monotonic() < deadline:
    got = eng.recv(b)
    time.sleep(0.005)
print("passed", got)
eng.close()
"""


def test_an_insert_at_the_open_file_limit_fails_cleanly() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["errno"] == "24", out.stdout  # EMFILE
    assert "ulimit -n" in lines["message"]
    assert lines["held"] == "[0]"  # the failed insert left nothing behind
    assert lines["held_after"] == "[0, 1]"
    assert lines["passed"] == "b'x'"  # the datapath still runs
