"""The pretrained tags of the ``edlnet_*`` family (timm's ``default_cfgs``).

Every tag says how its model takes input: [0, 1] pixels, mean 0 / std 1 (the models
normalise themselves, see :mod:`timm_edl.models.edlnet`).  Tags with weights are the zoo's
(``make zoo``): their files ship inside the package (``timm_edl/_zoo/``, listed with their
sha256 in its manifest) and their cfgs also name the Hub repository ``timm-edl push``
publishes them to; every other tag has no weights yet and ``pretrained=True`` says so.
"""
from typing import Any, Dict, List, Optional

from timm.models import generate_default_cfgs

from ..data.constants import CIFAR10_CLASSES, FASHION_MNIST_CLASSES
from ..weights import HUB_NAMESPACE, shipped_weights

__all__ = ['PAPER_ID', 'default_cfgs', 'tags_with_weights']

PAPER_ID = 'arXiv:2502.00834'


def _cfg(num_classes: int = 10, input_size=(3, 32, 32), pool_size=(4, 4), **kwargs) -> Dict[str, Any]:
    return {
        'num_classes': num_classes, 'input_size': input_size, 'pool_size': pool_size,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        # the model normalises internally: the data pipeline must feed [0, 1] pixels
        'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0),
        'first_conv': 'conv1', 'classifier': 'fc',
        'license': 'apache-2.0', 'paper_ids': PAPER_ID,
        **kwargs,
    }


def _cifar_cfgs(arch: str, pool_size=(4, 4)) -> Dict[str, Dict[str, Any]]:
    return {
        f'{arch}.cifar10': _cfg(10, pool_size=pool_size, label_names=CIFAR10_CLASSES,
                                description='CIFAR-10 (32x32, 10 classes); no published weights yet'),
        f'{arch}.cifar100': _cfg(100, pool_size=pool_size,
                                 description='CIFAR-100 (32x32, 100 classes); no published weights yet'),
    }


def _imagenet_stem_cfgs(arch: str) -> Dict[str, Dict[str, Any]]:
    return {
        f'{arch}.tiny_imagenet': _cfg(200, input_size=(3, 64, 64), pool_size=(2, 2),
                                      description='Tiny-ImageNet (64x64, 200 classes); no published weights yet'),
        f'{arch}.in1k': _cfg(1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
                             description='ImageNet-1k (224x224); no published weights yet'),
    }


def _zoo_cfg(model_name: str, **kwargs) -> Dict[str, Any]:
    """A tag of the zoo: its weights ship inside the package (``timm_edl/_zoo/``) when the zoo's
    manifest lists it, and name the Hub repository ``timm-edl push`` publishes them to."""
    shipped = shipped_weights().get(model_name)
    if shipped is None:
        return _cfg(**kwargs)
    return _cfg(file=shipped['path'], hf_hub_id=f'{HUB_NAMESPACE}/{model_name}', **kwargs)


def _zoo_cfgs(arch: str) -> Dict[str, Dict[str, Any]]:
    """The small CPU-trained zoo (``make zoo``): not CIFAR-10, not paper scale.  The first tag
    (the default of ``timm.create_model(arch)``) takes 3 x 32 x 32 images like the rest of the family."""
    fmnist, c10jpeg = f'{arch}.fashion_mnist_pgd_linf', f'{arch}.cifar10_jpeg_pgd_linf'
    return {
        c10jpeg: _zoo_cfg(c10jpeg, num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2),
                          label_names=CIFAR10_CLASSES,
                          description='CIFAR-10-JPEG (a lossy JPEG copy of CIFAR-10, not CIFAR-10), '
                                      'PGD adversarial training, Linf eps 8/255'),
        fmnist: _zoo_cfg(fmnist, num_classes=10, input_size=(1, 28, 28), pool_size=(2, 2),
                         mean=(0.0,), std=(1.0,), label_names=FASHION_MNIST_CLASSES,
                         description='Fashion-MNIST (28x28 grey), PGD adversarial training, Linf eps 0.1'),
    }


def _pair_cfgs(arch: str, tag: str, pool_size, description: str) -> Dict[str, Dict[str, Any]]:
    """A tag of the zoo's model pairs (``experiments/zoo_pairs.py``): an EDLNet and its conv twin on
    CIFAR-10-JPEG, both shipped; listed first, so that it is the default tag of ``arch``."""
    name = f'{arch}.{tag}'
    return {name: _zoo_cfg(name, num_classes=10, input_size=(3, 32, 32), pool_size=pool_size,
                           label_names=CIFAR10_CLASSES, description=description)}


_FAST_LINF = ('CIFAR-10-JPEG (a lossy JPEG copy of CIFAR-10, not CIFAR-10), fast adversarial training '
              '(FGSM-RS), Linf eps 8/255')
_SMOOTH = ('CIFAR-10-JPEG (a lossy JPEG copy of CIFAR-10, not CIFAR-10), Gaussian-noise training at sigma 0.25 '
           'for randomized smoothing (timm-edl certify --sigma 0.25)')

default_cfgs = generate_default_cfgs({
    **_zoo_cfgs('edlnet_resnet8_in'),
    **_pair_cfgs('edlnet_resnet8_in', 'cifar10_jpeg_smooth_sigma25', (2, 2), _SMOOTH),
    **_pair_cfgs('edlnet_resnet8_in_conv', 'cifar10_jpeg_smooth_sigma25', (2, 2), _SMOOTH),
    **_cifar_cfgs('edlnet_resnet8_in_conv', pool_size=(2, 2)),
    **_cifar_cfgs('edlnet_resnet18'),
    **_pair_cfgs('edlnet_resnet20', 'cifar10_jpeg_fast_linf', (8, 8), _FAST_LINF),
    **_cifar_cfgs('edlnet_resnet20', pool_size=(8, 8)),
    **_pair_cfgs('edlnet_resnet20_conv', 'cifar10_jpeg_fast_linf', (8, 8), _FAST_LINF),
    **_cifar_cfgs('edlnet_resnet20_conv', pool_size=(8, 8)),
    **_cifar_cfgs('edlnet_resnet34'),
    **_cifar_cfgs('edlnet_resnet50'),
    **_cifar_cfgs('edlnet_preact_resnet18'),
    **_cifar_cfgs('edlnet_wrn28_10', pool_size=(8, 8)),
    **_cifar_cfgs('edlnet_wrn34_10', pool_size=(8, 8)),
    **_imagenet_stem_cfgs('edlnet_resnet18_in'),
    **_imagenet_stem_cfgs('edlnet_resnet50_in'),
})


def tags_with_weights(arch: Optional[str] = None) -> List[str]:
    """``arch.tag`` names whose pretrained cfg points at real weights."""
    names = []
    for model_name, cfgs in default_cfgs.items():
        if arch is not None and model_name != arch:
            continue
        for tag, cfg in cfgs.cfgs.items():
            if cfg.has_weights:
                names.append(f'{model_name}.{tag}')
    return names
