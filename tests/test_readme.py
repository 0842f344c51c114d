"""The README's Python snippets run as written (in a fresh working directory)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
SNIPPETS = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert SNIPPETS, 'README.md lost its usage examples'


@pytest.mark.parametrize('index', range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = SNIPPETS[index]
    exec(compile(code, f'README.md[python block {index}]', 'exec'), {'__name__': '__readme__'})
