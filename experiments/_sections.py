"""Generated sections of a shared Markdown file (``docs/results.md``).

Each experiment script owns one section, delimited by ``<!-- begin section: NAME -->`` and
``<!-- end section: NAME -->`` lines; a script that rewrites the whole file keeps the other
scripts' sections (:func:`foreign_sections`), and :func:`write_section` replaces or appends
one section without touching the rest.
"""
from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r'<!-- begin section: (?P<name>[\w-]+) -->\n.*?<!-- end section: (?P=name) -->\n', re.S)


def _block(name: str, body: str) -> str:
    return f'<!-- begin section: {name} -->\n{body.rstrip()}\n<!-- end section: {name} -->\n'


def foreign_sections(path: Path, own: str | None = None) -> str:
    """The sections of ``path`` (other than ``own``), to append to a regenerated file."""
    if not path.exists():
        return ''
    blocks = [m.group(0) for m in _BLOCK.finditer(path.read_text()) if m.group('name') != own]
    return ''.join('\n' + b for b in blocks)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace section ``name`` of ``path`` with ``body`` (append it when absent; create the file)."""
    text = path.read_text() if path.exists() else ''
    block = _block(name, body)
    pattern = re.compile(rf'<!-- begin section: {re.escape(name)} -->\n.*?<!-- end section: {re.escape(name)} -->\n',
                         re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip('\n') + ('\n\n' if text else '') + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)
