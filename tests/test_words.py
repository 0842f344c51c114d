"""The repository speaks only of itself: no file describes how the project is being built
(names of build-environment tools, sessions, borrowed GPUs, issue numbers given as reasons).

:func:`scan_text` is the scanner; the last test runs it over every file git knows of (tracked,
and untracked but not ignored) and names each hit as ``file:line``. The patterns and their
planted examples are in ``tests/data/words.json``, the one file not scanned besides this one.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SELF = Path(__file__).resolve().relative_to(REPO).as_posix()

# (what it is, pattern) and example lines, in a data file: matched case-insensitively, line by line
WORDS = json.loads((REPO / 'tests' / 'data' / 'words.json').read_text())
PATTERNS = [tuple(p) for p in WORDS['patterns']]
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

PLANTED = WORDS['planted']  # each must be flagged
FINE = WORDS['fine']  # lines about the software: none may be


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
    planted.write_text('# notes\n\nFine.\n' + PLANTED[0] + '\n')
    hits = [f'{planted.name}:{number}' for number, _, _ in scan_text(read_text(planted))]
    assert hits == ['notes.md:4']
    (tmp_path / 'blob.bin').write_bytes(b'\0' + PLANTED[0].encode())
    assert read_text(tmp_path / 'blob.bin') is None


# ----------------------------------------------------------------------------- the repository

def test_no_file_speaks_of_how_the_project_is_built():
    files = repository_files()
    assert 'README.md' in files and SELF in files
    hits = []
    for name in files:
        if name in (SELF, 'tests/data/words.json'):
            continue
        text = read_text(REPO / name)
        if text is not None:
            hits += [f'{name}:{number}: {what}: {line[:160]}' for number, what, line in scan_text(text)]
    assert not hits, ('describe the software (its users, commands, data, machines, results), not how it is '
                      'being built:\n' + '\n'.join(hits))
