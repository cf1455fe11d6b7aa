"""CPU time of a process under test, from ``/proc`` (Linux).

``tree_cpu_seconds(pid)`` is utime+stime of the process and every live descendant (a
``--workers`` supervisor and its workers, nginx's master and worker), all threads included (the
kernel sums a process's threads in ``/proc/<pid>/stat``). Read it right before and right after a
measured window: the difference over the requests completed in the window is the CPU time per
request. Resolution is one clock tick (usually 10 ms): a window of a few seconds at full load
holds hundreds of ticks.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """utime+stime of one process (all its threads); 0.0 when it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    # After the name: state is f[0]; utime and stime are fields 14 and 15 of the whole line.
    return (int(f[11]) + int(f[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def tree(pid: int) -> list[int]:
    """The process and its live descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += children(p)
    return seen


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in tree(pid))
