"""Weights on the Hugging Face Hub: export, push, and safe loading.

Publishing (maintainers)::

    folder = export(model, 'out/edlnet_resnet18.cifar10_linf', eval_results='eval.json')
    push(folder, dry_run=True)           # lists the files; then push(folder) uploads them

Loading (users)::

    import timm, timm_edl                # the import registers edlnet_* and edl_converted
    model = timm.create_model('hf-hub:timm-edl/<name>', pretrained=True)
    model = timm_edl.hub.load('hf-hub:timm-edl/<name>')   # same, with clearer errors

An exported folder is what timm reads (``local-dir:`` / ``hf-hub:``):

* ``model.safetensors``: the state dict (safetensors, never a pickle);
* ``config.json``: timm's config (``architecture``, ``num_classes``, ``num_features``,
  ``label_names``, ``model_args``, ``pretrained_cfg``, written by timm's own
  ``save_config_for_hf``).  ``model_args`` holds every argument needed to rebuild the exact
  network: for EDLNets ``edl_layers``, the complete ``edl_cfg``, ``input_mean``/``input_std``
  and ``in_chans``/``num_classes``/``global_pool``; for a converted timm model (see below)
  ``base_model`` and ``conversion``.  One extra top-level block, which timm ignores:
  ``timm_edl`` (published name, versions, sha256 of the weights, evaluation results);
* ``README.md``: the model card, rendered from ``hub_cards/model_card.md.tmpl``.

Evaluation results (``export(eval_results=...)``) follow the schema of :mod:`timm_edl.results`
(what ``timm-edl eval`` writes).  Weight files go through :mod:`timm_edl.weights`: never a
pickle unless ``allow_pickle=True``.

Where things live: :mod:`.export` (the folder and its checks), :mod:`.card` (the model card),
:mod:`.load` (loading, and :func:`resolve_model`, the one model resolver of every command), :mod:`.push` (upload); the command lines are in :mod:`timm_edl.cli`.

A converted timm model (``convert_to_edl`` on e.g. ``resnet18``) is exported as the
``edl_converted`` architecture (:mod:`timm_edl.models.converted`) with ``model_args``
``base_model='resnet18'`` and ``conversion`` (which convolutions are EDL layers, with which
options): ``timm.create_model('local-dir:...' / 'hf-hub:...', pretrained=True)`` rebuilds
it after ``import timm_edl``.  :func:`load` also reads exports of earlier releases, which
named ``resnet18`` plus a ``timm_edl_conversion`` block.
"""
from ..models.edlnet import PretrainedWeightsUnavailable
from ..results import read_eval_results
from ..weights import (
    CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, CorruptCheckpointError, StateDictMismatchError, UnsafeCheckpointError,
    check_pretrained_source, check_safetensors_file, load_checkpoint, read_state_dict, state_dict_digest,
)
from .card import CARD_TEMPLATE
from .export import CARD_NAME, HUB_NAMESPACE, ExportError, export, verify_export
from .load import ArchitectureNotRegisteredError, ModelSpecError, load, resolve_model
from .push import push

__all__ = [
    'HUB_NAMESPACE', 'WEIGHTS_NAME', 'CONFIG_NAME', 'CARD_NAME', 'CARD_TEMPLATE', 'PICKLE_SUFFIXES',
    'export', 'push', 'load', 'resolve_model', 'ModelSpecError', 'load_checkpoint', 'read_state_dict', 'check_safetensors_file',
    'check_pretrained_source', 'state_dict_digest', 'read_eval_results', 'verify_export',
    'UnsafeCheckpointError', 'CorruptCheckpointError', 'StateDictMismatchError',
    'ArchitectureNotRegisteredError', 'ExportError', 'PretrainedWeightsUnavailable',
]
