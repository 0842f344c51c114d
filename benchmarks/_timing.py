"""Shared helpers of the benchmark scripts: machine header, timing, FLOP counting, tables.

Timing: the candidates of one comparison are timed *interleaved*: for each repeat,
candidate A once, then B once, ... so a burst of load from another process on a shared
machine hits all of them alike, and the ratio of the medians is steadier than the medians.
Each sample is one call, timed with ``time.perf_counter`` with the accelerator
synchronised before and after it, under ``torch.set_num_threads(threads)``.
(``torch.utils.benchmark.Timer`` does the same sync and thread handling, but its
``timeit(number)`` adds two untimed warm-up calls to every measurement, which would triple
the cost of one-call interleaved samples of multi-second training steps.)
"""
import ast
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from timm_edl.runtime import keep_freed_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}


# --------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def _load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(['git', '-C', REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> Dict[str, Any]:
    """The commit the benchmarked code comes from, and whether tracked files of timm_edl/ differ from it."""
    commit = _git('rev-parse', '--short=12', 'HEAD')
    dirty = _git('status', '--porcelain', '--untracked-files=no', '--', 'timm_edl')
    return {'commit': commit, 'timm_edl_modified': bool(dirty) if dirty is not None else None}


def machine_info(threads: int, device: str, note: str = '') -> Dict[str, Any]:
    """Description of the machine and software for the header line and the JSON file."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: Dict[str, Any] = {
        'cpu': _cpu_model(),
        'malloc_tuned': keep_freed_memory(),
        'logical_cores': os.cpu_count(),
        'usable_cores': usable,
        'torch': torch.__version__,
        'threads': threads,
        'device': device,
        'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'load_average_start': _load_average(),
        'python': platform.python_version(),
        **code_version(),
    }
    if device == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    if note:
        info['note'] = note
    return info


def header_line(info: Dict[str, Any]) -> str:
    parts = [
        f"CPU: {info['cpu']}",
        f"cores: {info['logical_cores']} logical ({info['usable_cores']} usable)",
        f"torch {info['torch']}",
        f"threads: {info['threads']}",
        f"device: {info['device']}" + (f" ({info['gpu']})" if 'gpu' in info else ''),
        f"date: {info['date']}",
    ]
    if info.get('commit'):
        parts.append(f"timm_edl @ {info['commit']}" + (' + local changes' if info.get('timm_edl_modified') else ''))
    if info.get('load_average_start') is not None:
        parts.append('load avg (1/5/15 min) at start: ' + '/'.join(str(v) for v in info['load_average_start']))
    parts.append('malloc: freed blocks kept for reuse (timm_edl.runtime)' if info.get('malloc_tuned')
                 else 'malloc: platform default')
    if info.get('note'):
        parts.append(f"note: {info['note']}")
    return '**Machine** - ' + ' | '.join(parts)


def finish_info(info: Dict[str, Any]) -> str:
    """Record the load average at the end (evidence of a shared machine); return a line."""
    info['load_average_end'] = _load_average()
    if info['load_average_end'] is None:
        return ''
    return 'load avg (1/5/15 min) at end: ' + '/'.join(str(v) for v in info['load_average_end'])


def setup_torch(threads: int, device: str) -> torch.device:
    """Thread count for the untimed parts too (warm-up, FLOP counting); device check."""
    if threads < 1:
        raise SystemExit(f'--threads must be >= 1, got {threads}')
    torch.set_num_threads(threads)
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda requested but torch.cuda.is_available() is False')
    if device not in ('cpu', 'cuda'):
        raise SystemExit(f'unknown device {device!r}')
    torch.manual_seed(0)
    return torch.device(device)


# --------------------------------------------------------------------------- timing

def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_interleaved(
        fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int, threads: int,
        after_warmup: Optional[Callable[[], Any]] = None,
) -> Dict[str, Dict[str, Any]]:
    """Time each callable ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    ``after_warmup`` (if given) is called once between the warm-up and the timed calls.
    Returns per name ``{'median_s', 'iqr_s', 'times_s'}``; each timed sample is one call.
    """
    if repeats < 1:
        raise SystemExit(f'--repeats must be >= 1, got {repeats}')
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        _sync()
        if after_warmup is not None:
            after_warmup()
        times: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync()
                start = time.perf_counter()
                fn()
                _sync()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    out = {}
    for name, ts in times.items():
        if len(ts) >= 4:
            q = statistics.quantiles(ts, n=4)
            iqr = q[2] - q[0]
        else:
            iqr = max(ts) - min(ts)
        out[name] = {'median_s': statistics.median(ts), 'min_s': min(ts), 'iqr_s': iqr, 'times_s': ts}
    return out


class _NoModuleTracking:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP goes to 'Global' only."""
    parents = frozenset({'Global'})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by FlopCounterMode (matmuls and convolutions
    only, forward and backward, conv_transpose included; element-wise ops count 0).

    Without FlopCounterMode's per-module tracking: its ModuleTracker puts backward hooks on
    every module input that requires grad, and ``torch.autograd.grad`` with respect to such a
    leaf input (what every attack step does) then fails with "A leaf node was passed to
    _will_engine_execute_node" (pytorch/pytorch#131753).  The counting itself is
    FlopCounterMode's; :func:`flops_by_module` keeps the attribution for plain passes.
    """
    counter = FlopCounterMode(display=False)
    if hasattr(counter, 'mod_tracker'):
        counter.mod_tracker = _NoModuleTracking()
    with counter:
        fn()
    return int(counter.get_total_flops())


def flops_by_module(fn: Callable[[], Any]) -> Dict[str, int]:
    """Counted FLOPs of one call of ``fn`` per module name (``'Global'`` is the total)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


class _ConvCounter(TorchDispatchMode):
    """Counts convolution ops (conv2d and conv_transpose2d both dispatch to aten.convolution)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class PowerIterationProbe:
    """Wraps ``EDLConv2d._power_iteration`` of the given layers to observe the L refreshes.

    ``calls``: number of power-iteration runs; ``seconds``: wall time spent in them (device
    synced); with ``count_iterations = True`` each run's iteration count (one analysis conv
    + one synthesis conv_transpose per iteration) is appended to ``iterations``.
    ``restore()`` removes the wrappers.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], attr: str = '_power_iteration'):
        self.calls = 0
        self.seconds = 0.0
        self.count_iterations = False
        self.iterations: List[int] = []
        self._patched = []
        for m in modules:
            original = getattr(m, attr)

            def wrapped(*args, _orig=original, **kwargs):
                self.calls += 1
                counter = _ConvCounter() if self.count_iterations else None
                _sync()
                start = time.perf_counter()
                if counter is None:
                    out = _orig(*args, **kwargs)
                else:
                    with counter:
                        out = _orig(*args, **kwargs)
                _sync()
                self.seconds += time.perf_counter() - start
                if counter is not None:
                    self.iterations.append(counter.count // 2)
                return out

            setattr(m, attr, wrapped)  # instance attribute shadows the method
            self._patched.append((m, attr))

    def snapshot(self) -> Dict[str, Any]:
        return {'calls': self.calls, 'seconds': self.seconds}

    def restore(self) -> None:
        for m, attr in self._patched:
            delattr(m, attr)
        self._patched = []


# --------------------------------------------------------------------------- output

def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f'{ms:.0f}'
    if ms >= 10:
        return f'{ms:.1f}'
    return f'{ms:.2f}'


def fmt_spread(t: Dict[str, Any]) -> str:
    """IQR as a percentage of the median."""
    return f"{100.0 * t['iqr_s'] / t['median_s']:.0f}%" if t['median_s'] > 0 else '-'


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
    for row in rows:
        lines.append('| ' + ' | '.join(str(v) for v in row) + ' |')
    return '\n'.join(lines)


def write_json(path: Optional[str], payload: Dict[str, Any]) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, 'w') as f:
        json.dump(payload, f, indent=2)
    print(f'\nresults written to {path}')


def parse_int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise SystemExit(f'expected a comma-separated list of integers, got {text!r}')
    if not values or min(values) < 1:
        raise SystemExit(f'expected positive integers, got {text!r}')
    return values


def parse_edl_cfg(items: Sequence[str]) -> Dict[str, Any]:
    """``['fused=False', 'lam=0.2']`` -> ``{'fused': False, 'lam': 0.2}`` (Python literals, else str)."""
    cfg: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.strip():
            raise SystemExit(f'--edl-cfg expects KEY=VALUE, got {item!r}')
        try:
            cfg[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            cfg[key.strip()] = value.strip()
    return cfg


def layer_settings(layer: torch.nn.Module) -> Dict[str, Any]:
    """The effective solver settings of an EDLConv2d (whatever attributes this version has)."""
    names = ('num_steps', 'step_rule', 'init', 'reweight', 'eps', 'nonneg', 'normalize', 'fused', 'memory_efficient',
             'compile_solver', 'power_iters', 'power_iters_warm', 'fixed_lipschitz')
    out = {n: getattr(layer, n) for n in names if hasattr(layer, n)}
    for n in ('beta', 'lam'):
        v = getattr(layer, n, None)
        if isinstance(v, torch.Tensor):
            out[n] = round(float(v.detach()), 6)
            out[n + '_learnable'] = isinstance(v, torch.nn.Parameter)
    return out


@contextlib.contextmanager
def eager_solvers(modules: Sequence[torch.nn.Module]):
    """Run EDL layers built with ``compile_solver=True`` eagerly inside the block.

    FLOPs are counted on the eager path: the compiled solver computes the same convolutions
    (the same math), but a FLOP counter cannot see inside compiled kernels.
    """
    saved = [(m, m.compile_solver) for m in modules if hasattr(m, 'compile_solver')]
    for m, _ in saved:
        m.compile_solver = False
    try:
        yield
    finally:
        for m, value in saved:
            m.compile_solver = value


def add_common_args(parser, repeats: int) -> None:
    parser.add_argument('--repeats', type=int, default=repeats, help='timed calls per candidate (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls per candidate before timing')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(),
                        help='torch intra-op threads (default: torch.get_num_threads())')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--json', metavar='PATH', default=None, help='save the results as JSON')
    parser.add_argument('--edl-cfg', action='append', default=[], metavar='KEY=VALUE',
                        help='extra EDLConv2d keyword argument (repeatable), e.g. --edl-cfg fused=False')
    parser.add_argument('--note', default='', help='free text for the header line (e.g. "shared machine")')


def finish(info: dict, elapsed: float, json_path, payload: dict) -> dict:
    """End a benchmark run: print its wall time and the machine's state now, write ``payload``
    (plus ``machine`` and ``wall_s``) to ``json_path`` (if given); returns the payload."""
    end = finish_info(info)
    print(f'\nwall time: {elapsed:.0f} s' + (f'; {end}' if end else ''))
    payload = {**payload, 'machine': info, 'wall_s': elapsed}
    write_json(json_path, payload)
    return payload


def script_main(run, parse_args):
    """The ``main(argv) -> int`` of a benchmark script: ``run(parse_args(argv))``, exit status 0."""
    def main(argv=None) -> int:
        run(parse_args(argv))
        return 0
    return main
