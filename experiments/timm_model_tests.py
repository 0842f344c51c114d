#!/usr/bin/env python
"""Run timm's own model test-suite (``tests/test_models.py`` of the installed timm's sdist)
against every ``edlnet_*`` architecture.

    python experiments/timm_model_tests.py            # make timm-model-tests

timm's tests are not part of its wheel: the script fetches the source distribution of the
installed timm version from the package registry (``pip download --no-binary``), unpacks
its ``tests/`` into ``runs/timm_model_tests/<version>/``, adds one line to that copy's
``conftest.py`` (``import timm_edl``, so that timm's tests see the ``edlnet_*`` models
when they collect) and runs ``pytest tests/test_models.py -k edlnet``.  Nothing of timm's
is kept in this repository; the summary (passed / failed / skipped per test function, the
exact command, commit, machine, wall time) goes to
``experiments/cache/timm_model_tests/timm-<version>.json``.  A failing test is a defect of
the family: fix the model, then rerun.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / 'experiments' / 'cache' / 'timm_model_tests'
MARK = "import timm_edl  # noqa: F401  (added by timm-edl: registers edlnet_* before collection)\n"


def fetch_tests(version: str, work: Path) -> Path:
    """timm's ``tests/`` folder of ``version``, unpacked under ``work`` (downloaded once)."""
    tests = work / f'timm-{version}' / 'tests'
    if (tests / 'test_models.py').is_file():
        return tests
    work.mkdir(parents=True, exist_ok=True)
    sdist = work / f'timm-{version}.tar.gz'
    if not sdist.is_file():
        cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
               '-d', str(work), '-q']
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            raise SystemExit(f"could not download timm {version}'s source distribution (needs the package "
                             f"registry):\n{done.stderr[-2000:]}")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f'timm-{version}/tests/')]
        tar.extractall(work, members=members, filter='data')
    return tests


def summarise(junit: Path) -> dict:
    """Counts per outcome and per test function from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET
    outcomes: Counter = Counter()
    per_test: dict = defaultdict(Counter)
    failures = []
    for case in ET.parse(junit).getroot().iter('testcase'):
        name = case.get('name', '')
        outcome = 'passed'
        for child in case:
            if child.tag in ('failure', 'error'):
                outcome = 'failed'
                failures.append({'test': name, 'message': (child.get('message') or '')[:500]})
            elif child.tag == 'skipped':
                outcome = 'skipped'
        outcomes[outcome] += 1
        per_test[re.sub(r'\[.*', '', name)][outcome] += 1
    return {'outcomes': dict(outcomes), 'per_test': {k: dict(v) for k, v in sorted(per_test.items())},
            'failures': failures}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--work', default=str(REPO / 'runs' / 'timm_model_tests'), help='download / unpack folder')
    p.add_argument('-k', dest='select', default='edlnet', help='pytest -k expression (default: every edlnet_*)')
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args(argv)

    import timm
    version = timm.__version__
    tests = fetch_tests(version, Path(args.work) / version)
    conftest = tests / 'conftest.py'
    text = conftest.read_text() if conftest.is_file() else ''
    if MARK not in text:
        conftest.write_text(MARK + text)
    junit = tests.parent / 'junit.xml'
    cmd = [sys.executable, '-m', 'pytest', str(tests / 'test_models.py'), '-k', args.select, '-q',
           '-p', 'no:cacheprovider', '-rf', f'--junitxml={junit}']
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1')
    print('running: ' + ' '.join(cmd), flush=True)
    started = time.time()
    done = subprocess.run(cmd, cwd=str(tests.parent), env=env)
    wall = time.time() - started
    if not junit.is_file():
        print(f"pytest wrote no report (exit status {done.returncode})", file=sys.stderr)
        return 2
    summary = summarise(junit)
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'timm_edl'], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    record = {'timm_version': version, 'select': args.select,
              'command': f"python experiments/timm_model_tests.py -k {args.select}",
              'pytest_command': ' '.join(cmd[1:]), 'exit_status': done.returncode, 'wall_seconds': round(wall),
              'commit': commit, 'timm_edl_modified': bool(dirty), 'machine': f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                          f"{args.threads} threads", **summary}
    CACHE.mkdir(parents=True, exist_ok=True)
    # a narrower -k gets its own record beside the full one
    suffix = '' if args.select == 'edlnet' else '-' + re.sub(r'[^A-Za-z0-9_.]+', '_', args.select)
    out = CACHE / f'timm-{version}{suffix}.json'
    out.write_text(json.dumps(record, indent=2) + '\n')
    print(f"timm {version} tests/test_models.py -k {args.select}: {summary['outcomes']} in {wall:.0f} s -> {out}")
    return 0 if done.returncode == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
