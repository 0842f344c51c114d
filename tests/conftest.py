"""Shared pytest set-up. Keep it small and generic: module-specific helpers belong in their test file."""
import pytest
import torch

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
