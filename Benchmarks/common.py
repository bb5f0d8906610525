"""Shared pieces of the benchmarks: measuring a command's wall time and peak RSS."""
import os
import shutil
import statistics
import time


def measure(cmd):
    """Wall seconds and peak RSS (bytes) of one command, from wait4's rusage of that child alone.
    posix_spawn (no copy of this process's pages) keeps the parent out of the child's RSS."""
    exe = cmd[0] if "/" in cmd[0] else shutil.which(cmd[0])
    start = time.perf_counter()
    pid = os.posix_spawn(exe, cmd, os.environ)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return wall, usage.ru_maxrss * 1024


def alternate(cmds, rounds, before_each=None):
    """Runs the commands in turn, `rounds` times; returns {name: [(seconds, peak RSS)]}."""
    results = {k: [] for k in cmds}
    for _ in range(rounds):
        for name, cmd in cmds.items():
            if before_each:
                before_each()
            results[name].append(measure(cmd))
    return results


def report(title, results):
    """Prints median time and max peak RSS per command; returns {name: (median s, peak bytes)}."""
    print(f"\n{title}")
    med = {}
    for name, r in results.items():
        t = statistics.median(w for w, _ in r)
        rss = max(m for _, m in r)
        med[name] = (t, rss)
        print(f"  {name:12s} {t:8.3f} s   peak RSS {rss / 1e6:8.1f} MB")
    return med
