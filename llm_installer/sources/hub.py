"""Hugging Face Hub source: model info, config-only look-ups (for `check`) and resumable downloads.

Downloads go file by file through `huggingface_hub.hf_hub_download(local_dir=...)` into the install's
partial folder (not `snapshot_download`: see `download`): its per-file metadata in
`<local_dir>/.cache/huggingface` lets a re-run after Ctrl-C skip the files already complete, and it
retries a cut transfer with an HTTP Range request. The token and offline mode are huggingface_hub's own
(`get_token`, `constants.HF_HUB_OFFLINE`). Every failure the user
can act on (unknown repo, gated/private, unknown revision, no network) becomes one SourceError line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from llm_installer.errors import SourceError


def endpoint() -> str:
    """The Hub URL in force: HF_ENDPOINT read now, else huggingface.co. Not huggingface_hub's
    `constants.ENDPOINT`, which is read once at import: a caller (or test) may set HF_ENDPOINT later."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token() -> str | None:
    """huggingface_hub's token: HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN), else `hf auth login`'s."""
    from huggingface_hub import get_token

    return get_token()


def _is_network_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None}
    return bool(
        names
        & {
            "ConnectError",
            "ConnectTimeout",
            "ReadTimeout",
            "TimeoutException",
            "ProxyError",
            "NetworkError",
            "RemoteProtocolError",
            "ConnectionError",
            "ConnectionRefusedError",
            "OfflineModeIsEnabled",
            "LocalEntryNotFoundError",
        }
    )


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line SourceErrors that say what to do."""
    from huggingface_hub import errors as hf

    page = f"{endpoint()}/{repo_id}"
    try:
        yield
    except hf.RevisionNotFoundError:
        raise SourceError(
            f"revision {revision!r} does not exist for {repo_id} on the Hub; pass an existing branch, tag or "
            f"commit with --revision (see {page}/tree/main)"
        ) from None
    except hf.GatedRepoError:
        has = "your HF_TOKEN has no access to it" if _token() else "no HF_TOKEN is set"
        raise SourceError(
            f"{repo_id} is a gated model and {has}: accept its terms at {page}, then set HF_TOKEN to a token "
            "with access (https://huggingface.co/settings/tokens)"
        ) from None
    except hf.RepositoryNotFoundError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", 404)
        if status in (401, 403):
            has = "your HF_TOKEN has no access to it" if _token() else "no HF_TOKEN is set"
            raise SourceError(
                f"{repo_id} is private or gated on the Hub (HTTP {status}) and {has}: request access at {page} "
                "and set HF_TOKEN to a token that has it"
            ) from None
        raise SourceError(
            f"model {repo_id} was not found on the Hub (HTTP 404); check the id at {page} "
            "(or set HF_TOKEN if it is a private repository)"
        ) from None
    except hf.EntryNotFoundError as exc:
        raise SourceError(f"a file of {repo_id} is missing on the Hub ({exc}); check --revision") from None
    except hf.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise SourceError(
                f"the Hub refused access to {repo_id} (HTTP {status}); set HF_TOKEN to a token with access "
                f"and accept the model's terms at {page}"
            ) from None
        err = SourceError(
            f"the Hub answered HTTP {status} for {repo_id}; run the same install again later to resume "
            "(files already downloaded are kept)"
        )
        err.resumable = True  # type: ignore[attr-defined]
        raise err from None
    except Exception as exc:
        if _is_network_error(exc):
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                message = f"HF_HUB_OFFLINE is set, so {repo_id} cannot be downloaded; unset HF_HUB_OFFLINE"
            else:
                message = (
                    f"cannot reach the Hub at {endpoint()} to get {repo_id}; check your network or proxy "
                    "(HF_ENDPOINT, HTTPS_PROXY)"
                )
            err = SourceError(
                f"{message} and run the install again, or install from a local folder or a .gguf file "
                "(offline: llm-installer install smollm2-135m-instruct)"
            )
            err.resumable = True  # type: ignore[attr-defined]
            raise err from None
        raise


def model_info(repo_id: str, revision: str | None = None):
    """`HfApi.model_info` with file sizes (the file list `check` and file selection need)."""
    from huggingface_hub import HfApi

    with hub_errors(repo_id, revision):
        return HfApi(endpoint=endpoint(), token=_token()).model_info(
            repo_id, revision=revision, files_metadata=True
        )


def download_file(repo_id: str, filename: str, revision: str, dest: Path) -> Path:
    """One file into `dest` (the same local_dir the full download uses, so it is not fetched twice)."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, revision):
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                local_dir=str(dest),
                token=_token(),
                endpoint=endpoint(),
            )
        )


def download(
    repo_id: str, revision: str, files: list[str], dest: Path, sizes: dict[str, int] | None = None
) -> Path:
    """Download `files` of `repo_id` at `revision` (a commit sha, so all files agree) into `dest`.

    One file at a time in this thread, small files first, each with huggingface_hub's byte progress
    bar. Not `snapshot_download`'s thread pool: Ctrl-C must stop at once, and a pool waits for its
    in-flight downloads to finish first. Files already complete in `dest` (a resumed install) are
    skipped by huggingface_hub's local_dir metadata.
    """
    for filename in sorted(files, key=lambda f: ((sizes or {}).get(f, 0), f)):
        download_file(repo_id, filename, revision, dest)
    return dest
