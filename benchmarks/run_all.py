#!/usr/bin/env python
"""Run every benchmark and write their tables, as printed, to a Markdown report.

    python benchmarks/run_all.py --out docs/performance.md [--quick] [--threads 2]

Each script runs in its own process; the report holds the exact command lines and their
output (machine description, date and commit are in each table's header line), so every
number in it was produced by the command printed above it.
"""
import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: Sections that their own command writes into their own file; the report ends with each of them,
#: verbatim, so that regenerating the report keeps them (``--includes-only`` re-appends them to an
#: existing report without running any benchmark).
INCLUDES = (
    (ROOT / 'docs' / 'performance_h200.md',
     'python benchmarks/estimate_h200.py --threads 1 --out docs/performance_h200.md'),
    (ROOT / 'docs' / 'performance_resnet20.md',
     'python benchmarks/bench_resnet20.py --threads 1 --batch 64 --repeats 3 --warmup 1 --compile --parallel '
     '--out docs/performance_resnet20.md'),
)
_INCLUDE_MARK = '<!-- appended by benchmarks/run_all.py from '


def with_includes(report: str, includes=INCLUDES) -> str:
    """``report`` without any previously appended include, followed by every include file present."""
    text = report.split(_INCLUDE_MARK, 1)[0].rstrip('\n') + '\n'
    for path, command in includes:
        path = Path(path)
        if path.is_file():
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            text += (f'\n{_INCLUDE_MARK}{name}, written by `{command}`; edit or regenerate that file, '
                     f'not this section -->\n\n{path.read_text().strip()}\n')
    return text


def runs(threads: int, quick: bool):
    common = ['--threads', str(threads)] + (['--quick'] if quick else [])
    timing = [] if quick else ['--repeats', '5', '--warmup', '1']
    sections = [
        ('One EDL layer vs the conv it replaces (default: fused step)',
         ['bench_layer.py', '--input-grad'] + timing + common),
        ('One EDL layer at beta = 0.5 (the elastic regime: the reweighting is not the identity)',
         ['bench_layer.py', '--steps', '2,3', '--edl-cfg', 'beta=0.5'] + timing + common),
        ('One EDL layer, reference implementation (autograd through every op; the baseline)',
         ['bench_layer.py', '--edl-cfg', 'fused=False'] + timing + common),
        ('edlnet_resnet18 vs its conv twin',
         ['bench_model.py', '--no-fwd-bwd'] + (timing[:2] if timing else []) + common),
        ('Training memory: activations saved for backward',
         ['bench_memory.py'] + common),
        ('edlnet_resnet18 vs its conv twin: adversarial training (PGD-10 AT step) and AutoAttack (APGD-CE) throughput',
         ['bench_attack.py'] + common),
    ]
    if quick:  # the compiled variants spend most of a quick run compiling: full runs only
        return sections
    compiled = ['--edl-cfg', 'compile_solver=True']
    return sections + [
        ('edlnet_resnet18, reference implementation (the baseline of the model-level gap)',
         ['bench_model.py', '--no-fwd-bwd', '--no-layer-table', '--edl-cfg', 'fused=False'] + timing[:2] + common),
        ('One EDL layer, compile_solver=True (torch.compile of the solver; the conv compiled too)',
         ['bench_layer.py', '--input-grad', '--steps', '2,3'] + compiled + timing + common),
        ('edlnet_resnet18, compile_solver=True (against the eager twin and torch.compile(twin))',
         ['bench_model.py', '--no-fwd-bwd', '--no-layer-table'] + compiled + timing[:2] + common),
    ]


def _variant(cmd) -> str:
    cfg = [cmd[i + 1] for i, a in enumerate(cmd) if a == '--edl-cfg']
    if 'fused=False' in cfg:
        return 'reference (fused=False)'
    label = 'compile_solver=True' if 'compile_solver=True' in cfg else 'fused (default)'
    return label + ''.join(f', {c}' for c in cfg if c.startswith('beta='))


def summary(outputs) -> str:
    """The performance targets next to what the runs below measured.

    Quotient = measured time ratio / counted FLOP ratio (1: the EDL layers cost exactly
    their extra convolutions).  Every value is read from the JSON the scripts wrote.
    """
    rows = []
    for cmd, data in outputs:
        script, variant = cmd[0], _variant(cmd)
        if script == 'bench_layer.py':
            for r in data['results']:
                target = {'fwd': '<= 1.15', 'fwd+bwd': '<= 1.25', 'fwd+bwd (input grad)': '<= 1.25'}.get(r['pass'])
                if r['K'] in (2, 3):
                    rows.append([f"layer, K={r['K']}, {r['pass']}", variant, f"{r['measured_ratio']:.2f}",
                                 f"{r['flop_ratio_counted']:.2f}", f"{r['measured_over_flop_ratio']:.2f}",
                                 f'quotient {target}'])
        elif script == 'bench_model.py':
            for r in data['results']:
                for mode, p in r['passes'].items():
                    rows.append([f"edlnet_resnet18, K={r['K']}, {mode}", variant, f"{p['measured_ratio']:.2f}",
                                 f"{p['flop_ratio_counted']:.2f}", f"{p['measured_over_flop_ratio']:.2f}",
                                 'gap (quotient - 1) at most half the reference\'s'])
                    if 'measured_ratio_vs_compiled_twin' in p:
                        rows.append([f"edlnet_resnet18, K={r['K']}, {mode}, vs torch.compile(twin)", variant,
                                     f"{p['measured_ratio_vs_compiled_twin']:.2f}", f"{p['flop_ratio_counted']:.2f}",
                                     f"{p['measured_over_flop_ratio_vs_compiled_twin']:.2f}", 'report'])
        elif script == 'bench_memory.py':
            for r in data['results']:
                rows.append([f"edlnet_resnet18, K={r['num_steps']}, saved activations", r['implementation'],
                             f"{r['ratio']:.2f}", '-', '-',
                             'memory_efficient <= 1.5' if r['implementation'] == 'memory_efficient' else 'report'])
        elif script == 'bench_attack.py':
            for r in data['results']:
                for name, p in r['passes'].items():
                    label = 'PGD-10 AT step' if name == 'at_step' else 'APGD-CE (AutoAttack)'
                    rows.append([f"edlnet_resnet18, K={r['K']}, {label}", variant, f"{p['measured_ratio']:.2f}",
                                 f"{p['flop_ratio_counted']:.2f}", f"{p['measured_over_flop_ratio']:.2f}", 'report'])
    table = ['| what | implementation | EDL / conv time (or bytes) | FLOP ratio | quotient | target |',
             '|---|---|---|---|---|---|']
    table += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return ('## Summary: the targets and what the runs below measured\n\n'
            'EDL / conv = time of the EDL layer or model divided by that of the conv it replaces '
            '(median; memory rows: saved-activation bytes); quotient = that ratio / the counted FLOP '
            'ratio. Every cell comes from the run of the same script further down.\n\n'
            + '\n'.join(table) + '\n')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(ROOT / 'docs' / 'performance.md'))
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--quick', action='store_true')
    p.add_argument('--includes-only', action='store_true',
                   help='run nothing: re-append the include files (INCLUDES) to the existing --out report')
    args = p.parse_args(argv)
    if args.includes_only:
        out = Path(args.out)
        out.write_text(with_includes(out.read_text() if out.is_file() else '# Performance\n'))
        print(f'wrote {args.out} (includes only)')
        return 0
    sections = [
        '# Performance\n',
        f'Written by `python benchmarks/run_all.py --threads {args.threads}'
        f'{" --quick" if args.quick else ""}` on '
        f'{datetime.datetime.now().astimezone().isoformat(timespec="seconds")}; '
        'each section gives the command and its output verbatim. How the numbers are made: '
        '`benchmarks/README.md`.\n',
    ]
    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (title, cmd) in enumerate(runs(args.threads, args.quick)):
            json_path = Path(tmp) / f'{i}.json'
            full = [sys.executable, str(HERE / cmd[0])] + cmd[1:] + ['--json', str(json_path)]
            print('running:', ' '.join(cmd), flush=True)
            done = subprocess.run(full, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                raise SystemExit(f'{cmd[0]} failed with exit code {done.returncode}')
            outputs.append((cmd, json.loads(json_path.read_text())))
            # the temporary JSON path is an artefact of this driver, not part of the result
            text = '\n'.join(line for line in done.stdout.strip().splitlines()
                              if not line.startswith('results written to '))
            sections.append(f'## {title}\n\n```\npython benchmarks/{" ".join(cmd)}\n```\n\n{text}\n')
    sections.insert(2, summary(outputs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(with_includes('\n'.join(sections)))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
