"""CPU seconds: of this process (the I/O process) and of another pid.

The slow-path worker's CPU is the stand-in for the seed's dom0 CPU, so it is
read the way ``top`` reads it: utime + stime from ``/proc/<pid>/stat``, in
clock ticks (10 ms on most kernels; good enough for bursts of thousands of
round trips, not for single calls). A process that has been reaped no longer
has a ``/proc`` entry; its final figure comes from ``os.wait4`` instead (see
``rusage_seconds``).
"""

from __future__ import annotations

import os
import resource

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds() -> float:
    """User + system CPU of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pid_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid`` from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or
    # parentheses itself: split after the last ')'. utime, stime are fields
    # 14 and 15, i.e. the 12th and 13th after the state field.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def pid_exec_seconds(pid: int) -> float | None:
    """CPU time of ``pid``'s threads from the scheduler, in ns precision, or None.

    ``/proc/<pid>/task/<tid>/schedstat`` starts with the thread's
    ``sum_exec_runtime``: exact, where ``pid_cpu_seconds`` counts in clock
    ticks (a window of a few hundred short round trips can read as 0 or
    10 ms there). Threads that already exited are not included.
    """
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread is gone, or no schedstat on this kernel
    return total / 1e9


def rusage_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime
