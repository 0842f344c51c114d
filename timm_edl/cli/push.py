"""``timm-edl push``: upload an exported folder to the Hugging Face Hub."""
import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..hub import CONFIG_NAME, HUB_NAMESPACE, push
from .errors import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``timm-edl push``: upload an exported folder to the Hugging Face Hub."""
    p = argparse.ArgumentParser(
        prog='timm-edl push',
        description='Upload an exported folder to the Hub (token: HF_TOKEN or `hf auth login`).')
    p.add_argument('folder', help='folder written by timm-edl export / convert')
    p.add_argument('--repo-id', help=f'default: {HUB_NAMESPACE}/<model name recorded at export>')
    p.add_argument('--private', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded; no network')
    p.add_argument('--commit-message')
    p.add_argument('--revision', help='branch to push to (default: main)')
    args = p.parse_args(argv)
    return run('push', lambda: _push(args), failures=(OSError, RuntimeError))


def _push(args: argparse.Namespace) -> int:
    result = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run,
                  commit_message=args.commit_message, revision=args.revision)
    if args.dry_run:
        config = json.loads((Path(args.folder) / CONFIG_NAME).read_text(encoding='utf-8'))
        repo = args.repo_id or f"{HUB_NAMESPACE}/{config['timm_edl']['model_name']}"
        print(f"dry run: would upload to {repo}{' (private)' if args.private else ''}:")
        for rel, size in result:
            print(f"  {rel}  {size:,} bytes")
        print(f"  total {sum(s for _, s in result):,} bytes")
    else:
        print(f"pushed: {getattr(result, 'commit_url', result)}")
    return 0
