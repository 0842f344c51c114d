"""Running attacks batch by batch: per-point results, progress bars, AutoAttack with resume.

Every runner returns a boolean tensor ``correct`` of shape (N,) on the CPU: whether the
model classifies point ``i`` correctly after the attack.  Robust accuracy follows the
RobustBench convention: a point counts only if it is classified correctly both clean and
attacked (AutoAttack never attacks misclassified points).
"""
import contextlib
import json
import logging
import os
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ..attacks import NOISE_DISTRIBUTIONS, pgd_attack, random_noise_attack
from .errors import EvaluationError

__all__ = [
    'progress_bar', 'predict_correct', 'correct_under_attack', 'make_pgd', 'make_noise', 'run_autoattack',
    'AUTOATTACK_VERSIONS', 'AUTOATTACK_ATTACKS', 'AA_LOGGER',
]

AUTOATTACK_VERSIONS = ('standard', 'plus', 'rand', 'custom')
AUTOATTACK_ATTACKS = ('apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t')
AA_LOGGER = 'auto-attack'


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = 'pt'):
    """A tqdm bar on stderr (a no-op object when disabled)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                leave=False, dynamic_ncols=True)


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


@torch.no_grad()
def predict_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                    device: torch.device, desc: str = 'clean', progress: bool = True) -> torch.Tensor:
    """Clean correctness per point, (N,) bool on the CPU."""
    out = torch.zeros(len(x), dtype=torch.bool)
    with progress_bar(len(x), desc, progress) as bar:
        for start, end in _batches(len(x), batch_size):
            logits = model(x[start:end].to(device))
            out[start:end] = (logits.argmax(-1).cpu() == y[start:end])
            bar.update(end - start)
    return out


def correct_under_attack(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Callable, *,
        batch_size: int, device: torch.device, desc: str, progress: bool = True,
) -> torch.Tensor:
    """Correctness per point after ``attack(model, x_batch, y_batch) -> x_adv``, (N,) bool.

    The adversarial points are checked to lie in [0, 1]; the attack is responsible for the
    threat model (every attack used here projects onto it).
    """
    out = torch.zeros(len(x), dtype=torch.bool)
    with progress_bar(len(x), desc, progress) as bar:
        for start, end in _batches(len(x), batch_size):
            xb, yb = x[start:end].to(device), y[start:end].to(device)
            with torch.enable_grad():
                x_adv = attack(model, xb, yb)
            if x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
                raise RuntimeError(f"{desc}: the attack left the [0, 1] box")
            with torch.no_grad():
                out[start:end] = (model(x_adv).argmax(-1) == yb).cpu()
            bar.update(end - start)
    return out


def _apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
          restarts: int, seed: int, grad_model: Optional[nn.Module] = None) -> torch.Tensor:
    """APGD-CE from pyautoattack (the L1 attack of AutoAttack, with its eps schedule)."""
    from pyautoattack.autopgd_base import APGDAttack
    attack = APGDAttack(grad_model if grad_model is not None else model, n_iter=steps, norm=norm,
                        n_restarts=restarts, eps=eps, seed=seed, loss='ce', device=x.device,
                        use_largereps=(norm == 'L1'), logger=logging.getLogger(AA_LOGGER))
    return attack.perturb(x, y)


def make_pgd(*, threat_model: str, eps: float, steps: int, restarts: int, step_size: Optional[float],
             seed: int, grad_model: Optional[nn.Module] = None, keep_best: bool = True) -> Callable:
    """``attack(model, x, y) -> x_adv`` for the threat model.

    Linf / L2: :func:`timm_edl.attacks.pgd_attack` (gradients through every unrolled step of
    the model, or of ``grad_model``; worst iterate kept, selected on the model).  L1: our
    PGD has no L1 projection, so it is pyautoattack's APGD-CE for L1 (also the first attack
    of AutoAttack for L1).  The random starts come from one generator seeded with ``seed``,
    so a run is reproducible for a given batch size.
    """
    if threat_model == 'L1':
        state = {'calls': 0}

        def attack(model, x, y):
            state['calls'] += 1
            return _apgd(model, x, y, eps=eps, norm='L1', steps=steps, restarts=restarts,
                         seed=seed + state['calls'], grad_model=grad_model)
        return attack
    generator = torch.Generator().manual_seed(seed)
    return partial(pgd_attack, eps=eps, norm=threat_model, steps=steps, restarts=restarts,
                   step_size=step_size, random_start=True, grad_model=grad_model,
                   keep_best=keep_best, generator=generator)


def make_noise(*, threat_model: str, eps: float, draws: int, distribution: str, seed: int) -> Callable:
    """``attack(model, x, y) -> x_noisy``: :func:`timm_edl.attacks.random_noise_attack` (Linf / L2),
    the worst of ``draws`` random perturbations per point, from one generator seeded with ``seed``."""
    if threat_model not in ('Linf', 'L2'):
        raise EvaluationError(f"the random-noise attack supports Linf and L2, not {threat_model}")
    if distribution not in NOISE_DISTRIBUTIONS:
        raise EvaluationError(f"unknown noise distribution {distribution!r}; choose one of "
                              f"{', '.join(NOISE_DISTRIBUTIONS)}")
    generator = torch.Generator().manual_seed(seed)
    return partial(random_noise_attack, eps=eps, norm=threat_model, draws=draws, distribution=distribution,
                   generator=generator)


# ----------------------------------------------------------------------------- AutoAttack

class _LogCapture(logging.Handler):
    """Collects pyautoattack's log records: warnings (its checks) and chunk progress for a
    tqdm bar; mirrors everything to a log file."""

    _BATCH = re.compile(r'^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed')
    _RUNNING = re.compile(r'^attacking with (\S+): (\d+) points in (\d+) chunks')

    def __init__(self, log_file: Optional[Path], progress: bool,
                 on_record: Optional[Callable[[logging.LogRecord], None]] = None):
        super().__init__(level=logging.DEBUG)
        self.records: List[Dict[str, Any]] = []
        self.warnings: List[str] = []
        self.log_file = log_file
        self.progress = progress
        self.on_record = on_record
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.records.append({'level': record.levelname, 'message': message, 'time': record.created})
        if self.log_file is not None:
            with open(self.log_file, 'a', encoding='utf-8') as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {record.levelname} {message}\n")
        if record.levelno >= logging.WARNING and message not in self.warnings:
            self.warnings.append(message)
        match = self._RUNNING.match(message)
        if match:
            self._close_bar()
            self.bar = progress_bar(int(match.group(3)), f'AutoAttack {match.group(1)}', self.progress, unit='chunk')
        match = self._BATCH.match(message)
        if match and self.bar is not None:
            self.bar.n = int(match.group(2))
            self.bar.refresh()
        if self.on_record is not None:
            self.on_record(record)

    def _close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self._close_bar()
        super().close()


@contextlib.contextmanager
def _captured_autoattack_log(handler: _LogCapture):
    logger = logging.getLogger(AA_LOGGER)
    old = (logger.level, logger.propagate)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
        handler.close()


STATE_FORMAT = 'timm-edl-autoattack-state/1'


def _fraction(flags: torch.Tensor) -> float:
    return int(flags.sum()) / max(len(flags), 1)


def _merge_warnings(messages: List[str]) -> List[str]:
    """One line per kind of warning: 'there are 30 points with zero gradient!' logged by
    seven chunks becomes one message with the range of counts."""
    groups: Dict[str, List[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r'\d+(\.\d+)?', '#', m), []).append(m)
    out = []
    for key, items in groups.items():
        if len(items) == 1:
            out.append(items[0])
            continue
        numbers = [float(v) for m in items for v in re.findall(r'\d+(?:\.\d+)?', m)[:1]]
        span = f"{min(numbers):g}-{max(numbers):g}" if numbers else ''
        out.append(f"{items[0]} [logged {len(items)} times; counts ranged {span}]")
    return out


def _read_state(path: Path, n: int, attacks: List[str]) -> Optional[Dict[str, Any]]:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EvaluationError(f"AutoAttack state {path} is unreadable ({e}); delete it or pass --no-resume") from None
    if state.get('format') != STATE_FORMAT:
        raise EvaluationError(f"{path} is not a timm-edl AutoAttack state; delete it or pass --no-resume")
    if len(state.get('flags', ())) != n or state.get('attacks') != attacks:
        raise EvaluationError(f"AutoAttack state {path} is for another run ({len(state.get('flags', ()))} points, "
                              f"attacks {state.get('attacks')}); delete it or pass --no-resume")
    return state


def _write_state(path: Optional[Path], state: Dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + f'.{os.getpid()}.tmp')
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: a kill during the write keeps the previous state


def run_autoattack(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
        threat_model: str, eps: float, version: str = 'standard', attacks: Optional[List[str]] = None,
        seed: int = 0, batch_size: int = 100, device: torch.device = torch.device('cpu'),
        state_path: Optional[Path] = None, log_file: Optional[Path] = None, progress: bool = True,
        on_record: Optional[Callable[[logging.LogRecord], None]] = None,
) -> Dict[str, Any]:
    """AutoAttack (pyautoattack) on (x, y), resumable through ``state_path``.

    The attacks are pyautoattack's, with its parameters for ``version`` and its seed; this
    function drives them the way ``AutoAttack.run_standard_evaluation`` does (each attack
    on the points still robust, in order, in chunks of ``batch_size``, each chunk attacked
    with the same seed) but one chunk at a time, saving the per-point robust flags to
    ``state_path`` after every chunk.  Rerunning with the same state file skips what was
    done, so an interrupted evaluation continues where it stopped and ends with exactly
    the result of an uninterrupted run.  (pyautoattack 0.2.0's own ``state_path`` cannot
    resume: it writes the set of attacks as a string, reads the finished ones back as a
    list, and fails with ``UnboundLocalError: y_adv`` when a resumed run breaks a point.)

    Every log record of pyautoattack is captured: its checks (randomised / dynamic
    defence, probabilities instead of logits, zero gradients, too many target classes)
    and, after the last attack, its "Square beats the gradient attacks" check on the
    accuracies after each attack.  ``warnings`` lists them (without duplicates).

    Returns ``{'correct': (N,) bool, 'accuracy', 'clean_accuracy', 'per_attack',
    'attacks', 'warnings', 'log', 'resumed', 'already_run', 'seconds'}``.
    """
    from pyautoattack import AutoAttack
    from pyautoattack import checks as aa_checks
    if version not in AUTOATTACK_VERSIONS:
        raise EvaluationError(f"unknown AutoAttack version {version!r}; choose one of {AUTOATTACK_VERSIONS}")
    if version == 'custom':
        if not attacks:
            raise EvaluationError("AutoAttack version 'custom' needs a list of attacks")
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown:
            raise EvaluationError(f"unknown AutoAttack attacks {unknown}; choose from {AUTOATTACK_ATTACKS}")
    n = len(x)
    handler = _LogCapture(log_file, progress, on_record)
    logger = logging.getLogger(AA_LOGGER)
    start = time.time()
    with _captured_autoattack_log(handler):
        adversary = AutoAttack(model, norm=threat_model, eps=eps, version=version, seed=seed, device=device,
                               attacks=list(attacks) if version == 'custom' else None)
        attack_list = list(adversary.attacks_to_run)
        adversary.verbose = False  # its per-call messages would be per chunk; we log our own
        state = None
        if state_path is not None:
            state_path = Path(state_path)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            if state_path.is_file():
                state = _read_state(state_path, n, attack_list)
        resumed = state is not None
        if state is None:
            clean = predict_correct(model, x, y, batch_size=batch_size, device=device, desc='AutoAttack clean',
                                    progress=progress)
            state = {'format': STATE_FORMAT, 'attacks': attack_list, 'version': version, 'norm': threat_model,
                     'eps': eps, 'seed': seed, 'batch_size': batch_size, 'clean': clean.tolist(),
                     'flags': clean.tolist(), 'done': [], 'chunks_done': {}, 'start_flags': {}, 'per_attack': {}}
            _write_state(state_path, state)
            logger.debug(f"using {version} version including {', '.join(attack_list)}")
            logger.debug(f"initial accuracy: {_fraction(clean):.2%}")
        else:
            logger.debug(f"resuming from {state_path}: done {', '.join(state['done']) or 'nothing'}"
                         + ''.join(f"; {a}: {k} chunks" for a, k in state['chunks_done'].items()
                                   if a not in state['done']))
        already_run = list(state['done'])
        flags = torch.tensor(state['flags'], dtype=torch.bool)
        for attack in attack_list:
            if attack in state['done']:
                continue
            if not flags.any():
                logger.debug('no robust datapoints left, skipping remaining attacks')
                break
            if attack not in state['start_flags']:
                state['start_flags'][attack] = flags.tolist()
            start_flags = torch.tensor(state['start_flags'][attack], dtype=torch.bool)
            chunks = torch.nonzero(start_flags).flatten().split(batch_size)
            logger.debug(f'attacking with {attack}: {int(start_flags.sum())} points in {len(chunks)} chunks')
            for k, chunk in enumerate(chunks):
                if k < state['chunks_done'].get(attack, 0):
                    continue
                adversary.attacks_to_run = [attack]
                x_adv, _ = adversary.run_standard_evaluation(x[chunk], y[chunk], batch_size=len(chunk))
                with torch.no_grad():
                    fooled = (model(x_adv.to(device)).argmax(-1).cpu() != y[chunk])
                flags[chunk[fooled]] = False
                state['flags'] = flags.tolist()
                state['chunks_done'][attack] = k + 1
                _write_state(state_path, state)
                logger.debug(f'{attack} - {k + 1}/{len(chunks)} - {int(fooled.sum())} out of {len(chunk)} '
                             f'successfully perturbed')
            state['done'].append(attack)
            state['per_attack'][attack] = _fraction(flags)
            _write_state(state_path, state)
            logger.debug(f"robust accuracy after {attack.upper()}: {state['per_attack'][attack]:.2%} "
                         f"(total time {time.time() - start:.1f} s)")
        adversary.attacks_to_run = attack_list
        accuracies = {'clean': _fraction(torch.tensor(state['clean'])), **state['per_attack']}
        aa_checks.check_square_sr(accuracies, logger=logger)
        logger.debug(f"robust accuracy: {_fraction(flags):.2%}")
    return {
        'correct': flags.clone(),
        'accuracy': _fraction(flags),
        'clean_accuracy': accuracies['clean'],
        'per_attack': dict(state['per_attack']),
        'attacks': attack_list,
        'warnings': _merge_warnings(handler.warnings),
        'log': handler.records,
        'resumed': resumed,
        'already_run': already_run,
        'seconds': time.time() - start,
    }
