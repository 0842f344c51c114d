"""``timm-edl eval --threat-model corruptions``: accuracy under common corruptions.

Example::

    timm-edl eval --model edlnet_resnet18.cifar10 --dataset cifar10 --data-dir data \\
        --threat-model corruptions --n-ex 10000 --batch-size 500 --out results/

cifar10 / cifar100 read the published CIFAR-10-C / CIFAR-100-C (``<data-dir>/CIFAR-10-C``,
``--corruption-dir``; ``--download`` fetches it from Zenodo); every other dataset gets its
corruptions generated with ``imagecorruptions-imaug`` (seeded by ``--seed``, cached in
``--corruption-cache``).  The clean accuracy of the same points is measured when the clean
split is there.  Writes ``<model>_<dataset>_corruptions.{json,md,model-index.yaml}``.
"""
import argparse
import shlex
import sys
from pathlib import Path
from typing import Callable, List, Optional, Set, Tuple

from .args import model_options, parse_kwargs
from .errors import EXIT_OK, fail, usage_errors

__all__ = ['run_corruptions', 'ADVERSARIAL_OPTIONS']

#: options of the adversarial evaluation, refused with --threat-model corruptions
ADVERSARIAL_OPTIONS = ('eps', 'eps_sweep', 'attacks', 'version', 'aa_attacks', 'pgd_steps', 'pgd_restarts',
                       'pgd_step_size', 'noise_draws', 'noise_dist', 'naive', 'naive_mode', 'surrogate',
                       'surrogate_kwargs', 'surrogate_arch', 'checks', 'check_n', 'grad_points', 'grad_dirs',
                       'tolerance', 'strict', 'no_resume')


def run_corruptions(args: argparse.Namespace, argv: List[str], given: Set[str], flag: Callable[[str], str]) -> int:
    """The command's body; ``given``: the options ``argv`` names (by dest), ``flag`` spells one."""
    from ..evaluation.corruptions import corruption_markdown, evaluate_corruptions, write_corruption_outputs
    from ..evaluation.models import load_model
    from ..evaluation.report import output_stem, reserve_stem
    refused = [flag(o) for o in ADVERSARIAL_OPTIONS if o in given]
    if refused:
        return fail('eval', f"{', '.join(refused)}: not an option of --threat-model corruptions (accuracy on "
                            f"corrupted images, no attack); drop {'it' if len(refused) == 1 else 'them'}")
    try:
        if args.n_ex is not None and args.n_ex < 1:
            raise ValueError(f"--n-ex must be >= 1, got {args.n_ex}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        model_opts, info = model_options(args), parse_kwargs(args.info, '--info')
        import torch
        torch.manual_seed(args.seed)  # a randomly initialised model is the same for the same --seed
        info_ds, x, y, n_total, corrupted, corruptions, severities = _data(args)
        in_chans = info_ds.in_chans if x is None else x.shape[1]
        model, source = load_model(**model_opts, num_classes=info_ds.num_classes, in_chans=in_chans)
        report = evaluate_corruptions(model, corrupted, x, y, corruptions=corruptions, severities=severities,
                                      dataset=info_ds, split=args.split, batch_size=args.batch_size,
                                      device=args.device, seed=args.seed, model_source=source, info=info,
                                      n_total=n_total, progress=not args.no_progress)
    except usage_errors() as e:
        return fail('eval', e)
    report['command'] = 'timm-edl eval ' + ' '.join(shlex.quote(a) for a in argv)
    report['data']['data_dir'] = None if args.data_dir is None else str(Path(args.data_dir).absolute())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = reserve_stem(out_dir, output_stem({'model': {'spec': args.model}, 'architecture': source['architecture'],
                                              'dataset': info_ds.name, 'threat_model': 'corruptions',
                                              'eps_text': ''}), args.overwrite)
    files = write_corruption_outputs(report, out_dir, stem)
    sys.stdout.write(corruption_markdown(report, files))
    sys.stdout.flush()
    return EXIT_OK


def _data(args: argparse.Namespace) -> Tuple:
    """(dataset info, clean x or None, clean y or None, split size, corrupted set, corruptions, severities)."""
    import torch

    from ..data import DatasetError, cache_dir, dataset_info, get_dataset, load_tensors
    from ..data.corruptions import PUBLISHED, generate, open_published, parse_corruptions, parse_severities
    corruptions, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    info_ds = dataset_info(args.dataset, args.data_dir, image_size=args.image_size)
    published = info_ds.name in PUBLISHED
    if published and args.corruption_cache:
        raise ValueError(f"--corruption-cache is for generated corruptions; {info_ds.display_name} is read from "
                         f"the published {PUBLISHED[info_ds.name].folder} (--corruption-dir)")
    if not published and args.corruption_dir:
        raise ValueError(f"--corruption-dir reads the published CIFAR-10-C / CIFAR-100-C; {info_ds.display_name} "
                         f"has none: its corruptions are generated (cached in --corruption-cache)")
    try:
        x, y = load_tensors(args.dataset, args.data_dir, args.split, args.n_ex, image_size=args.image_size,
                            download=args.download)
        n_total: Optional[int] = len(get_dataset(args.dataset, args.data_dir, args.split, image_size=args.image_size))
    except DatasetError:
        if not published:
            raise
        x = y = n_total = None  # the published set alone: no clean accuracy
        print(f"timm-edl eval: {info_ds.display_name} ({args.split}) not found: the clean accuracy is not measured",
              file=sys.stderr)
    if published:
        hwc = tuple(info_ds.input_size[1:]) + (info_ds.in_chans,)
        corrupted = open_published(info_ds.name, args.data_dir, corruptions, args.n_ex if y is None else len(y), hwc,
                                   folder=args.corruption_dir, clean_labels=None if y is None else y.numpy(),
                                   download=args.download)
        return info_ds, x, y, n_total or corrupted.n_per_severity, corrupted, corruptions, severities
    images = x.mul(255).round().clamp_(0, 255).to(torch.uint8).numpy()  # the stored pixels of in-memory data
    name = f"{info_ds.name}-{args.split}" + (f"-size{args.image_size}" if args.image_size else '')
    cache = Path(args.corruption_cache) if args.corruption_cache else cache_dir() / 'corruptions'
    corrupted = generate(images, y.numpy(), name=name, display_name=info_ds.display_name, cache=cache,
                         seed=args.seed, corruptions=corruptions,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return info_ds, x, y, n_total, corrupted, corruptions, severities
