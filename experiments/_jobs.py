"""Job machinery shared by the experiment scripts (``paper_claims.py``, ``elastic_decision.py``,
``zoo.py``): worker processes that run ``timm-edl train`` / ``timm-edl eval`` through the
package's own entry points, a JSON cache per finished job, a scheduler, and the machine and
commit each result records.

A cached job is its spec plus its result; :func:`read_cached` refuses a cache whose spec differs
from the one asked for (:class:`CacheMismatch`), so a result is never silently reused for other
settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


class CacheMismatch(RuntimeError):
    """A cached job was made with other settings than the ones asked for."""


# ----------------------------------------------------------------------------- cache


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: a half-written cache file never exists."""
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def read_cached(path: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The cached result of a job, None when absent; CacheMismatch when made differently."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get('spec') != json.loads(json.dumps(spec)):
        raise CacheMismatch(
            f"{path} was made with other settings than this run asks for (different scale, seeds or code "
            f"version of the script). Use another cache folder (--out-dir / --cache-dir), or delete "
            f"{path.parent} to redo that job.")
    return data


# ----------------------------------------------------------------------------- workers


def single_thread() -> None:
    os.environ['OMP_NUM_THREADS'] = '1'
    os.environ['MKL_NUM_THREADS'] = '1'
    import torch
    torch.set_num_threads(1)


def init_worker() -> None:
    """Worker start: one thread, and every timm_edl module imported now, so that a worker runs
    one consistent version of the code even if the checkout changes while it lives (the
    evaluation modules are otherwise imported lazily, at the first evaluation)."""
    single_thread()
    import timm_edl.cli.eval
    import timm_edl.evaluation.core
    import timm_edl.train.trainer  # noqa: F401


def run_train_job(job_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Train one model with ``timm_edl.train`` (in a worker process) and cache the result."""
    single_thread()
    import csv

    from timm_edl.train import load_config, train
    job = Path(job_dir)
    job.mkdir(parents=True, exist_ok=True)
    out = job / 'train'
    cfg = load_config(REPO / spec['recipe'], spec['overrides'] + ['--output', str(out)])
    started = time.time()
    cpu0 = time.process_time()
    # overwrite=True only restarts an unfinished run of ours (train() deletes only a folder holding a
    # timm-edl config.yaml); a finished one is never here because its train.json exists.
    result = train(cfg, overwrite=True)
    wall = time.time() - started
    with open(out / 'summary.csv', newline='') as f:
        rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    data = {'spec': spec, 'wall_seconds': wall, 'cpu_seconds': time.process_time() - cpu0,
            'best_epoch': result.best_epoch, 'best_metric': result.best_metric, 'epochs': rows,
            'config': dataclasses.asdict(cfg), 'output': str(out),
            'finished': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}
    write_json(job / 'train.json', data)
    return data


def run_eval_job(job_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one trained model with ``timm-edl eval`` (in a worker process) and cache the report."""
    single_thread()
    import contextlib
    import io

    from timm_edl.cli.eval import main as eval_main
    job = Path(job_dir)
    folder = job / f"eval_{spec['name']}"
    argv = ['--model', f"local-dir:{job / 'train' / spec['weights']}", '--out', str(folder)] + spec['argv']
    started = time.time()
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = eval_main(argv)
    folder.mkdir(parents=True, exist_ok=True)  # the eval creates it, unless it stopped before (usage error)
    (folder / 'stderr.txt').write_text(stderr.getvalue())
    if rc not in (0, 1):
        raise RuntimeError(f"timm-edl eval {' '.join(map(shlex.quote, argv))} exited with {rc}:\n"
                           f"{stderr.getvalue()[-3000:]}")
    reports = [p for p in folder.glob('*.json')]
    if len(reports) != 1:
        raise RuntimeError(f"expected one JSON report in {folder}, found {[p.name for p in reports]}")
    report = json.loads(reports[0].read_text())
    data = {'spec': spec, 'wall_seconds': time.time() - started, 'report': report,
            'command': 'timm-edl eval ' + ' '.join(map(shlex.quote, argv))}
    write_json(job / f"eval_{spec['name']}.json", data)
    return data


def _num(v: str) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# ----------------------------------------------------------------------------- scheduling


@dataclasses.dataclass
class Job:
    """One training or evaluation: run by :func:`run_jobs` as ``run_<kind>_job(job_dir, spec)``,
    cached in ``cache``."""
    key: str
    kind: str                     # 'train' | 'eval'
    job_dir: Path
    spec: dict[str, Any]
    cache: Path
    cost: float                   # rough relative cost, longest first
    after: str | None = None   # key of the job it needs


def run_jobs(jobs: list[Job], n_workers: int, log) -> tuple[int, int]:
    """Run the jobs whose cache is missing, ``n_workers`` at a time (1: in this process).

    Ready jobs start longest first. Returns (jobs run, jobs failed). A failed job is logged
    with its traceback; the jobs that need it are skipped, the others go on.
    """
    done = {j.key for j in jobs if read_cached(j.cache, j.spec) is not None}
    todo = [j for j in jobs if j.key not in done]
    log(f"{len(jobs)} jobs, {len(done)} cached, {len(todo)} to run with {n_workers} worker(s)")
    failed: set = set()
    n_run = 0
    fn = {'train': run_train_job, 'eval': run_eval_job}

    def ready() -> list[Job]:
        return sorted((j for j in todo if j.after is None or j.after in done), key=lambda j: -j.cost)

    def skip_blocked() -> None:
        for j in list(todo):
            if j.after in failed:
                todo.remove(j)
                failed.add(j.key)
                log(f"skipped {j.key}: {j.after} failed")

    started = time.time()
    if n_workers <= 1:
        while todo:
            skip_blocked()
            batch = ready()
            if not batch:
                break
            j = batch[0]
            todo.remove(j)
            t0 = time.time()
            try:
                fn[j.kind](str(j.job_dir), j.spec)
                done.add(j.key)
                n_run += 1
                log(f"done {j.key} ({time.time() - t0:.0f} s)")
            except Exception:  # noqa: BLE001  (logged, dependants skipped)
                failed.add(j.key)
                log(f"FAILED {j.key}:\n{traceback.format_exc()}")
        return n_run, len(failed)

    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context('spawn'),
                             initializer=init_worker) as pool:
        running: dict[Any, tuple[Job, float]] = {}
        while todo or running:
            skip_blocked()
            for j in ready():
                if len(running) >= n_workers:
                    break
                todo.remove(j)
                running[pool.submit(fn[j.kind], str(j.job_dir), j.spec)] = (j, time.time())
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                j, t0 = running.pop(fut)
                try:
                    fut.result()
                    done.add(j.key)
                    n_run += 1
                    log(f"done {j.key} ({time.time() - t0:.0f} s; {len(todo)} waiting, "
                        f"{(time.time() - started) / 60:.1f} min so far)")
                except Exception:  # noqa: BLE001
                    failed.add(j.key)
                    log(f"FAILED {j.key}:\n{traceback.format_exc()}")
    return n_run, len(failed)


# ----------------------------------------------------------------------------- records


def git_commit() -> str:
    """Short HEAD commit, with a note when tracked files have uncommitted changes."""
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                               capture_output=True, text=True, check=False).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'
    return commit + (' (with uncommitted changes)' if dirty else '')


def machine_info() -> dict[str, str]:
    """CPU model, core count, torch and python versions, and the commit (what a cached result records)."""
    cpu = 'unknown CPU'
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    commit = git_commit()
    return {'cpu': cpu, 'cores': str(os.cpu_count()), 'torch': torch.__version__, 'python': platform.python_version(),
            'commit': commit}


def parse_experiment_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[list[str], Any]:
    """(argv, parsed options) of an experiment script; its workers run one thread each, offline."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    return argv, args
