"""Shared pytest set-up. Keep it small and generic: module-specific helpers belong in their test file.

Here: the offline Hub cache (``hub_cache``, :func:`publish_to_cache`) and the real datasets'
presence rule (``require_fashion_mnist``, ``require_cifar10_jpeg``: skipped on a developer
machine without them, a failure in CI, which always has them).
"""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
IN_CI = bool(os.environ.get("CI"))

# The CI machine has 2 cores shared by 2 pytest workers: one intra-op thread per process.
torch.set_num_threads(1)


@pytest.fixture
def make_edlnet():
    """Factory for EDLNets: ``make_edlnet(name='edlnet_resnet18', train=False, **create_model_kwargs)``.

    Uses a cheap step-size estimate (``edl_cfg=dict(power_iters=5)``, merged with any
    ``edl_cfg`` passed) for tests where the EDL math does not matter, and returns the
    model in eval mode unless ``train=True``.
    """
    import timm
    import timm_edl  # noqa: F401  (registers the edlnet_* models)

    def _make(name: str = 'edlnet_resnet18', *, train: bool = False, **kwargs):
        edl_cfg = dict(power_iters=5)
        edl_cfg.update(kwargs.pop('edl_cfg', None) or {})
        model = timm.create_model(name, edl_cfg=edl_cfg, **kwargs)
        return model.train(train)

    return _make


def publish_to_cache(folder, repo_id, cache_dir):
    """Lay ``folder``'s files out as huggingface_hub's cache holds a downloaded repo."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith('.'))
    sha = hashlib.sha1(b''.join(p.name.encode() + p.read_bytes()[:4096] for p in files)).hexdigest()
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / 'snapshots' / sha
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy(p, snapshot / p.name)
    (repo_dir / 'refs').mkdir(exist_ok=True)
    (repo_dir / 'refs' / 'main').write_text(sha)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty offline Hub cache: huggingface_hub never opens a connection."""
    import huggingface_hub.constants as constants
    cache = tmp_path / 'hf_cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf_home'))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HOME', str(tmp_path / 'hf_home'))
    return cache


def require_cifar10_jpeg():
    # CI always has shared/ beside the checkout: there a missing archive fails.
    if not (CIFAR10_JPEG_DIR / "test.tar.gz").is_file():
        if IN_CI:
            pytest.fail(f"CIFAR-10-JPEG archive missing: {CIFAR10_JPEG_DIR}/test.tar.gz")
        pytest.skip(f"no CIFAR-10-JPEG archive at {CIFAR10_JPEG_DIR}")


def require_fashion_mnist():
    from timm_edl import data as D
    if not (D.DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        if IN_CI:
            pytest.fail("Debian's dataset-fashion-mnist is not installed "
                        "(apt-get install -y dataset-fashion-mnist)")
        pytest.skip("Debian package dataset-fashion-mnist not installed")
