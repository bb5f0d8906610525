"""Runs inside a one-node Slurm cluster (scripts/slurm-cluster.sh): submits Samples/zoo/slurm-array.sbatch
unchanged as job arrays over a zoo and checks what came out. Prints one line per check; exits 1 on the
first failure. Called by test_scale_out.py; usage: slurm_zoo.py QCONVERT ZOO WORKDIR"""
import json
import os
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
SBATCH = REPO / "Samples" / "zoo" / "slurm-array.sbatch"


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def submit(array, src, out, work, gates=""):
    env = dict(os.environ, QCONVERT_GATES=gates)
    r = sh("sbatch", "--parsable", f"--array={array}", "--cpus-per-task=1", "--mem=1G", f"--chdir={work}", SBATCH, src, out, env=env)
    if r.returncode != 0:
        sys.exit(f"sbatch failed: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def exit_codes(job):
    """{array task id: exit code} once every task has ended."""
    for _ in range(600):
        r = sh("scontrol", "show", "job", "-o", job)
        tasks = {}
        for line in r.stdout.splitlines():
            state = re.search(r"JobState=(\S+)", line).group(1)
            task = re.search(r"ArrayTaskId=(\S+)", line)
            code = re.search(r"ExitCode=(\d+):", line)
            if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
                break
            tasks[task.group(1) if task else "0"] = int(code.group(1))
        else:
            if tasks and not any("-" in t or "," in t for t in tasks):
                return tasks
        time.sleep(0.2)
    sys.exit(f"job {job} did not finish")


def rows(out):
    found = []
    for m in sorted(pathlib.Path(out).glob("manifest-*.jsonl")):
        found += [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
    return found


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        sys.exit(1)


def main():
    qconvert, zoo, work = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    os.environ["PATH"] = str(pathlib.Path(qconvert).parent) + os.pathsep + os.environ["PATH"]
    for array, name in [("0-3", "from0"), ("1-7:2", "from1-step2")]:
        out = work / name
        job = submit(array, zoo, out, work)
        codes = exit_codes(job)
        check(len(codes) == 4, f"{name}: 4 array tasks ran ({codes})")
        m = rows(out)
        good = [x for x in m if x["model"] != "vision/broken.safetensors"]
        broken = [x for x in m if x["model"] == "vision/broken.safetensors"]
        models = sorted(x["model"] for x in good)
        check(len(models) == len(set(models)) and len(models) >= 6, f"{name}: every good model converted exactly once ({len(models)})")
        check(all(x["status"] == "converted" for x in good), f"{name}: all converted")
        check(len(broken) == 1 and broken[0]["status"] == "failed", f"{name}: the corrupt model failed, once")
        failing = [t for t, c in codes.items() if c != 0]
        check(len(failing) == 1 and codes[failing[0]] == 6, f"{name}: only the corrupt model's task failed, with 6 ({codes})")
        merged = sh(qconvert, "batch", "merge", *sorted(out.glob("manifest-*.jsonl")), "-o", out / "manifest.csv")
        check(merged.returncode == 6 and len((out / "manifest.csv").read_text().splitlines()) == len(m) + 1, f"{name}: merged manifest (exit 6: it lists the corrupt model)")
        for x in good:
            check(sh(qconvert, "inspect", x["output"]).returncode == 0, f"{name}: {x['model']} loads")
    # A gate that fails stays failed when Slurm requeues the task.
    out = work / "gated"
    job = submit("0-1", zoo, out, work, gates="--min-sqnr 60")
    first = exit_codes(job)
    check(set(first.values()) <= {5, 6} and 5 in first.values(), f"gated: tasks fail their gates ({first})")
    before = {x["model"]: x for x in rows(out)}
    r = sh("scontrol", "requeue", job)
    check(r.returncode == 0, f"gated: requeued ({r.stderr.strip()})")
    # Slurm delays a requeued job's start (BeginTime); let it start now.
    for _ in range(50):
        if sh("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0:
            break
        time.sleep(0.2)
    time.sleep(1)
    again = exit_codes(job)
    check(again == first, f"gated: the requeued tasks fail again ({again})")
    after = {x["model"]: x for x in rows(out)}
    for k, x in after.items():
        if before[k]["status"] == "gate-failed":
            check(x["status"] == "gate-failed" and x["worst_sqnr_db"] is not None, f"gated: {k} still gate-failed, metrics kept")


if __name__ == "__main__":
    main()
