#!/usr/bin/env python
"""Run every benchmark and write their tables, as printed, to a Markdown report.

    python benchmarks/run_all.py --out docs/performance.md [--quick] [--threads 2]

Each script runs in its own process; the report holds the exact command lines and their
output (machine description, date and commit are in each table's header line), so every
number in it was produced by the command printed above it.
"""
import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def runs(threads: int, quick: bool):
    common = ['--threads', str(threads)] + (['--quick'] if quick else [])
    timing = [] if quick else ['--repeats', '5', '--warmup', '1']
    return [
        ('One EDL layer vs the conv it replaces (default: fused step)',
         ['bench_layer.py', '--input-grad'] + timing + common),
        ('One EDL layer, reference implementation (autograd through every op; the baseline)',
         ['bench_layer.py', '--edl-cfg', 'fused=False'] + timing + common),
        ('edlnet_resnet18 vs its conv twin',
         ['bench_model.py', '--no-fwd-bwd'] + (timing[:2] if timing else []) + common),
        ('Training memory: activations saved for backward',
         ['bench_memory.py'] + common),
        ('edlnet_resnet18 vs its conv twin: adversarial training (PGD-10 AT step) and AutoAttack (APGD-CE) throughput',
         ['bench_attack.py'] + common),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(ROOT / 'docs' / 'performance.md'))
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--quick', action='store_true')
    args = p.parse_args(argv)
    sections = [
        '# Performance\n',
        f'Written by `python benchmarks/run_all.py --threads {args.threads}'
        f'{" --quick" if args.quick else ""}` on '
        f'{datetime.datetime.now().astimezone().isoformat(timespec="seconds")}; '
        'each section gives the command and its output verbatim. How the numbers are made: '
        '`benchmarks/README.md`.\n',
    ]
    for title, cmd in runs(args.threads, args.quick):
        full = [sys.executable, str(HERE / cmd[0])] + cmd[1:]
        print('running:', ' '.join(cmd), flush=True)
        done = subprocess.run(full, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f'{cmd[0]} failed with exit code {done.returncode}')
        sections.append(f'## {title}\n\n```\npython benchmarks/{" ".join(cmd)}\n```\n\n{done.stdout.strip()}\n')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text('\n'.join(sections))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
