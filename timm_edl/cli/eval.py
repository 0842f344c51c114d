"""``timm-edl eval``: RobustBench-style evaluation with checks against false robustness.

Example::

    timm-edl eval --model edlnet_resnet18.cifar10 --dataset cifar10 --data-dir data \\
        --threat-model Linf --eps 8/255 --n-ex 10000 --attacks autoattack,pgd \\
        --batch-size 500 --eps-sweep 0,2/255,4/255,8/255,16/255 --naive --surrogate twin --out results/

``--threat-model corruptions`` runs the common-corruptions evaluation instead
(:mod:`.eval_corruptions`): accuracy on ``<data-dir>/CIFAR-10-C`` (or corruptions generated
for other datasets) per corruption and severity.

Exit status (:mod:`timm_edl.cli.errors`): 0 done; 1 a check failed and ``--strict`` was
given; 2 a usage error (bad option, unknown model, missing data: the message says what and
how to fix it); 130 interrupted (rerun the same command: AutoAttack resumes from its state
file in ``<out>/.autoattack-state/``).
"""
import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Set

from .args import add_data_options, add_model_options, model_options
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, fail, usage_errors

__all__ = ['main', 'build_parser']

CORRUPTIONS = 'corruptions'  # the --threat-model of the common-corruptions evaluation
CORRUPTION_OPTIONS = ('corruptions', 'severities', 'corruption_dir', 'corruption_cache')


def build_parser() -> argparse.ArgumentParser:
    from ..evaluation.models import NAIVE_MODES
    p = argparse.ArgumentParser(
        prog='timm-edl eval',
        description='RobustBench-style robustness evaluation (clean, adaptive PGD, AutoAttack) of a timm / '
                    'EDLNet model, with checks that flag gradient masking and other sources of false robustness.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_options(p)
    add_data_options(p)
    g = p.add_argument_group('threat model')
    g.add_argument('--threat-model', default='Linf',
                   help="Linf, L2 or L1; or 'corruptions': accuracy under the 15 common corruptions x 5 severities "
                        "(RobustBench's third track; no attack)")
    g.add_argument('--eps', default=None,
                   help="radius, e.g. 8/255 or 0.031 (default: RobustBench's 8/255, 0.5, 12; Linf: the "
                        "dataset's default, 0.1 for Fashion-MNIST)")
    g.add_argument('--eps-sweep', default=None, metavar='EPS,EPS,...',
                   help='radii for the robustness curve (PGD on the first --check-n points), e.g. 0,2/255,4/255,8/255')
    g = p.add_argument_group('common corruptions (--threat-model corruptions)')
    g.add_argument('--corruptions', default=None, metavar='NAME,NAME',
                   help='subset of the 15 corruptions (default: all; e.g. gaussian_noise,fog)')
    g.add_argument('--severities', default=None, metavar='S,S', help="severities, e.g. 1,3 or 2-5 (default: 1-5)")
    g.add_argument('--corruption-dir', default=None,
                   help='cifar10 / cifar100: the published set (default <data-dir>/CIFAR-10-C or CIFAR-100-C)')
    g.add_argument('--corruption-cache', default=None,
                   help='other datasets: where generated corruptions are cached (default: <cache>/corruptions, '
                        'the cache being $TIMM_EDL_CACHE_DIR or ~/.cache/timm-edl)')
    g = p.add_argument_group('attacks')
    g.add_argument('--attacks', default='autoattack,pgd',
                   help='comma list of autoattack, pgd, noise (random noise in the eps-ball, no gradient); clean '
                        'always runs')
    g.add_argument('--version', default='standard', choices=('standard', 'plus', 'rand'), help='AutoAttack version')
    g.add_argument('--aa-attacks', default=None, metavar='A,B',
                   help="run AutoAttack version 'custom' with these attacks (apgd-ce, apgd-dlr, apgd-t, fab, fab-t, "
                        "square)")
    g.add_argument('--pgd-steps', type=int, default=50)
    g.add_argument('--pgd-restarts', type=int, default=1)
    g.add_argument('--pgd-step-size', default=None, help='PGD step size (default 2.5 eps / steps)')
    g.add_argument('--noise-draws', type=int, default=10,
                   help="attack 'noise': random perturbations per point (a point is robust if correct under all)")
    g.add_argument('--noise-dist', default='corners', choices=('corners', 'uniform'),
                   help="attack 'noise': corners = independent random signs times eps (Linf; L2: random direction "
                        "at radius eps); uniform = uniform in the ball (PGD's random start)")
    g.add_argument('--naive', action='store_true',
                   help='also run the naive evaluation (PGD through a surrogate that truncates the EDL solver)')
    g.add_argument('--naive-mode', default='truncate', choices=sorted(NAIVE_MODES),
                   help='; '.join(f"{k}: {v}" for k, v in NAIVE_MODES.items()))
    g.add_argument('--surrogate', default=None,
                   help="model spec for a transfer attack, or 'twin' (the conv twin built from the model's "
                        "dictionaries); default: transfer check skipped")
    g.add_argument('--surrogate-kwargs', nargs='*', default=[], metavar='KEY=VALUE')
    g.add_argument('--surrogate-arch', default=None, help='architecture of a bare surrogate weights file')
    g = p.add_argument_group('checks')
    g.add_argument('--checks', action=argparse.BooleanOptionalAction, default=True,
                   help='run the gradient-masking checks (PGD ladder, large-eps sweep point, gradient vs '
                        'finite differences); ordering and AutoAttack checks always run')
    g.add_argument('--check-n', type=int, default=100, help='points used by the PGD ladder and the eps sweep')
    g.add_argument('--grad-points', type=int, default=4, help='points of the gradient check')
    g.add_argument('--grad-dirs', type=int, default=16, help='random directions per point of the gradient check')
    g.add_argument('--tolerance', type=float, default=0.01,
                   help='slack when comparing accuracies (at least one point)')
    g.add_argument('--strict', action='store_true', help='exit with status 1 when a check fails')
    g = p.add_argument_group('run')
    g.add_argument('--batch-size', type=int, default=100)
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--device', default='auto', help="cpu, cuda, cuda:1, or auto")
    g.add_argument('--out', default='results', help='output folder')
    g.add_argument('--overwrite', action='store_true', help='replace result files of the same name')
    g.add_argument('--no-resume', action='store_true', help='ignore a saved AutoAttack state and start over')
    g.add_argument('--info', nargs='*', default=[], metavar='KEY=VALUE',
                   help='RobustBench fields: link, name, authors, venue, reported, additional_data, footnote')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        print("\ntimm-edl eval: interrupted. Rerun the same command to continue: AutoAttack resumes from its "
              f"state in {Path(args.out) / '.autoattack-state'}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _given_options(argv: List[str]) -> Set[str]:
    """The options ``argv`` gives (by ``dest``), whatever their values."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _flag(option: str) -> str:
    """The flag of an evaluation option: ``pgd_steps`` -> ``--pgd-steps``."""
    return '--' + option.replace('_', '-')


def _config(args: argparse.Namespace):
    """The :class:`~timm_edl.evaluation.EvalConfig` of the flags (the AutoAttack state and
    log paths are set once the output names are known)."""
    from ..evaluation.config import EvalConfig
    from ..threat import canonical_threat_model
    return EvalConfig(
        threat_model=canonical_threat_model(args.threat_model), eps=args.eps, attacks=args.attacks,
        version=args.version,
        aa_attacks=[a.strip() for a in args.aa_attacks.split(',') if a.strip()] if args.aa_attacks else None,
        pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts, pgd_step_size=args.pgd_step_size,
        noise_draws=args.noise_draws, noise_dist=args.noise_dist,
        batch_size=args.batch_size, seed=args.seed, device=args.device, eps_sweep=args.eps_sweep,
        naive=args.naive, naive_mode=args.naive_mode, checks=args.checks, check_n=args.check_n,
        grad_points=args.grad_points, grad_dirs=args.grad_dirs, tolerance=args.tolerance,
        progress=not args.no_progress)


def _run(args: argparse.Namespace, argv: List[str]) -> int:
    if str(args.threat_model).strip().lower() == CORRUPTIONS:
        from .eval_corruptions import run_corruptions
        return run_corruptions(args, argv, _given_options(argv), _flag)
    given = _given_options(argv) & set(CORRUPTION_OPTIONS)
    if given:
        return fail('eval', f"{', '.join(sorted(_flag(o) for o in given))}: only with --threat-model corruptions")
    from dataclasses import replace

    from ..data import DatasetError, dataset_info, get_dataset, load_tensors
    from ..evaluation.config import OptionError
    from ..evaluation.core import evaluate
    from ..evaluation.errors import EvaluationError
    from ..evaluation.models import conv_twin, load_model
    from ..evaluation.report import markdown, output_stem, reserve_stem, write_outputs
    from .args import parse_kwargs

    try:
        # everything that can be checked before loading anything heavy
        config = _config(args)
        config.resolve()
        if args.n_ex is not None and args.n_ex < 1:
            raise EvaluationError(f"--n-ex must be >= 1, got {args.n_ex}")
        model_opts = model_options(args)
        surrogate_kwargs = parse_kwargs(args.surrogate_kwargs, '--surrogate-kwargs')
        info = parse_kwargs(args.info, '--info')

        import torch
        torch.manual_seed(args.seed)  # a randomly initialised model is the same for the same --seed
        info_ds = dataset_info(args.dataset, args.data_dir, image_size=args.image_size)
        try:
            x, y = load_tensors(args.dataset, args.data_dir, args.split, args.n_ex, image_size=args.image_size,
                                    download=args.download)
        except ValueError as e:  # e.g. --n-ex larger than the split
            raise EvaluationError(str(e)) from None
        model, source = load_model(**model_opts, num_classes=info_ds.num_classes, in_chans=x.shape[1])
        surrogate, surrogate_name = None, None
        if args.surrogate:
            if args.surrogate == 'twin':  # the example forward caches every EDL layer's step size
                surrogate = conv_twin(model, example=x[:1])
                surrogate_name = "twin (conv twin from the model's dictionaries)"
            else:
                surrogate, _ = load_model(args.surrogate, model_kwargs=surrogate_kwargs, arch=args.surrogate_arch,
                                          num_classes=info_ds.num_classes, in_chans=x.shape[1],
                                          allow_pickle=args.allow_pickle)
                surrogate_name = args.surrogate
        eps_text = config.resolve(info_ds.default_eps_linf).eps_text
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = reserve_stem(out_dir, output_stem({
            'model': {'spec': args.model}, 'architecture': source['architecture'], 'dataset': info_ds.name,
            'threat_model': config.threat_model, 'eps_text': eps_text}), args.overwrite)
        state_dir = out_dir / '.autoattack-state'
        log_file = out_dir / f"{stem}.autoattack.log"
        if args.overwrite and log_file.exists():
            log_file.unlink()
        config = replace(config, state_dir=state_dir, log_file=log_file)
        if args.no_resume and state_dir.is_dir():
            for f in state_dir.glob('autoattack-*.json'):
                f.unlink()
        try:  # size of the whole split, for the "first n of N points" footnote
            n_total = len(get_dataset(args.dataset, args.data_dir, args.split, image_size=args.image_size))
        except (DatasetError, ValueError, OSError):
            n_total = None
        report = evaluate(model, x, y, config, dataset=info_ds, split=args.split, model_source=source, n_total=n_total,
                          surrogate=surrogate, surrogate_name=surrogate_name, info=info)
    except OptionError as e:
        return fail('eval', e.worded(_flag))
    except usage_errors() as e:
        return fail('eval', e)
    report['command'] = 'timm-edl eval ' + ' '.join(shlex.quote(a) for a in argv)
    report['data']['data_dir'] = None if args.data_dir is None else str(Path(args.data_dir).absolute())
    files = write_outputs(report, out_dir, overwrite=args.overwrite, stem=stem)
    if log_file.exists():
        files['autoattack_log'] = str(log_file)
        report['files'] = files
        write_outputs(report, out_dir, overwrite=True, stem=stem)
    sys.stdout.write(markdown(report, files))
    sys.stdout.flush()
    if report['failed_checks'] and args.strict:
        return fail('eval', f"FAILED CHECK ({', '.join(report['failed_checks'])}) and --strict given", EXIT_FAILED)
    return EXIT_OK


if __name__ == '__main__':
    sys.exit(main())
