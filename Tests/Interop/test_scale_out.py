"""Scale-out samples under the engines they are written for: Slurm (a real one-node cluster), the
Kubernetes Indexed Job's command line (as N local processes), retries that must keep failures failed."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from conftest import QCONVERT, run
from test_batch import batch, rows, zoo  # noqa: F401  (zoo is a fixture)

REPO = pathlib.Path(__file__).resolve().parents[2]
ZOO_SAMPLES = REPO / "Samples" / "zoo"


def test_gate_failure_stays_a_failure_on_every_retry(zoo, tmp_path):
    out = tmp_path / "out"
    first = batch(zoo, "-o", out, "--preset", "w4g128", "--min-sqnr", "30", "--manifest", tmp_path / "m1.jsonl", "-q")
    assert first.returncode == 6, first.stderr      # the corrupt model; gate failures too
    failed = {x["model"]: x for x in rows(tmp_path / "m1.jsonl") if x["status"] == "gate-failed"}
    assert failed, rows(tmp_path / "m1.jsonl")
    for k, x in failed.items():
        assert not os.path.exists(x["output"]), k     # a rejected result is never written
        assert x["worst_sqnr_db"] is not None and x["worst_sqnr_db"] < 30
    for attempt in range(2):                        # a CI retry, a requeue: same answer
        again = batch(zoo, "-o", out, "--preset", "w4g128", "--min-sqnr", "30", "--manifest", tmp_path / f"r{attempt}.jsonl", "-q")
        assert again.returncode == first.returncode
        now = {x["model"]: x for x in rows(tmp_path / f"r{attempt}.jsonl")}
        for k, x in failed.items():
            assert now[k]["status"] == "gate-failed", now[k]
            assert now[k]["worst_sqnr_db"] == pytest.approx(x["worst_sqnr_db"], abs=1e-9)
    # An output written by an earlier version despite its failed gate is not skipped as a success either:
    # the gate is checked again from the figures its metadata records.
    k = sorted(failed)[0]
    run(zoo / k, "-o", failed[k]["output"], "--preset", "w4g128", "-q")
    again = batch(zoo, "-o", out, "--preset", "w4g128", "--min-sqnr", "30", "--manifest", tmp_path / "old.jsonl", "-q")
    row = next(x for x in rows(tmp_path / "old.jsonl") if x["model"] == k)
    assert row["status"] == "gate-failed" and "earlier run" in row["error"], row
    # Without the gate nothing is gate-failed (a model the format cannot hold at all still fails).
    ok = batch(zoo, "-o", out, "--preset", "w4g128", "--manifest", tmp_path / "ok.jsonl", "-q")
    assert "gate-failed" not in {x["status"] for x in rows(tmp_path / "ok.jsonl")}
    assert ok.returncode == 6


def test_skipped_rows_keep_the_quality_figures(zoo, tmp_path):
    out = tmp_path / "out"
    batch(zoo, "-o", out, "--manifest", tmp_path / "a.jsonl", "-q")
    batch(zoo, "-o", out, "--manifest", tmp_path / "b.jsonl", "-q")
    a = {x["model"]: x for x in rows(tmp_path / "a.jsonl") if x["status"] == "converted"}
    b = {x["model"]: x for x in rows(tmp_path / "b.jsonl")}
    assert a
    for k, x in a.items():
        assert b[k]["status"] == "skipped"
        assert b[k]["worst_sqnr_db"] == pytest.approx(x["worst_sqnr_db"], abs=1e-9), k
        assert b[k]["bytes_after"] == x["bytes_after"], k


def test_diff_of_mismatched_checkpoints_is_bad_input(tmp_path):
    save_file({"w": np.ones((4, 8), np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.ones((4, 9), np.float32)}, str(tmp_path / "b.safetensors"))
    r = subprocess.run([QCONVERT, "diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "36 elements" in r.stderr


def sbatch_env(task_id, lo, count, step, **extra):
    env = dict(os.environ, PATH=str(pathlib.Path(QCONVERT).parent) + os.pathsep + os.environ["PATH"],
               SLURM_ARRAY_TASK_ID=str(task_id), SLURM_ARRAY_TASK_MIN=str(lo), SLURM_ARRAY_TASK_COUNT=str(count),
               SLURM_ARRAY_TASK_STEP=str(step), SLURM_CPUS_PER_TASK="1")
    env.update(extra)
    return env


@pytest.mark.parametrize("ids,step", [([0, 1, 2, 3], 1), ([1, 2, 3, 4], 1), ([10, 20, 30], 10), ([5], 1)])
def test_sbatch_shares_cover_the_zoo_for_any_array(zoo, tmp_path, ids, step):
    out = tmp_path / "out"
    for i in ids:
        r = subprocess.run(["bash", str(ZOO_SAMPLES / "slurm-array.sbatch"), str(zoo), str(out)], capture_output=True, text=True,
                           env=sbatch_env(i, ids[0], len(ids), step))
        assert r.returncode in (0, 6), r.stderr
    got = []
    for m in out.glob("manifest-*.jsonl"):
        got += [x["model"] for x in rows(m)]
    full = batch(zoo, "-o", tmp_path / "full", "--manifest", tmp_path / "full.jsonl", "-q")
    assert sorted(got) == sorted(x["model"] for x in rows(tmp_path / "full.jsonl")), (got, full.stderr)
    assert len(list(out.glob("manifest-*.jsonl"))) == len(ids)


def test_sbatch_refuses_an_uneven_array(zoo, tmp_path):
    r = subprocess.run(["bash", str(ZOO_SAMPLES / "slurm-array.sbatch"), str(zoo), str(tmp_path / "o")], capture_output=True,
                       text=True, env=sbatch_env(3, 0, 3, 1))      # --array=0,3,5
    assert r.returncode == 64 and "evenly spaced" in r.stderr


def test_kubernetes_indexed_job_as_local_processes(zoo, tmp_path):
    docs = list(yaml.safe_load_all(open(ZOO_SAMPLES / "k8s-indexed-job.yaml")))
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    out_claim = next(v for v in pod["volumes"] if v["name"] == "out")["persistentVolumeClaim"]["claimName"]
    assert pvc["metadata"]["name"] == out_claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and sorted(rule["onExitCodes"]["values"]) == [5, 6]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    n = spec["completions"]
    line = container["args"][0].replace("/zoo", str(zoo)).replace("/out", str(tmp_path / "out"))
    assert f"/{n}" in line
    env = dict(os.environ, PATH=str(pathlib.Path(QCONVERT).parent) + os.pathsep + os.environ["PATH"])
    procs = [subprocess.Popen(container["command"] + [line], env=dict(env, JOB_COMPLETION_INDEX=str(i)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    codes = [p.wait() for p in procs]
    assert all(c in (0, 6) for c in codes) and codes.count(6) == 1, codes   # the corrupt model's pod
    got = []
    for m in (tmp_path / "out").glob("manifest-*.jsonl"):
        got += [x["model"] for x in rows(m)]
    assert len(got) == len(set(got)) and len(got) >= 7


@pytest.mark.skipif(os.geteuid() != 0, reason="a Slurm cluster needs root")
def test_slurm_job_arrays_on_a_real_cluster(zoo, tmp_path):
    work = tmp_path / "slurm"
    work.mkdir()
    r = subprocess.run([str(REPO / "scripts" / "slurm-cluster.sh"), "run", str(tmp_path / "cluster"), "--",
                        sys.executable, str(REPO / "Tests" / "Interop" / "slurm_zoo.py"), QCONVERT, str(zoo), str(work)],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "FAIL" not in r.stdout and r.stdout.count("ok ") >= 10
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "cluster")], capture_output=True).stdout   # daemons stopped


def test_github_actions_report_job_builds_merges_and_uploads():
    wf = yaml.safe_load(open(ZOO_SAMPLES / "github-actions-matrix.yml"))
    convert, report = wf["jobs"]["convert"], wf["jobs"]["report"]
    n = len(convert["strategy"]["matrix"]["shard"])
    line = next(s["run"] for s in convert["steps"] if "batch zoo" in str(s.get("run", "")))
    assert f"/{n}" in line and "--manifest" in line
    steps = report["steps"]
    names = [str(s.get("run", "")) + str(s.get("uses", "")) for s in steps]
    build = next(i for i, s in enumerate(names) if "swift build" in s)
    merge = next(i for i, s in enumerate(names) if "batch merge" in s)
    upload = [i for i, s in enumerate(names) if "upload-artifact" in s]
    assert build < merge and upload and upload[-1] > merge
    assert "manifest.csv" in str(steps[upload[-1]]["with"]["path"])
    assert report["needs"] == "convert" and report["if"] == "always()"
