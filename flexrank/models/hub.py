"""Models named by a Hugging Face hub id (`org/name`, optional `model.revision`), used from the local HF cache.

The launching process resolves the id once (downloading what is missing unless HF_HUB_OFFLINE is set) and pins
`model.revision` to the commit it found; the processes it launches, and later `flexrank eval`/`export`, get that
commit and load its cached snapshot folder without asking the hub (a commit's snapshot never changes).
"""

import re
from pathlib import Path

from ..errors import ConfigError

# What a training run needs from a model repository: configs, tokenizer files, safetensors weights, and any
# custom modelling code (only run with model.trust_remote_code). Not the duplicate PyTorch/original checkpoints.
ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]
IGNORE = ["original/*"]
_COMMIT = re.compile(r"[0-9a-f]{40}")
_PREPARE_HINT = "fetch it where the hub is reachable: flexrank prepare --model {id}"


def is_hub_id(name: str) -> bool:
    """`org/name` as the hub spells repositories (flexrank wants the org: a bare name is more likely a typo)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """(local snapshot folder, commit) of `repo_id` at `revision` (a branch, tag or commit; default main)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    kwargs = {"revision": revision, "allow_patterns": ALLOW, "ignore_patterns": IGNORE}
    try:
        path = None
        if revision and _COMMIT.fullmatch(revision):  # a pinned commit: its cached snapshot is final
            try:
                path = snapshot_download(repo_id, local_files_only=True, **kwargs)
            except (LocalEntryNotFoundError, OSError):
                path = None
        path = Path(path or snapshot_download(repo_id, **kwargs))
    except RevisionNotFoundError:
        raise ConfigError("model.revision", revision, f"a branch, tag or commit of {repo_id}") from None
    except GatedRepoError:
        raise ConfigError("model.name_or_path", repo_id, "a hub model you have access to",
                          "gated: accept its licence on the hub and log in (hf auth login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError("model.name_or_path", repo_id, "an existing hub model id (org/name), a local folder "
                          "with config.json or a bundled model", "not found on the hub (private: log in)") from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise ConfigError("model.name_or_path", repo_id, f"a hub model in the HF cache {constants.HF_HUB_CACHE} "
                          f"at revision {revision or 'main'}",
                          f"{where} and it is not cached; {_PREPARE_HINT.format(id=repo_id)}") from None
    if not (path / "config.json").exists():
        raise ConfigError("model.name_or_path", repo_id, "a hub model repository with config.json", f"{path}")
    return path, path.name  # the cache keeps snapshots under snapshots/<commit>
