"""The repository speaks only of itself: no file describes how the project is being built
(names of build-environment tools, sessions, borrowed GPUs, issue numbers given as reasons).

:func:`scan_text` is the scanner; the last test runs it over every file git knows of (tracked,
and untracked but not ignored) and names each hit as ``file:line``. This file holds the patterns
and their planted examples, so it is the one file not scanned.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()

# (what it is, pattern); matched case-insensitively, line by line
PATTERNS = [
    ('a build-environment tool', r'\bfarm-[a-z]+'),
    ('a build-environment tool', r'`duplicates`|\bduplicates(:| tool\b| report\b)'),
    ('a build-environment tool', r'\bdevice (tool|machine)\b|\btool library\b|\bKINDS\.md\b'),
    ("a build-environment tool's arguments", r'\bcarry \[|\btimeout_s \d'),
    ('the build environment', r'\bworkplace\b'),
    ('a work session', r'\bsessions?\b'),
    ('a borrowed machine', r'\bloan(s|ed)?\b|\bborrow(s|ed|ing)?\b|\blent to\b'),
    ('an issue number given as a reason', r'\bissues? ?#?\d+'),
    ('an issue as the reason', r"\b(the|this|that) issue's\b|\bdone-line\b|\bperformance issue\b"),
    ('the next worker resuming', r'\bnext one (resumes|picks up|continues)\b'),
]
_COMPILED = [(what, re.compile(pattern, re.IGNORECASE)) for what, pattern in PATTERNS]


def scan_text(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, line)`` of every line of ``text`` that matches a pattern (1-based)."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in _COMPILED:
            if pattern.search(line):
                hits.append((number, what, line.strip()))
                break
    return hits


def repository_files() -> list[str]:
    """Every file git knows of in the checkout: tracked, and untracked but not ignored."""
    proc = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'], cwd=REPO,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip('not a git checkout: nothing to list the files with')
    return sorted({p for p in proc.stdout.decode().split('\0') if p})


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte in it) or one that is gone."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b'\0' in data:
        return None
    return data.decode('utf-8', errors='replace')


# ----------------------------------------------------------------------------- the scanner

PLANTED = [
    'Run `farm-studio look timm_edl` to draw it.',
    'copies the weights (duplicates: no new pair)',
    'the device tool returns at most 8 files',
    'on the device machine: install, then run',
    'measured on this machine, tool library KINDS.md',
    'run with carry [".whl", ".data"] and timeout_s 600',
    "measured on this workplace's H200",
    'committed: a later session resumes from it',
    'What a GPU loan buys',
    'no GPU was lent to this project so far',
    'on a borrowed GPU',
    'The elastic-regime decision (issue 11; about 4 hours)',
    'made for Issue #14',
    "every 3x3 conv an EDL layer (the issue's candidate)",
    'What the done-line runs',
    'at commit 93845e8 and the next one resumes from there',
]

FINE = [
    'sorted by radius, duplicates removed',
    'the two-stage schedule releases beta at exactly 1',
    'release.json records which ran',
    'the first GPU run measures what is real',
    'any later run resumes from the committed cache',
    'splits results into parts of at most 15 MiB (`--pack DIR`)',
    "an H200's measured bf16 matmul rate",
    'the next epoch starts from the best checkpoint',
    'tissue 12 samples',
]


@pytest.mark.parametrize('line', PLANTED)
def test_the_scanner_flags_a_planted_line(line):
    text = 'A line about the software.\n' + line + '\nAnother one.\n'
    hits = scan_text(text)
    assert [number for number, _, _ in hits] == [2], hits


@pytest.mark.parametrize('line', FINE)
def test_the_scanner_leaves_lines_about_the_software_alone(line):
    assert scan_text(line) == []


def test_a_planted_file_is_named_with_its_line(tmp_path):
    planted = tmp_path / 'notes.md'
    planted.write_text('# notes\n\nFine.\nThe next one resumes here (issue 3).\n')
    hits = [f'{planted.name}:{number}' for number, _, _ in scan_text(read_text(planted))]
    assert hits == ['notes.md:4']
    (tmp_path / 'blob.bin').write_bytes(b'\0issue 3')
    assert read_text(tmp_path / 'blob.bin') is None


# ----------------------------------------------------------------------------- the repository

def test_no_file_speaks_of_how_the_project_is_built():
    files = repository_files()
    assert 'README.md' in files and SELF in files
    hits = []
    for name in files:
        if name == SELF:
            continue
        text = read_text(REPO / name)
        if text is not None:
            hits += [f'{name}:{number}: {what}: {line[:160]}' for number, what, line in scan_text(text)]
    assert not hits, ('describe the software (its users, commands, data, machines, results), not how it is '
                      'being built:\n' + '\n'.join(hits))
