"""Process memory and machine load, read from /proc (no psutil needed), and a guard for shared machines.

* `Watch` samples this process's RSS every `interval` seconds in a thread, keeps the peak overall and per
  stage (`with watch.stage("name")`), and aborts the process (exit 75, after writing `abort_path`) when the
  machine's MemAvailable or the disk's free space drops below a floor: a benchmark that would exhaust a
  shared 24 GiB machine stops itself instead of being OOM-killed (or killing someone else's job).
* `Clock` measures a section's wall and CPU time and how busy the rest of the machine was meanwhile
  (other processes' CPU use in cores, from /proc/stat minus this process), so timings taken under load
  can be judged.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

GIB = 1024**3
_TICK = os.sysconf("SC_CLK_TCK")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _status_kb("VmRSS")


def peak_rss() -> int:
    """The kernel's high-water mark of this process's RSS (VmHWM)."""
    return _status_kb("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _machine_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


def _self_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (all threads)


class Clock:
    """`with Clock() as c: ...` then c.result(): wall_s, cpu_s, other_cores (mean CPU use of other processes)."""

    def __enter__(self):
        self.load = os.getloadavg()[0]
        self.busy0, _ = _machine_jiffies()
        self.self0 = _self_jiffies()
        self.cpu0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.cpu0
        busy1, _ = _machine_jiffies()
        mine = _self_jiffies() - self.self0
        self.other_cores = max(0.0, (busy1 - self.busy0 - mine) / _TICK / max(self.wall, 1e-9))
        return False

    def result(self) -> dict:
        return {"wall_s": round(self.wall, 4), "cpu_s": round(self.cpu, 4),
                "other_cores": round(self.other_cores, 2), "loadavg_1m_before": round(self.load, 2)}


class Watch:
    def __init__(self, interval: float = 0.05, min_available: int = int(1.5 * GIB), disk_path: Path | None = None,
                 min_disk_free: int = 12 * GIB, abort_path: Path | None = None):
        self.interval = interval
        self.min_available = min_available
        self.disk_path = Path(disk_path) if disk_path else None
        self.min_disk_free = min_disk_free
        self.abort_path = Path(abort_path) if abort_path else None
        self.current = "start"
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.peak = 0
        self.min_avail_seen = mem_available()
        self.min_disk_seen = shutil.disk_usage(self.disk_path).free if self.disk_path else None
        self.context: dict = {}
        self.cleanup: set[Path] = set()  # temp folders removed before an abort exits (traces of the run)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memwatch")

    def start(self) -> "Watch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sample()

    @contextmanager
    def stage(self, name: str):
        prev = self.current
        self.current = name
        if name not in self.peaks:
            self.order.append(name)
        try:
            yield
        finally:
            self._sample()
            self.current = prev

    def _sample(self) -> None:
        r = max(rss(), 0)
        self.peak = max(self.peak, r)
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), r)
        if self.current not in self.order:
            self.order.append(self.current)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            self._sample()
            avail = mem_available()
            self.min_avail_seen = min(self.min_avail_seen, avail)
            if avail < self.min_available:
                self._abort(f"MemAvailable fell to {avail / GIB:.2f} GiB (floor {self.min_available / GIB:.1f} GiB)")
            n += 1
            if self.disk_path and n % 20 == 0:
                free = shutil.disk_usage(self.disk_path).free
                self.min_disk_seen = min(self.min_disk_seen, free)
                if free < self.min_disk_free:
                    self._abort(f"free disk at {self.disk_path} fell to {free / GIB:.1f} GiB "
                                f"(floor {self.min_disk_free / GIB:.0f} GiB)")

    def _abort(self, why: str) -> None:
        report = {"aborted": True, "reason": why, "stage": self.current, "rss_bytes": rss(),
                  "peak_rss_bytes": self.peak, "stage_peaks_bytes": self.report()["stage_peaks_bytes"],
                  "context": self.context}
        for p in list(self.cleanup):
            shutil.rmtree(p, ignore_errors=True)
        if self.abort_path:
            tmp = self.abort_path.with_name(self.abort_path.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1, default=str))
            os.replace(tmp, self.abort_path)
        os._exit(75)

    def report(self) -> dict:
        return {"peak_rss_bytes": max(self.peak, peak_rss()),
                "stage_peaks_bytes": {k: self.peaks.get(k, 0) for k in self.order},
                "min_mem_available_bytes": self.min_avail_seen,
                "min_disk_free_bytes": self.min_disk_seen}
