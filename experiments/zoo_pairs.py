"""The zoo's model pairs: an EDLNet and its registered conv twin, one recipe, one seed, both shipped.

``make zoo`` runs this after ``experiments/zoo.py``.  A pair is trained and evaluated by the
project's own commands, each step writing into the pair's committed folder
``experiments/cache/zoo/cpu/<pair>/`` so that the work accumulates over several runs:

* ``<arm>_train/``: ``timm-edl train --config <recipe> [--model <twin>]``; a later run continues
  it with ``--resume`` (the run folder keeps one small resumable state and ``best/``, the
  epoch picked on the hold-out);
* ``<arm>_eval/<name>/``: one ``timm-edl eval`` / ``timm-edl certify`` of ``best/`` per
  evaluation; a step is done when its JSON is there.  AutoAttack and certification keep
  their per-chunk state in that folder (``.autoattack-state/``, ``.certify-state/``), so a
  stopped run loses at most one chunk.

Arms run side by side (``--jobs``) and share the cores (``--cores``): each command gets an
equal part, and when one arm has nothing more to do, the other's training stops at its next
optimizer step (Ctrl-C's stop, state saved) and resumes on all of them.

``--budget-min`` stops the run after that many minutes: training stops at a step boundary
(its ``time_budget_min``), an evaluation at the end of a chunk; rerun the same command to go on.
When every step of both arms is done, ``experiments/zoo_ship.py`` exports each model by ``timm-edl export`` with its
evaluation JSONs and its twin's on the same points (``hub_cards/<name>.md``), shipped in
``timm_edl/_zoo/`` (sha256 in the manifest; the package copy is then the only one), and the
pair's section of ``docs/zoo.md`` and the README's zoo table are written.

::

    python experiments/zoo_pairs.py                        # every pair, resuming
    python experiments/zoo_pairs.py --pair cifar10-jpeg-resnet20 --budget-min 170
    python experiments/zoo_pairs.py --status               # what is done, what is left
    python experiments/zoo_ship.py                         # export + ship the finished pairs
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _jobs import REPO
from timm_edl.cli.errors import EXIT_INTERRUPTED

ARMS = ('edl', 'conv')
EVAL_COMMON = ('--seed', '0', '--device', 'cpu', '--no-progress')


@dataclasses.dataclass(frozen=True)
class Step:
    """One evaluation of a trained model: ``timm-edl <command> <args> --model ... --out ...``."""
    name: str
    command: str                  # 'eval' or 'certify'
    args: tuple[str, ...]
    edl_args: tuple[str, ...] = ()  # added for the EDLNet only (e.g. the transfer check from its twin)
    min_minutes: float = 0.0      # not started with less time left (a step that cannot resume part-way)


@dataclasses.dataclass(frozen=True)
class Pair:
    key: str
    dataset: str
    label: str
    tag: str
    archs: dict[str, str]         # arm -> registered architecture
    recipe: str
    steps: tuple[Step, ...]
    about: str                    # one line for the zoo table: what the training was

    def name(self, arm: str) -> str:
        return f"{self.archs[arm]}.{self.tag}"


_LINF = ('--dataset', 'cifar10-jpeg', '--threat-model', 'Linf', '--eps', '8/255')
PAIRS = {p.key: p for p in (
    Pair('cifar10-jpeg-resnet20', 'cifar10-jpeg', 'CIFAR-10-JPEG', 'cifar10_jpeg_fast_linf',
         {'edl': 'edlnet_resnet20', 'conv': 'edlnet_resnet20_conv'},
         'recipes/edlnet_resnet20_cifar10_jpeg_fast.yaml',
         (Step('full', 'eval', _LINF + ('--attacks', 'pgd', '--pgd-steps', '20', '--no-checks',
                                        '--batch-size', '500'), min_minutes=45),
          Step('aa', 'eval', _LINF + ('--attacks', 'noise,pgd,autoattack', '--pgd-steps', '20', '--n-ex', '1000',
                                      '--batch-size', '100', '--check-n', '200', '--grad-points', '4',
                                      '--grad-dirs', '16', '--eps-sweep', '0,4/255,8/255,16/255',
                                      '--version', 'standard'),
               edl_args=('--surrogate', 'twin')),
          Step('corruptions', 'eval', ('--dataset', 'cifar10-jpeg', '--threat-model', 'corruptions', '--n-ex', '1000',
                                       '--batch-size', '500'))),
         'FGSM-RS fast AT, Linf 8/255, 15 epochs, best hold-out epoch'),
    Pair('cifar10-jpeg-smoothing', 'cifar10-jpeg', 'CIFAR-10-JPEG', 'cifar10_jpeg_smooth_sigma25',
         {'edl': 'edlnet_resnet8_in', 'conv': 'edlnet_resnet8_in_conv'},
         'recipes/edlnet_resnet8_in_cifar10_jpeg_smooth.yaml',
         (Step('full', 'eval', ('--dataset', 'cifar10-jpeg', '--attacks', 'clean', '--no-checks',
                                '--batch-size', '500')),
          Step('certify', 'certify', ('--dataset', 'cifar10-jpeg', '--sigma', '0.25', '--n0', '100', '--n', '10000',
                                      '--alpha', '0.001', '--n-ex', '500', '--chunk-size', '25',
                                      '--batch-size', '1000')),
          Step('corruptions', 'eval', ('--dataset', 'cifar10-jpeg', '--threat-model', 'corruptions', '--n-ex', '1000',
                                       '--batch-size', '500'))),
         'Gaussian-noise training (sigma 0.25) for randomized smoothing'),
)}


def cache_dir(pair: Pair, root: Path | None = None) -> Path:
    return (root or REPO / 'experiments' / 'cache' / 'zoo' / 'cpu') / pair.key


def train_dir(pair: Pair, arm: str, root: Path | None = None) -> Path:
    return cache_dir(pair, root) / f'{arm}_train'


def eval_dir(pair: Pair, arm: str, step: Step, root: Path | None = None) -> Path:
    return cache_dir(pair, root) / f'{arm}_eval' / step.name


# ----------------------------------------------------------------------------- state of the work

def training_done(folder: Path) -> bool:
    """All epochs of the run's config are in its summary and ``best/`` was exported."""
    import yaml
    cfg, summary = folder / 'config.yaml', folder / 'summary.csv'
    if not (cfg.is_file() and summary.is_file() and (folder / 'best' / 'config.json').is_file()):
        return False
    epochs = int(yaml.safe_load(cfg.read_text())['epochs'])
    rows = [line for line in summary.read_text().splitlines()[1:] if line.strip()]
    return bool(rows) and int(rows[-1].split(',')[0]) + 1 >= epochs and (folder / 'final').is_dir()


def step_json(folder: Path) -> Path | None:
    """The evaluation JSON of a finished step (its folder holds exactly one), None if not run."""
    found = sorted(p for p in folder.glob('*.json') if not p.name.startswith('.'))
    return found[0] if found else None


def status(pair: Pair, root: Path | None = None) -> dict[str, Any]:
    out = {}
    for arm in ARMS:
        t = train_dir(pair, arm, root)
        out[arm] = {'train': training_done(t), **{s.name: step_json(eval_dir(pair, arm, s, root)) is not None
                                                  for s in pair.steps}}
    return out


# ----------------------------------------------------------------------------- running the commands

def _interruptible() -> None:
    """In the child: SIGINT back to its default, so that Python turns it into KeyboardInterrupt
    (a process started in the background by a shell inherits SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Lanes:
    """The CPU cores shared by the arms worked on side by side: a command started now gets
    ``cores // (arms working now)`` threads, so an arm left alone gets them all."""

    def __init__(self, cores: int, jobs: int, arms: int):
        self.cores, self.jobs, self.left = max(1, cores), max(1, jobs), arms
        self._lock = threading.Lock()

    def threads(self) -> int:
        with self._lock:
            return max(1, self.cores // max(1, min(self.jobs, self.left)))

    def finish(self) -> None:
        """One arm has nothing more to run (done, or stopped until the next run)."""
        with self._lock:
            self.left -= 1


POLL_S = 5.0  # how often a running command is checked for the deadline and for freed cores


def thread_counts(log: Path) -> list[int]:
    """The thread count of each command :func:`_run` appended to ``log``, in order (a command
    logged without one ran on one thread, the only setting before the cores were shared)."""
    text = log.read_text() if log.is_file() else ''
    return [int(n or 1) for n in re.findall(r'^\$ timm-edl .*? UTC(?:, (\d+) thread\(s\))?$', text, re.M)]


def _run(argv: list[str], log: Path, deadline: float | None, threads: int = 1, restart=None) -> int:
    """Run ``timm-edl`` with ``argv`` on ``threads`` threads, output appended to ``log``, and
    return its exit status.  It gets SIGINT (Ctrl-C's: it stops at a chunk boundary or an
    optimizer step, its state saved, exit 130) at ``deadline`` or as soon as ``restart()`` is true."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1')
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, 'a') as f:
        f.write(f"\n$ timm-edl {shlex.join(argv)}  # {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, "
                f"{threads} thread(s)\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, '-m', 'timm_edl.cli', *argv], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, preexec_fn=_interruptible)
        try:
            while True:
                try:
                    return proc.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    if (deadline is not None and time.time() >= deadline) or (restart is not None and restart()):
                        proc.send_signal(signal.SIGINT)
                        return proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise


def _arg(path: Path) -> str:
    """A path as a command line gives it: relative to the checkout when inside it (commands run there)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def train_argv(pair: Pair, arm: str, root: Path | None, minutes_left: float | None) -> list[str]:
    out = _arg(train_dir(pair, arm, root))
    budget = ['--time-budget-min', f'{max(minutes_left, 1.0):.1f}'] if minutes_left is not None else []
    if (train_dir(pair, arm, root) / 'config.yaml').is_file():
        return ['train', '--resume', '--output', out, '--progress', 'never', *budget]
    model = ['--model', pair.archs[arm]] if arm != 'edl' else []
    return ['train', '--config', pair.recipe, *model, '--output', out, '--progress', 'never', *budget]


def step_argv(pair: Pair, arm: str, step: Step, model_dir: Path, root: Path | None) -> list[str]:
    extra = step.edl_args if arm == 'edl' else ()
    return [step.command, '--model', f'local-dir:{_arg(model_dir)}', *step.args, *extra, *EVAL_COMMON,
            '--out', _arg(eval_dir(pair, arm, step, root))]


def model_folder(pair: Pair, arm: str, root: Path | None, zoo_dir: Path, work: Path) -> Path:
    """``best/`` of the arm's run, or, once shipped (its weights then live in the package only),
    a folder with best/config.json and the package's weights, checked by sha256."""
    from zoo import final_folder
    return final_folder(train_dir(pair, arm, root) / 'best', zoo_dir / f'{pair.name(arm)}.safetensors', work)


def work_arm(pair: Pair, arm: str, args: argparse.Namespace, deadline: float | None, log,
             lanes: Lanes | None = None) -> bool:
    """Train, then run every evaluation step of one arm; True when all are done.  A training
    run is stopped and resumed on more threads when another arm frees its cores (a run resumed
    on other threads is not bitwise the one it would have been: float sums are ordered differently)."""
    root, logs = args.cache_root, cache_dir(pair, args.cache_root) / 'logs'
    lanes = lanes or Lanes(1, 1, 1)
    while not training_done(train_dir(pair, arm, root)):
        minutes = None if deadline is None else (deadline - time.time()) / 60
        if minutes is not None and minutes < 2:
            return False
        threads = lanes.threads()
        log(f"{pair.key}/{arm}: training on {threads} thread(s)")
        rc = _run(train_argv(pair, arm, root, minutes), logs / f'{arm}_train.log', None, threads,
                  restart=lambda: lanes.threads() > threads)
        if rc == EXIT_INTERRUPTED and lanes.threads() > threads:
            continue  # its state is saved: go on with the freed cores
        if rc != 0 or not training_done(train_dir(pair, arm, root)):
            log(f"{pair.key}/{arm}: training not finished (exit {rc}); rerun to continue")
            return False
    for step in pair.steps:
        if step_json(eval_dir(pair, arm, step, root)) is not None:
            continue
        if deadline is not None and deadline - time.time() < 60 * max(1.0, step.min_minutes):
            log(f"{pair.key}/{arm}: {step.name} left for the next run (it needs {max(1.0, step.min_minutes):g} min)")
            return False
        model = model_folder(pair, arm, root, args.zoo_dir, args.run_dir / pair.key / arm / 'model')
        threads = lanes.threads()
        log(f"{pair.key}/{arm}: {step.name} on {threads} thread(s)")
        rc = _run(step_argv(pair, arm, step, model, root), logs / f'{arm}_{step.name}.log', deadline, threads)
        if rc != 0:
            log(f"{pair.key}/{arm}: {step.name} stopped (exit {rc}); its state is kept, rerun to continue")
            return False
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pair', choices=sorted(PAIRS), action='append', help='pairs to work on (default: all)')
    p.add_argument('--budget-min', type=float, default=None, help='stop after this many minutes; rerun to go on')
    p.add_argument('--jobs', type=int, default=2, help='arms worked on side by side')
    p.add_argument('--cores', type=int, default=len(os.sched_getaffinity(0)),
                   help='threads shared by the arms at work (default: the cores this process may use)')
    p.add_argument('--status', action='store_true', help='print what is done and exit')
    p.add_argument('--cache-root', type=Path, default=None, help='default: experiments/cache/zoo/cpu')
    p.add_argument('--run-dir', type=Path, default=REPO / 'runs' / 'zoo' / 'pairs')
    p.add_argument('--zoo-dir', type=Path, default=REPO / 'timm_edl' / '_zoo')
    p.add_argument('--card-dir', type=Path, default=REPO / 'hub_cards')
    p.add_argument('--out-md', type=Path, default=REPO / 'docs' / 'zoo.md')
    p.add_argument('--readme', type=Path, default=REPO / 'README.md')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pairs = [PAIRS[k] for k in (args.pair or sorted(PAIRS))]

    def log(msg: str) -> None:  # one write per line: the arms log from two threads
        sys.stdout.write(f"[zoo pairs {dt.datetime.now():%H:%M:%S}] {msg}\n")
        sys.stdout.flush()

    if args.status:
        for pair in pairs:
            print(pair.key, json.dumps(status(pair, args.cache_root)))
        return 0
    deadline = None if args.budget_min is None else time.time() + 60 * args.budget_min
    todo = {(pair.key, arm) for pair in pairs for arm, steps in status(pair, args.cache_root).items()
            if not all(steps.values())}
    work = [(pair, arm) for pair in pairs for arm in ARMS if (pair.key, arm) in todo]
    lanes = Lanes(args.cores, args.jobs, len(work))

    def work_on(pair: Pair, arm: str) -> bool:
        try:
            return work_arm(pair, arm, args, deadline, log, lanes)
        finally:
            lanes.finish()

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda pa: work_on(*pa), work))
    done += [True] * (len(pairs) * len(ARMS) - len(work))
    log(f"arms done: {sum(done)} of {len(done)}; ship them with experiments/zoo_ship.py")
    return 0


if __name__ == '__main__':
    sys.exit(main())
