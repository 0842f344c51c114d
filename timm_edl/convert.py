"""Replace the convolutions of a network by EDL layers.

One mechanism serves two uses: the EDLNet constructors build a plain ResNet and swap the
selected convolutions for freshly initialised EDL layers, and ``convert_to_edl`` turns
the convolutions of an existing (trained) timm / torchvision CNN into EDL layers whose
dictionaries start from the convolution weights.
"""
import re
from typing import Any, Callable, Dict, List, Union

import torch
import torch.nn as nn

from .layers import EDLConv2d

__all__ = ['EDL_DEFAULTS', 'POLICIES', 'select_convs', 'convert_to_edl']

# EDLConv2d keyword arguments used by EDLNets unless overridden (model arg ``edl_cfg``)
EDL_DEFAULTS: Dict[str, Any] = dict(
    num_steps=2, beta=1.0, beta_learnable=True, lam=0.1, lam_learnable=False,
    step_rule='fixed', eps=1e-3, nonneg=False, normalize_atoms=True,
)
_EDL_KEYS = set(EDL_DEFAULTS) | {'bias', 'power_iters', 'power_iters_warm', 'fixed_lipschitz'}

Policy = Union[str, Callable[[str, nn.Conv2d], bool]]
POLICIES = {
    'default': 'every conv with a kernel larger than 1x1 (3x3 convs and the stem); 1x1 convs stay plain',
    'all': 'every convolution, 1x1 shortcuts included',
    'stem': 'only the first convolution (the stem)',
    'blocks': 'every conv larger than 1x1 except the stem',
    'none': 'no convolution (the conv twin)',
    're:<regex>': 'convolutions whose qualified module name matches the regex (re.search)',
}


def _convertible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple))


def select_convs(model: nn.Module, policy: Policy = 'default') -> List[str]:
    """Qualified names of the ``nn.Conv2d`` modules of ``model`` that ``policy`` selects.

    Grouped, dilated, non-zero-padded or string-padded convolutions cannot be EDL layers
    and are never selected.  The stem is the first convolution in module order.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return []
    stem_name = convs[0][0]
    if callable(policy):
        chosen = [n for n, m in convs if policy(n, m)]
    elif not isinstance(policy, str):
        raise TypeError(f"edl policy must be a string or a callable, got {type(policy).__name__}")
    elif policy.startswith('re:'):
        pattern = re.compile(policy[3:])
        chosen = [n for n, _ in convs if pattern.search(n)]
    elif policy == 'default':
        chosen = [n for n, m in convs if max(m.kernel_size) > 1]
    elif policy == 'all':
        chosen = [n for n, _ in convs]
    elif policy == 'stem':
        chosen = [stem_name]
    elif policy == 'blocks':
        chosen = [n for n, m in convs if max(m.kernel_size) > 1 and n != stem_name]
    elif policy == 'none':
        chosen = []
    else:
        raise ValueError(f"unknown edl policy {policy!r}; choose one of {sorted(POLICIES)} or a callable")
    by_name = dict(convs)
    return [n for n in chosen if _convertible(by_name[n])]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_to_edl(
        model: nn.Module,
        policy: Policy = 'default',
        copy_weights: bool = True,
        **edl_kwargs: Any,
) -> nn.Module:
    """Replace the convolutions selected by ``policy`` with :class:`EDLConv2d` layers, in place.

    Each EDL layer gets the geometry (channels, kernel, stride, padding) of the conv it
    replaces; with ``copy_weights`` its dictionary starts from the conv weight (and the
    conv bias, if any, becomes the code bias).  ``edl_kwargs`` go to every EDLConv2d.
    Returns ``model``.
    """
    unknown = set(edl_kwargs) - _EDL_KEYS
    if unknown:
        raise ValueError(f"unknown EDL option(s) {sorted(unknown)}; valid: {sorted(_EDL_KEYS)}")
    for name in select_convs(model, policy):
        conv = model.get_submodule(name)
        kwargs = dict(edl_kwargs)
        kwargs.setdefault('bias', conv.bias is not None)
        edl = EDLConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, **kwargs)
        edl = edl.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if copy_weights:
            with torch.no_grad():
                edl.weight.copy_(conv.weight)
                if conv.bias is not None and edl.bias is not None:
                    edl.bias.copy_(conv.bias)
        _set_submodule(model, name, edl)
    return model
