"""EDLNets: ResNet / PreAct-ResNet / WideResNet whose convolutions are EDL layers.

The networks are the CIFAR ResNets of the adversarial-robustness literature (3x3 stem,
no max-pool), the PreAct ResNet-18 and WideResNet-28-10 / 34-10 of RobustBench, and
ImageNet-stem ResNets (7x7 stem + max-pool) for Tiny-ImageNet / ImageNet.  They are
built with plain convolutions, then every convolution selected by ``edl_layers`` is
replaced by an :class:`~timm_edl.layers.EDLConv2d` of the same geometry (see
:func:`timm_edl.convert.select_convs` for the policies).  ``edl_layers='none'`` gives the
conv twin: the same network with ordinary convolutions, for same-run comparisons.

Inputs are images in [0, 1]; the model normalises them itself (``input_mean`` /
``input_std`` buffers), so every pretrained cfg says mean=(0,0,0), std=(1,1,1) and
timm's data pipeline feeds it raw pixels.  That is what attacks and RobustBench expect.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import (
    DropPath, LayerType, create_act_layer, create_classifier, get_act_layer, get_device_dtype, get_norm_layer,
    register_notrace_module,
)
from timm.models import (
    build_model_with_cfg, checkpoint_seq, register_model, resolve_pretrained_cfg,
)

from .._timm_compat import feature_take_indices
from ..convert import EDL_DEFAULTS, convert_to_edl
from ..data.constants import CIFAR10_MEAN, CIFAR10_STD
from ..layers import with_legacy_options
from ..weights import check_pretrained_source
# timm's register_model reads the tags from this module's default_cfgs
from .pretrained_cfgs import PAPER_ID, default_cfgs, tags_with_weights  # noqa: F401

__all__ = ['EDLResNet', 'BasicBlock', 'Bottleneck', 'PreActBlock', 'InputNormalize', 'PretrainedWeightsUnavailable']

MAX_STAGES = 4


class PretrainedWeightsUnavailable(RuntimeError):
    """``pretrained=True`` for a tag that has no published weights."""


@register_notrace_module  # its shape check is Python control flow: an FX leaf
class InputNormalize(nn.Module):
    """(x - mean) / std per channel; x: (B, C, H, W) pixels in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device=None):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"input_mean has {len(mean)} values but input_std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"input_std must be positive, got {tuple(std)}")
        # float32 whatever the model's dtype: cast to the input's dtype where used
        dd = dict(device=device, dtype=torch.float32)
        self.register_buffer('mean', torch.tensor(list(mean), **dd).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(list(std), **dd).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"expected images of shape (B, {self.mean.shape[1]}, H, W) with pixels in [0, 1], got "
                f"{list(x.shape)}; create the model with in_chans={str(x.shape[1]) if x.dim() == 4 else '?'} "
                f"for other channel counts")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1, **dd) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False, **dd)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1, **dd) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False, **dd)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-norm-act-conv3x3-norm (+ shortcut) -act."""
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path_rate: float = 0.0,
                 act_layer: LayerType = nn.ReLU, norm_layer: LayerType = nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_chs = planes * self.expansion
        self.conv1 = _conv3x3(in_chs, planes, stride, **dd)
        self.bn1 = norm_layer(planes, **dd)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv3x3(planes, out_chs, **dd)
        self.bn2 = norm_layer(out_chs, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(_conv1x1(in_chs, out_chs, stride, **dd), norm_layer(out_chs, **dd))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand x4."""
    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path_rate: float = 0.0,
                 act_layer: LayerType = nn.ReLU, norm_layer: LayerType = nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        out_chs = planes * self.expansion
        self.conv1 = _conv1x1(in_chs, planes, **dd)
        self.bn1 = norm_layer(planes, **dd)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv3x3(planes, planes, stride, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv3 = _conv1x1(planes, out_chs, **dd)
        self.bn3 = norm_layer(out_chs, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.act3 = create_act_layer(act_layer, inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(_conv1x1(in_chs, out_chs, stride, **dd), norm_layer(out_chs, **dd))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class PreActBlock(nn.Module):
    """Pre-activation block (PreAct ResNet, WideResNet): norm-act-conv3x3-norm-act-conv3x3.

    When the shape changes, the 1x1 shortcut reads the pre-activated input, as in the
    RobustBench WideResNet and PreAct ResNet-18.
    """
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, drop_path_rate: float = 0.0,
                 act_layer: LayerType = nn.ReLU, norm_layer: LayerType = nn.BatchNorm2d, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.bn1 = norm_layer(in_chs, **dd)
        self.act1 = create_act_layer(act_layer, inplace=False)  # its output feeds both branches
        self.conv1 = _conv3x3(in_chs, planes, stride, **dd)
        self.bn2 = norm_layer(planes, **dd)
        self.act2 = create_act_layer(act_layer, inplace=True)
        self.conv2 = _conv3x3(planes, planes, **dd)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.downsample = None
        if stride != 1 or in_chs != planes:
            self.downsample = _conv1x1(in_chs, planes, stride, **dd)

    def zero_init_last(self) -> None:
        pass  # the residual branch ends in a conv, nothing to zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(pre)
        x = self.conv1(pre)
        x = self.conv2(self.act2(self.bn2(x)))
        return self.drop_path(x) + shortcut


BLOCKS: Dict[str, Type[nn.Module]] = dict(basic=BasicBlock, bottleneck=Bottleneck, preact=PreActBlock)


class EDLResNet(nn.Module):
    """ResNet family with EDL layers in place of (a selection of) its convolutions.

    Args:
        block: 'basic' | 'bottleneck' | 'preact'.
        layers: blocks per stage, e.g. (2, 2, 2, 2).
        channels: planes per stage, e.g. (64, 128, 256, 512); 1 to 4 stages (``widths`` is
            accepted as its older name).
        stem_width: channels of the stem conv.
        stem_type: 'cifar' (3x3 stride 1, no pooling) | 'imagenet' (7x7 stride 2 + 3x3 max-pool).
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate, act_layer, norm_layer:
            as in timm's ResNet (a class, or a name timm's ``get_act_layer`` / ``get_norm_layer`` knows).
        input_mean, input_std: per-channel statistics used to normalise the [0, 1] input
            (default: CIFAR-10's for 3 channels, 0.5 / 0.5 otherwise).
        edl_layers: which convolutions become EDL layers ('default': every k>1 conv incl.
            the stem, 1x1 convs plain; 'all', 'stem', 'blocks', 'none', 're:<regex>' on
            module names, or a callable(name, conv) -> bool).
        edl_cfg: EDLConv2d keyword arguments overriding ``EDL_DEFAULTS``.
        zero_init_last: zero-init the last BN gamma of each residual branch.
        device, dtype: where and in which dtype parameters are created (timm's factory kwargs).
    """

    def __init__(
            self,
            block: str = 'basic',
            layers: Sequence[int] = (2, 2, 2, 2),
            channels: Sequence[int] = (64, 128, 256, 512),
            stem_width: int = 64,
            stem_type: str = 'cifar',
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            input_mean: Optional[Sequence[float]] = None,
            input_std: Optional[Sequence[float]] = None,
            edl_layers: Any = 'default',
            edl_cfg: Optional[Dict[str, Any]] = None,
            zero_init_last: bool = False,
            act_layer: LayerType = nn.ReLU,
            norm_layer: LayerType = nn.BatchNorm2d,
            widths: Optional[Sequence[int]] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if widths is not None:  # the older name, which exports made before `channels` record; no entrypoint sets it
            channels = widths
        act_layer, norm_layer = get_act_layer(act_layer), get_norm_layer(norm_layer)
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; choose one of {sorted(BLOCKS)}")
        if stem_type not in ('cifar', 'imagenet'):
            raise ValueError(f"unknown stem_type {stem_type!r}; choose 'cifar' or 'imagenet'")
        if len(layers) != len(channels):
            raise ValueError(f"layers {tuple(layers)} and channels {tuple(channels)} differ in length")
        if not 1 <= len(layers) <= MAX_STAGES:
            raise ValueError(f"EDLResNet has 1 to {MAX_STAGES} stages, got {len(layers)}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        block_cls = BLOCKS[block]
        self.preact = block == 'preact'
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        if input_mean is None:
            input_mean = CIFAR10_MEAN if in_chans == 3 else (0.5,) * in_chans
        if input_std is None:
            input_std = CIFAR10_STD if in_chans == 3 else (0.5,) * in_chans
        if len(input_mean) != in_chans:
            raise ValueError(f"input_mean has {len(input_mean)} values for in_chans={in_chans}")

        self.input_norm = InputNormalize(input_mean, input_std, device=device)
        # registration order = execution order (timm's FeatureListNet runs children in order)
        if stem_type == 'cifar':
            self.conv1 = _conv3x3(in_chans, stem_width, **dd)
            reduction = 1
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False, **dd)
            reduction = 2
        # pre-activation nets normalise inside the first block instead
        self.bn1 = nn.Identity() if self.preact else norm_layer(stem_width, **dd)
        self.act1 = nn.Identity() if self.preact else create_act_layer(act_layer, inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_type == 'imagenet' else nn.Identity()
        stem_tap = 'conv1' if self.preact else 'act1'
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module=stem_tap)]
        if stem_type == 'imagenet':
            reduction *= 2

        total_blocks = sum(layers)
        block_idx = 0
        in_chs = stem_width
        self.stage_names: List[str] = []
        for stage_idx, (depth, planes) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for i in range(depth):
                dpr = drop_path_rate * block_idx / max(total_blocks - 1, 1)
                blocks.append(block_cls(in_chs, planes, stride if i == 0 else 1, dpr, act_layer, norm_layer, **dd))
                in_chs = planes * block_cls.expansion
                block_idx += 1
            reduction *= stride
            name = f'layer{stage_idx + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))
        for stage_idx in range(len(layers), MAX_STAGES):
            # absent stages (e.g. the 3-stage WRNs) are parameter-free no-ops, so that
            # forward_features can name every stage and stay scriptable
            self.add_module(f'layer{stage_idx + 1}', nn.Identity())
        self.num_features = self.head_hidden_size = in_chs
        self.final_norm = norm_layer(in_chs, **dd) if self.preact else nn.Identity()
        self.final_act = create_act_layer(act_layer, inplace=True) if self.preact else nn.Identity()
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool, **dd)

        self._init_weights(zero_init_last)
        self.edl_layers = edl_layers if isinstance(edl_layers, str) else 'custom'
        self.edl_cfg = {**EDL_DEFAULTS, **with_legacy_options(edl_cfg or {})}
        convert_to_edl(self, policy=edl_layers, copy_weights=False, **self.edl_cfg)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^input_norm|^conv1|^bn1',
            blocks=[
                (r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None),
                (r'^final_norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head for ``num_classes`` (0: none) on the model's device and dtype; ``global_pool``
        None keeps the current pooling."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool,
                                                      **get_device_dtype(self))
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        return self.act1(self.bn1(self.conv1(x)))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (index 0) and of each stage (1..num_stages).

        ``indices``: which to return (int n = the last n); ``norm`` applies the final
        norm/act (pre-activation nets) to the last returned stage output.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt {output_fmt!r} is not supported; use 'NCHW'")
        num_taps = len(self.stage_names) + 1
        take_indices, max_index = feature_take_indices(num_taps, indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = self.stage_names[:max_index] if stop_early else self.stage_names
        for idx, name in enumerate(stages, start=1):
            x = getattr(self, name)(x)
            if idx in take_indices:
                last = idx == num_taps - 1
                intermediates.append(self.final_act(self.final_norm(x)) if norm and last else x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stage_names):
            x = self.final_act(self.final_norm(x))
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last requested intermediate (and the head)."""
        num_taps = len(self.stage_names) + 1
        take_indices, max_index = feature_take_indices(num_taps, indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        pruned_end = max_index < num_taps - 1
        if prune_norm or pruned_end:
            self.final_norm = nn.Identity()
            self.final_act = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or pruned_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self._stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([getattr(self, n) for n in self.stage_names], x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return self.final_act(self.final_norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.0:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_weights_exist(variant: str, kwargs: Dict[str, Any]) -> None:
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.has_weights or getattr(cfg, 'state_dict', None) is not None:
        return
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    available = tags_with_weights()
    raise PretrainedWeightsUnavailable(
        f"no pretrained weights are published for {name!r}. Tags with weights: "
        f"{', '.join(available) if available else 'none yet'}. Create it with pretrained=False to "
        f"train it, or load your own file with pretrained_cfg_overlay=dict(file='model.safetensors').")


def _create_edlnet(variant: str, pretrained: bool = False, **kwargs) -> EDLResNet:
    allow_pickle = kwargs.pop('allow_pickle', False)
    if pretrained:
        _check_weights_exist(variant, kwargs)
        kwargs = check_pretrained_source(variant, kwargs, allow_pickle=allow_pickle)
    # every feature level by default (stem + stages): 4 for the 3-stage WideResNets, not timm's 5
    levels = len(kwargs.get('layers', (2, 2, 2, 2))) + 1
    return build_model_with_cfg(
        EDLResNet, variant, pretrained,
        pretrained_filter_fn=_filter_pretrained,
        feature_cfg=dict(out_indices=tuple(range(levels))),
        **kwargs,
    )


def _filter_pretrained(state_dict: Dict[str, torch.Tensor], model: EDLResNet) -> Dict[str, torch.Tensor]:
    """Forget the saved step size of an EDL stem whose weight timm is about to adapt to
    another ``in_chans`` (the saved L belongs to the original dictionary)."""
    weight = state_dict.get('conv1.weight')
    if weight is not None and weight.shape[1] != model.conv1.weight.shape[1] and 'conv1.lipschitz_size' in state_dict:
        state_dict = dict(state_dict)
        state_dict['conv1.lipschitz_size'] = torch.tensor([-1, -1], dtype=torch.long)
    return state_dict


def _cifar_resnet(block: str, layers, **kwargs) -> Dict[str, Any]:
    return dict(block=block, layers=layers, channels=(64, 128, 256, 512), stem_width=64, stem_type='cifar', **kwargs)


def _wide_resnet(depth: int, widen: int, **kwargs) -> Dict[str, Any]:
    if (depth - 4) % 6:
        raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    return dict(block='preact', layers=(n, n, n), channels=(16 * widen, 32 * widen, 64 * widen),
                stem_width=16, stem_type='cifar', **kwargs)


@register_model
def edlnet_resnet18(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-18, CIFAR stem (3x3, no max-pool)."""
    return _create_edlnet('edlnet_resnet18', pretrained, **dict(_cifar_resnet('basic', (2, 2, 2, 2)), **kwargs))


@register_model
def edlnet_resnet34(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-34, CIFAR stem."""
    return _create_edlnet('edlnet_resnet34', pretrained, **dict(_cifar_resnet('basic', (3, 4, 6, 3)), **kwargs))


@register_model
def edlnet_resnet50(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-50 (bottleneck), CIFAR stem; the 1x1 convs stay plain by default."""
    return _create_edlnet('edlnet_resnet50', pretrained, **dict(_cifar_resnet('bottleneck', (3, 4, 6, 3)), **kwargs))


@register_model
def edlnet_preact_resnet18(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL PreAct ResNet-18 (the RobustBench / Rice et al. variant)."""
    return _create_edlnet('edlnet_preact_resnet18', pretrained, **dict(_cifar_resnet('preact', (2, 2, 2, 2)), **kwargs))


@register_model
def edlnet_wrn28_10(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL WideResNet-28-10 (RobustBench layout: pre-activation, channels 160/320/640)."""
    return _create_edlnet('edlnet_wrn28_10', pretrained, **dict(_wide_resnet(28, 10), **kwargs))


@register_model
def edlnet_wrn34_10(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL WideResNet-34-10 (RobustBench layout)."""
    return _create_edlnet('edlnet_wrn34_10', pretrained, **dict(_wide_resnet(34, 10), **kwargs))


def _resnet20(**kwargs) -> Dict[str, Any]:
    """He et al.'s CIFAR ResNet-20 (6n + 2, n = 3): 3x3 stride-1 stem, 3 stages x 3 basic blocks, 16/32/64."""
    return dict(block='basic', layers=(3, 3, 3), channels=(16, 32, 64), stem_width=16, stem_type='cifar', **kwargs)


@register_model
def edlnet_resnet20(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-20 (He et al.'s CIFAR ResNet-20, 0.27M parameters) with EDL layers in the
    residual blocks only: 18 EDL layers on 32x32 / 16x16 / 8x8 maps, a plain stem conv (an EDL
    layer on raw pixels is what docs/training.md advises against)."""
    return _create_edlnet('edlnet_resnet20', pretrained, **dict(_resnet20(edl_layers='blocks'), **kwargs))


@register_model
def edlnet_resnet20_conv(pretrained: bool = False, **kwargs) -> EDLResNet:
    """The conv twin of :func:`edlnet_resnet20`: the same network with every EDL layer a plain
    convolution (``edl_layers='none'``), the baseline its pretrained weights are compared with."""
    return _create_edlnet('edlnet_resnet20_conv', pretrained, **dict(_resnet20(edl_layers='none'), **kwargs))


@register_model
def edlnet_resnet18_in(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-18 with the ImageNet stem (7x7 stride 2 + max-pool), for Tiny-ImageNet / ImageNet."""
    args = dict(block='basic', layers=(2, 2, 2, 2), channels=(64, 128, 256, 512), stem_width=64, stem_type='imagenet')
    return _create_edlnet('edlnet_resnet18_in', pretrained, **dict(args, **kwargs))


def _resnet8_in(**kwargs) -> Dict[str, Any]:
    """ResNet-8 (6n + 2, n = 1) with the ImageNet stem: 3 stages x 1 basic block, 16/32/64."""
    return dict(block='basic', layers=(1, 1, 1), channels=(16, 32, 64), stem_width=16, stem_type='imagenet', **kwargs)


@register_model
def edlnet_resnet8_in(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-8 (He et al.'s 6n + 2 with n = 1: 3 stages x 1 basic block, 16/32/64 channels)
    with the ImageNet stem (7x7 stride 2 + max-pool) and EDL layers in the residual blocks only.

    The zoo's CPU model (about 80k parameters): the stem brings 28x28 / 32x32 inputs to 7x7 /
    8x8 before the first EDL layer (its PGD-AT step is about 20x cheaper than a CIFAR-stem
    ResNet-20 EDLNet's: benchmarks/bench_zoo_arch.py), and a plain stem conv avoids an EDL
    layer on raw pixels (see docs/zoo.md).
    """
    return _create_edlnet('edlnet_resnet8_in', pretrained, **dict(_resnet8_in(edl_layers='blocks'), **kwargs))


@register_model
def edlnet_resnet8_in_conv(pretrained: bool = False, **kwargs) -> EDLResNet:
    """The conv twin of :func:`edlnet_resnet8_in` (``edl_layers='none'``): the zoo's baseline,
    trained with the same recipe and seed as the EDLNet it is compared with."""
    return _create_edlnet('edlnet_resnet8_in_conv', pretrained, **dict(_resnet8_in(edl_layers='none'), **kwargs))


@register_model
def edlnet_resnet50_in(pretrained: bool = False, **kwargs) -> EDLResNet:
    """EDL ResNet-50 with the ImageNet stem."""
    args = dict(block='bottleneck', layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64, stem_type='imagenet')
    return _create_edlnet('edlnet_resnet50_in', pretrained, **dict(args, **kwargs))
