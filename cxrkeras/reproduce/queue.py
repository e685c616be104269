"""`reproduce(...)`: the grid's runs as a resumable queue in `<out>/runs/<run>/`, then `<out>/tables.md`.

Each run is its steps (training stages, then the evaluation of its best model on the whole test split). A step
that finished is never repeated: a finished stage (its run_info.json says so, for the same config) is skipped, a
stage killed mid-way resumes after its last finished epoch (`train`'s own resume), an evaluation of the current
best model is kept. A run whose steps all finished gets `<run>/reproduce.json` (status, seconds) and is skipped by
every later invocation. The whole output folder is locked while a grid runs; with several workers (one process per
GPU) each run is claimed by a lock on its folder, so no two workers ever train the same run.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from cxrkeras.errors import CxrError, DataError
from cxrkeras.fileio import read_json_or, utc_now, write_json
from cxrkeras.reproduce import grid as grid_lib

MARKER = "reproduce.json"
JOB_FILE = "job.json"
QUEUE_DIR = ".queue"
TABLES_FILE = "tables.md"


@dataclasses.dataclass
class PlannedRun:
    spec: object  # grid.RunSpec
    steps: list  # [(grid.Step, Config or None)]
    run_dir: str


def make_plan(grid, records, out, only=None, sets=(), configs_dir=None):
    """[PlannedRun] of the selected runs, every step's config resolved (so a bad --set fails before any work)."""
    configs_dir = os.path.abspath(configs_dir or grid_lib.default_configs_dir())
    if not os.path.isdir(configs_dir):
        raise CxrError(f"{configs_dir} does not exist: the paper grid reads configs/paper of the cxrkeras repository; "
                       f"pass --configs DIR")
    runs_root = os.path.join(os.path.abspath(out), "runs")
    plan = []
    for spec in grid_lib.select_runs(grid_lib.load_grid(grid), only):
        steps = [(step, grid_lib.step_config(spec, step, os.path.abspath(records), runs_root, sets)
                  if step.kind == "train" else None) for step in spec.steps(configs_dir)]
        plan.append(PlannedRun(spec, steps, os.path.join(runs_root, spec.run)))
    return plan


# --- where each run stands ---


def best_model(run_dir):
    """(path, sha256) of the run's best model (stage 2's, else stage 1's), or (None, None)."""
    from cxrkeras.hashing import sha256_file
    from cxrkeras.runs import best_model_choice

    try:
        path = best_model_choice(run_dir)[0]
    except CxrError:
        return None, None
    return path, sha256_file(path)


def evaluation_dir(run_dir, split="test"):
    from cxrkeras.runs import EVALUATION_DIR

    return os.path.join(run_dir, EVALUATION_DIR, split)


def evaluation_is_current(run_dir, split="test"):
    """True when <run>/evaluation/<split>/metrics.json scored the run's current best model."""
    doc = read_json_or(os.path.join(evaluation_dir(run_dir, split), "metrics.json"))
    if not isinstance(doc, dict) or not os.path.isfile(os.path.join(evaluation_dir(run_dir, split),
                                                                    f"predictions_{split}.csv")):
        return False
    return doc.get("model_sha256") is not None and doc.get("model_sha256") == best_model(run_dir)[1]


def step_state(planned, step, config):
    """"finished" | "resume" | "new" of one step (a ConfigError when its folder holds another config)."""
    from cxrkeras.training.rundir import stage_state

    if step.kind == "train":
        return stage_state(config, step.stage)
    return "finished" if evaluation_is_current(planned.run_dir) else "new"


def run_state(planned):
    """("done" | "partial" | "pending" | "failed" | "conflict", [step states], marker) of a planned run."""
    marker = read_json_or(os.path.join(planned.run_dir, MARKER)) or {}
    try:
        states = [step_state(planned, step, config) for step, config in planned.steps]
    except CxrError as exc:
        return "conflict", [str(exc)], marker
    if all(s == "finished" for s in states) and marker.get("status") == "finished":
        return "done", states, marker
    if marker.get("status") == "failed":
        return "failed", states, marker
    return ("pending" if all(s == "new" for s in states) else "partial"), states, marker


# --- running ---


def execute_run(planned, n_boot=1000, seed=0, log=print, min_patients=5):
    """Run the steps of one run that have not finished; write its marker; the marker dict."""
    from cxrkeras.evaluation.evaluate import evaluate
    from cxrkeras.runs import RunInfo
    from cxrkeras.training import train
    from cxrkeras.training.rundir import stage_path

    spec, record = planned.spec, []
    marker_path = os.path.join(planned.run_dir, MARKER)
    previous = read_json_or(marker_path) or {}
    eval_seconds = previous.get("evaluation_seconds")
    for step, config in planned.steps:
        state = step_state(planned, step, config)
        if state == "finished":
            log(f"[{spec.run}] {step.name}: finished before, kept")
            record.append({"step": step.name, "state": "kept"})
            continue
        log(f"[{spec.run}] {step.name}: {'resuming' if state == 'resume' else 'starting'}")
        import keras

        keras.backend.clear_session()  # one process runs many models: free the previous graphs
        if step.kind == "train":
            train(config, step.stage, init=step.init, log=lambda m: log(f"[{spec.run}] {m}"))
        else:
            t0 = time.time()
            evaluate(planned.run_dir, split="test", n_boot=n_boot, seed=seed, verify_records="size",
                     log=lambda m: log(f"[{spec.run}] {m}"), min_patients=min_patients)
            eval_seconds = round(time.time() - t0, 2)
        record.append({"step": step.name, "state": "resumed" if state == "resume" else "ran"})
    train_seconds = [(RunInfo.read(stage_path(config, step.stage)) or RunInfo()).seconds
                     for step, config in planned.steps if step.kind == "train"]
    doc = read_json_or(os.path.join(evaluation_dir(planned.run_dir), "metrics.json")) or {}
    path, sha = best_model(planned.run_dir)
    marker = {"run": spec.run, "status": "finished", "finished_at": utc_now(), "steps": record,
              "training_seconds": train_seconds, "evaluation_seconds": eval_seconds,
              "seconds": round(sum(s or 0.0 for s in train_seconds) + (eval_seconds or 0.0), 2),
              "model": path, "model_sha256": sha, "test_mean_auc": (doc.get("auc") or {}).get("mean", {}).get("auc"),
              "history": previous.get("history", []) + [{"at": utc_now(), "steps": record}]}
    write_json(marker_path, marker)
    return marker


def run_queue(plan, n_boot=1000, seed=0, log=print, worker=None, min_patients=5):
    """Work through the plan: skip done runs, claim each other run by locking its folder (a run another worker
    holds is left to it), run it. A run that fails is recorded (status "failed", its message) and the queue goes
    on. Returns {"done": [...], "ran": [...], "failed": {run: message}, "busy": [...]}."""
    from cxrkeras.data.shards import folder_lock

    who = f"worker {worker}: " if worker is not None else ""
    out = {"done": [], "ran": [], "failed": {}, "busy": []}
    for i, planned in enumerate(plan, 1):
        run = planned.spec.run
        state, _, _ = run_state(planned)
        if state == "done":
            log(f"{who}run {i}/{len(plan)} {run}: done before, skipped")
            out["done"].append(run)
            continue
        os.makedirs(planned.run_dir, exist_ok=True)
        try:
            with folder_lock(planned.run_dir, holder="reproduce worker", hint="another worker runs it"):
                if run_state(planned)[0] == "done":  # finished by another worker meanwhile
                    out["done"].append(run)
                    continue
                log(f"{who}run {i}/{len(plan)} {run} ({state})")
                try:
                    marker = execute_run(planned, n_boot, seed, log, min_patients)
                except CxrError as exc:
                    write_json(os.path.join(planned.run_dir, MARKER),
                               {"run": run, "status": "failed", "at": utc_now(), "message": str(exc)})
                    log(f"{who}run {run} FAILED: {exc}")
                    out["failed"][run] = str(exc)
                    continue
                log(f"{who}run {run}: finished in {marker['seconds']:.1f} s (test mean AUC "
                    f"{_num(marker['test_mean_auc'])})")
                out["ran"].append(run)
        except DataError as exc:
            if "another reproduce worker" not in str(exc):
                raise
            out["busy"].append(run)
    return out


def _num(x):
    return "n/a" if x is None else f"{x:.4f}"


def verify_records(records, mode):
    """Every shard of train, val and test against the manifest (once per grid; the runs then check sizes only)."""
    from cxrkeras.data.manifest import load_manifest, split_info, verify_shards

    manifest = load_manifest(records)
    for split in ("train", "val", "test"):
        split_info(manifest, split, records)
        verify_shards(manifest, records, split, mode)
    return manifest


# --- the command ---


def reproduce(grid="paper", records=None, out=None, only=None, sets=(), dry_run=False, workers=1, n_boot=1000,
              seed=0, min_patients=5, configs_dir=None, measure_steps=3, verify="sha256", log=print):
    """`cxrkeras reproduce`: plan the grid; with dry_run print the plan and the estimate; else run the queue
    (`workers` processes, one per GPU when there are GPUs) and write <out>/tables.md. Returns a summary dict."""
    from cxrkeras.data.shards import folder_lock
    from cxrkeras.reproduce import estimate, tables

    if not records or not out:
        raise CxrError("give --records DIR (made by build-records) and --out DIR")
    plan = make_plan(grid, records, out, only, sets, configs_dir)
    if dry_run:
        text, summary = estimate.plan_text(plan, records, measure_steps=measure_steps, log=log)
        log(text)
        return summary
    os.makedirs(out, exist_ok=True)
    with folder_lock(out, holder="cxrkeras reproduce", hint="wait for it to finish, or choose another --out"):
        log(f"checking the records {records} ({verify})")
        verify_records(records, verify)
        log(f"grid {grid}: {len(plan)} run(s) -> {os.path.abspath(out)}")
        if workers > 1:
            result = run_workers(plan, grid, records, out, only, sets, configs_dir, workers, n_boot, seed,
                                 min_patients, log)
        else:
            result = run_queue(plan, n_boot, seed, log, min_patients=min_patients)
        path = tables.write_tables(out, grid, n_boot=n_boot, seed=seed, min_patients=min_patients)
    states = {p.spec.run: run_state(p)[0] for p in plan}
    log(f"{sum(s == 'done' for s in states.values())} of {len(plan)} run(s) done; tables: {path}")
    failed = {**result.get("failed", {}), **{r: m for r, m in result.get("workers_failed", {}).items()}}
    if failed:
        raise CxrError(f"{len(failed)} run(s) or worker(s) failed ({'; '.join(f'{k}: {v}' for k, v in failed.items())}"
                       f"); the finished runs are kept: re-run the same command to retry the others")
    return {"states": states, "tables": path, **result}


def run_workers(plan, grid, records, out, only, sets, configs_dir, workers, n_boot, seed, min_patients, log):
    """Start `workers` processes on the queue (CUDA_VISIBLE_DEVICES=i each when there are GPUs) and wait for all;
    a worker that dies is reported, never waited on forever (each is a separate process)."""
    from cxrkeras.data.workers import describe_exit
    from cxrkeras.training.strategy import visible_gpu_count

    gpus = visible_gpu_count()
    if gpus and workers > gpus:
        raise CxrError(f"--workers {workers}: only {gpus} GPU(s) visible; one run per GPU needs at most {gpus}")
    queue_dir = os.path.join(out, QUEUE_DIR)
    os.makedirs(queue_dir, exist_ok=True)
    job = os.path.join(queue_dir, JOB_FILE)
    write_json(job, {"grid": grid, "records": os.path.abspath(records), "out": os.path.abspath(out), "only": only,
                     "sets": list(sets), "configs_dir": configs_dir, "n_boot": n_boot, "seed": seed,
                     "min_patients": min_patients})
    procs = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        logf = open(os.path.join(queue_dir, f"worker-{i}.log"), "a", encoding="utf-8")
        procs.append((i, logf, subprocess.Popen(
            [sys.executable, "-m", "cxrkeras.reproduce.queue", "--job", job, "--worker", str(i),
             "--parent", str(os.getpid())], env=env, stdout=logf, stderr=subprocess.STDOUT)))
        log(f"worker {i} started (pid {procs[-1][2].pid}{f', GPU {i}' if gpus else ''}), log "
            f"{os.path.join(queue_dir, f'worker-{i}.log')}")
    failed = {}
    for i, logf, proc in procs:
        code = proc.wait()
        logf.close()
        if code != 0:
            failed[f"worker {i}"] = f"{describe_exit(code)} (see {os.path.join(queue_dir, f'worker-{i}.log')})"
    for i, _, _ in procs:
        summary = read_json_or(os.path.join(queue_dir, f"worker-{i}.json")) or {}
        failed.update(summary.get("failed", {}))
    return {"workers": workers, "workers_failed": failed}


def worker_main(argv=None):
    """python -m cxrkeras.reproduce.queue --job FILE --worker I --parent PID: one worker of `run_workers`."""
    import argparse
    import threading

    from cxrkeras.data.workers import exit_with_parent

    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--parent", type=int)
    args = parser.parse_args(argv)
    if args.parent:
        threading.Thread(target=exit_with_parent, args=(args.parent,), daemon=True).start()
    with open(args.job, encoding="utf-8") as f:
        job = json.load(f)
    plan = make_plan(job["grid"], job["records"], job["out"], job["only"], job["sets"], job["configs_dir"])
    result = run_queue(plan, job["n_boot"], job["seed"], log=lambda m: print(m, flush=True), worker=args.worker,
                       min_patients=job["min_patients"])
    write_json(os.path.join(job["out"], QUEUE_DIR, f"worker-{args.worker}.json"), result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(worker_main())
    except CxrError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
