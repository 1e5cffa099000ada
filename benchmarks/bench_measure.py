"""Run a command as a fresh process and measure it: wall time, peak RSS, peak anonymous RSS.

- wall time: from just before the fork to the moment the process is reaped (imports included);
- peak RSS: `ru_maxrss` of that process from `wait4` (the kernel's high-water mark, VmHWM).
  Linux also folds the RSS of the forking parent into it, so the harness must stay small (it
  never imports torch); `VmHWM` polled from /proc is kept alongside as a check;
- peak anonymous RSS: the largest `RssAnon` seen by polling `/proc/<pid>/status` from this
  (parent) process every 5 ms. Anonymous memory is what the process allocated itself; it
  leaves out file pages (mmap'd safetensors, shared libraries) that the kernel can drop.
  Spikes shorter than the poll interval can be missed, so it is a lower bound.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_INTERVAL_S = 0.005


@dataclass(frozen=True)
class Sample:
    wall_s: float
    peak_rss: int  # bytes
    peak_anon: int  # bytes
    hwm_polled: int = 0  # bytes: last VmHWM seen by polling (a lower bound of peak_rss)


@dataclass(frozen=True)
class Summary:
    samples: list[Sample]

    @property
    def wall_s(self) -> float:
        return statistics.median(s.wall_s for s in self.samples)

    @property
    def peak_rss(self) -> float:
        return statistics.median(s.peak_rss for s in self.samples)

    @property
    def peak_anon(self) -> float:
        return statistics.median(s.peak_anon for s in self.samples)

    @property
    def peak_rss_max(self) -> int:
        return max(s.peak_rss for s in self.samples)

    @property
    def peak_anon_max(self) -> int:
        return max(s.peak_anon for s in self.samples)

    @property
    def wall_range(self) -> tuple[float, float]:
        walls = [s.wall_s for s in self.samples]
        return min(walls), max(walls)


class CommandFailed(RuntimeError):
    pass


def _memory(pid: int) -> tuple[int, int] | None:
    """(RssAnon, VmHWM) in bytes, or None once the process is gone (a zombie has no memory lines)."""
    anon = hwm = None
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None if anon is None or hwm is None else (anon, hwm)


def run(cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Sample:
    """Run `cmd` to completion and measure it; raise `CommandFailed` on a non-zero exit."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=cwd)
        peak = [0, 0]
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                value = _memory(proc.pid)
                if value is not None:
                    peak[0] = max(peak[0], value[0])
                    peak[1] = max(peak[1], value[1])
                stop.wait(POLL_INTERVAL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        stop.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise CommandFailed(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return Sample(wall, usage.ru_maxrss * 1024, peak[0], peak[1])


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def meminfo_bytes(field: str) -> int:
    """One field of /proc/meminfo (e.g. `Cached`, `MemAvailable`), in bytes; 0 when absent."""
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def cached_bytes() -> int:
    """Page cache size (`Cached` in /proc/meminfo)."""
    return meminfo_bytes("Cached")


def read_files(paths: Sequence[Path], chunk: int = 16 << 20) -> int:
    """Read files to /dev/null (to fill the page cache); return the bytes read."""
    total = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def check_drop_caches(probe: Sequence[Path]) -> tuple[bool, str]:
    """Whether dropping the page cache works here, with the evidence as a sentence."""
    try:
        read_files(probe)
        before = cached_bytes()
        drop_page_cache()
        after = cached_bytes()
    except OSError as exc:
        return False, f"writing /proc/sys/vm/drop_caches failed ({exc.strerror or exc})"
    probe_bytes = sum(p.stat().st_size for p in probe)
    works = before - after >= 0.8 * probe_bytes
    verdict = "works" if works else "had no effect"
    return works, (f"dropping the page cache {verdict}: page cache {before / 2**30:.2f} GiB before, "
                   f"{after / 2**30:.2f} GiB after, after reading {probe_bytes / 2**30:.2f} GiB")
