"""Uploading an exported folder to the Hugging Face Hub (huggingface_hub's ``HfApi``)."""
from pathlib import Path
from typing import Any, Optional, Union

from .export import HUB_NAMESPACE, folder_files, verify_export, version


def push(
        folder: Union[str, Path],
        repo_id: Optional[str] = None,
        *,
        token: Optional[str] = None,
        private: bool = False,
        dry_run: bool = False,
        commit_message: Optional[str] = None,
        revision: Optional[str] = None,
) -> Any:
    """Upload an exported folder to the Hub (``HfApi.create_repo`` + ``HfApi.upload_folder``).

    ``repo_id`` defaults to ``f'{HUB_NAMESPACE}/{model_name}'`` with the name recorded by
    :func:`export`.  The folder is checked first (:func:`verify_export`).  ``token``
    defaults to huggingface_hub's usual sources (``HF_TOKEN``, ``hf auth login``).
    ``dry_run=True`` touches no network and returns the ``[(path, bytes)]`` that would be
    uploaded (hidden files are never uploaded); otherwise returns the commit info.
    """
    folder = Path(folder)
    config = verify_export(folder)
    if repo_id is None:
        name = (config.get('timm_edl') or {}).get('model_name')
        if not name:
            raise ValueError(f"{folder}/config.json records no model name: pass repo_id")
        repo_id = f'{HUB_NAMESPACE}/{name}'
    from huggingface_hub.utils import validate_repo_id
    validate_repo_id(repo_id)
    files = folder_files(folder)
    if dry_run:
        return files
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled
    api = HfApi(token=token, library_name='timm-edl', library_version=version())
    message = commit_message or f"Upload {repo_id.split('/')[-1]} (timm-edl {version()})"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type='model')
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message,
                                 revision=revision, ignore_patterns=['.*', '**/.*'])
    except OfflineModeIsEnabled as e:
        raise ConnectionError(f"cannot push to {repo_id}: huggingface_hub is in offline mode "
                              f"(unset HF_HUB_OFFLINE). {e}") from e
