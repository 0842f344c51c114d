"""The product installed from its wheel, not from a checkout: the recipes ship with the package."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """``pip wheel .`` and the wheel installed (no dependencies: this venv has them) into a target folder."""
    tmp = tmp_path_factory.mktemp('wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w',
                    str(tmp / 'dist'), str(REPO)], check=True, capture_output=True, cwd=tmp)
    wheel, = (tmp / 'dist').glob('timm_edl-*.whl')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(tmp / 'site'),
                    str(wheel)], check=True, capture_output=True, cwd=tmp)
    return tmp


def _run(installed, code, *args):
    env = {**os.environ, 'PYTHONPATH': str(installed / 'site'), 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, env=env,
                          cwd=installed, timeout=300)


def test_wheel_ships_the_recipes_and_train_finds_them_by_name(installed):
    out = _run(installed, "import timm_edl, timm_edl.demo as d; print(timm_edl.__file__); print(d.DEFAULT_RECIPE, "
                          "d.DEFAULT_RECIPE.is_file())")
    assert out.returncode == 0, out.stderr
    module, recipe = out.stdout.split('\n')[:2]
    assert module.startswith(str(installed / 'site')) and recipe.endswith('cpu_fashion_mnist_pgd.yaml True')
    code = "import sys; from timm_edl.cli.train import main; sys.exit(main(sys.argv[1:]))"
    for name in ('cpu_fashion_mnist_pgd', 'recipes/cpu_fashion_mnist_pgd.yaml', 'edlnet_resnet18_cifar10_pgd.yaml'):
        out = _run(installed, code, '--config', name, '--print-config')
        assert out.returncode == 0, (name, out.stderr[-2000:])
    out = _run(installed, code, '--config', 'cpu_fashion_mnist_pgd', '--print-config')
    assert 'fashion-mnist' in out.stdout and 'edlnet_resnet18_in' in out.stdout
    out = _run(installed, code, '--config', 'no_such_recipe', '--print-config')
    assert out.returncode != 0 and 'shipped: ' in out.stdout + out.stderr and 'cpu_cifar10_jpeg_pgd' in out.stdout + out.stderr


def test_wheel_ships_the_zoo_and_pretrained_loads_offline(installed):
    """A fresh, offline install: the zoo's weights come with the wheel and timm loads them."""
    code = ("import json, timm, timm_edl\nfrom timm_edl import weights\nnames = timm.list_pretrained('edlnet*')\n"
            "for n in names: timm.create_model(n, pretrained=True)\n"
            "print(json.dumps([names, str(weights.ZOO_DIR), sorted(weights.shipped_weights())]))")
    out = _run(installed, code)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    names, zoo_dir, shipped = json.loads(out.stdout.strip().splitlines()[-1])
    assert names and sorted(names) == shipped
    assert zoo_dir.startswith(str(installed / 'site'))
