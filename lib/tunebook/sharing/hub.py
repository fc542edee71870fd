"""Uploading a finished run's models to the Hugging Face Hub (`python -m tunebook push`, and 05's last cell).

One repo per artifact, each with its model card as README.md: `--repo user/name` puts the merged model at
`user/name`, the adapter at `user/name-adapter` and each quantized copy at `user/name-<copy>` (`user/name-gguf_q8_0`:
the GGUF file, its Modelfile and card). Repos are created private unless `--public` (an existing repo keeps its
visibility), then every file goes up in one commit per repo through `huggingface_hub` (`HfApi.create_repo`,
`create_commit`: the Hub decides which files go as LFS / Xet uploads). The token is `HF_TOKEN` (or the one
`hf auth login` saved); it is never written anywhere. `HF_ENDPOINT` points the client at another Hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunebook.analysis.model_card import Artifact, artifacts, cards, run_metrics
from tunebook.errors import TunebookError
from tunebook.run.folder import Run


@dataclass
class Upload:
    """One repo's commit: the artifact, where it goes, its card and its files."""

    artifact: Artifact
    repo_id: str
    card: object  # huggingface_hub.ModelCard
    files: list[tuple[str, Path]]  # (path in the repo, local file), the card left out

    @property
    def card_bytes(self) -> bytes:
        return str(self.card).encode("utf-8")

    @property
    def size(self) -> int:
        return len(self.card_bytes) + sum(f.stat().st_size for _, f in self.files)


def repo_name(repo: str, name: str) -> str:
    """The repo of one artifact: the merged model at `repo` itself, the others at `repo-<name>`."""
    return repo if name == "merged" else f"{repo}-{name}"


def check_repo(repo: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    problem = None if "/" in repo else "it needs the namespace: user/name or organization/name"
    if problem is None:
        try:
            validate_repo_id(repo_name(repo, "adapter"))  # the longest name it stands for
        except HFValidationError as e:
            problem = str(e).rstrip(".")
    if problem:
        raise TunebookError(f"--repo {repo!r} is not a Hub repo name ({problem}). Example: --repo your-name/{repo.rsplit('/', 1)[-1] or 'my-model'}.")


def plan(run: Run, repo: str, what: list[str] | None = None, license: str | None = None) -> list[Upload]:
    """The uploads `what` names (every artifact the run has by default), each with its card for these repos."""
    check_repo(repo)
    run_metrics(run)  # a run without 04 has nothing to report: said before anything else
    available = {a.name: a for a in artifacts(run)}
    if what is None:
        what = list(available)
    if not what:
        raise TunebookError(f"--what names nothing; the run has {', '.join(available)}.")
    known = set(available)
    if run.status("03_quantize") == "complete":
        made = {v.name: v for v in run.outputs_of("03_quantize").variants}
    else:
        made = {}
    for name in what:
        if name in known:
            continue
        if name in made:
            v = made[name]
            raise TunebookError(f"--what {name}: 03 did not make it ({v.status}: {v.reason}); the run has {', '.join(available)}.")
        raise TunebookError(f"--what {name}: the run has no such model. Choose from: {', '.join(available)}.")
    repos = {name: repo_name(repo, name) for name in what}
    return [Upload(a, repos[a.name], card, a.files()) for a, card in cards(run, list(dict.fromkeys(what)), repos=repos, license=license)]


def human_size(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def describe(uploads: list[Upload]) -> str:
    """Each repo with its files and sizes: what a dry run prints."""
    lines = []
    for u in uploads:
        lines.append(f"{u.repo_id}  ({u.artifact.name}, {u.artifact.library}): {len(u.files) + 1} files, {human_size(u.size)}")
        width = max(len(p) for p, _ in [("README.md", None), *u.files])
        lines.append(f"    {'README.md':<{width}}  {human_size(len(u.card_bytes)):>10}  (model card)")
        lines += [f"    {p:<{width}}  {human_size(f.stat().st_size):>10}" for p, f in u.files]
    lines.append(f"In all: {sum(len(u.files) + 1 for u in uploads)} files, {human_size(sum(u.size for u in uploads))}.")
    return "\n".join(lines)


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()  # HF_TOKEN, else the token `hf auth login` saved
    if not token:
        raise TunebookError(
            "No Hugging Face token: set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens), "
            "or log in once with `hf auth login`. Nothing was uploaded; --dry-run lists what would be, without a token."
        )
    return token


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_error(e: Exception, doing: str, pushed: list[str] = ()) -> TunebookError | None:
    """One message for what the Hub (or the way to it) said while `doing`, with what was pushed before; None for an
    error that is not the Hub's."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    where = endpoint()
    done = f"Pushed before that: {', '.join(pushed)}; pushing again updates those repos." if pushed else "Nothing was uploaded."
    if isinstance(e, OfflineModeIsEnabled):
        return TunebookError(f"The Hugging Face Hub cannot be reached: HF_HUB_OFFLINE is set ({doing}). {done}")
    if isinstance(e, httpx.TransportError) or isinstance(getattr(e, "__cause__", None), httpx.TransportError):
        reason = str(e.__cause__ if not isinstance(e, httpx.TransportError) else e) or type(e).__name__
        return TunebookError(
            f"The Hugging Face Hub cannot be reached at {where} ({reason.splitlines()[0]}) while {doing}. {done} Check the network or HF_ENDPOINT."
        )
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        said = str(e).splitlines()[0]
        if status == 401:
            return TunebookError(f"The Hub at {where} refused the token (401 Unauthorized) while {doing}: check HF_TOKEN. {done} The Hub said: {said}")
        if status == 403:
            return TunebookError(
                f"The token may not write there (403 Forbidden) while {doing}: use a write token, or a namespace you own. {done} The Hub said: {said}"
            )
        return TunebookError(f"The Hub at {where} answered {status} while {doing}. {done} The Hub said: {said}")
    return None


def push(
    run_dir: str | Path, repo: str, what: list[str] | None = None, *, dry_run: bool = False, public: bool = False, license: str | None = None
) -> list[Upload]:
    """Upload the run's artifacts (see the module docstring); with dry_run, only print what would go where."""
    run = Run.load(run_dir) if (Path(run_dir) / "params.yaml").is_file() else None
    if run is None:
        raise TunebookError(f"{run_dir} is not a run folder (no params.yaml): give a folder like outputs/<run>.")
    uploads = plan(run, repo, what, license)
    visibility = "public" if public else "private"
    if dry_run:
        print(f"Dry run: nothing is uploaded. `push` would create {len(uploads)} {visibility} repo(s) on {endpoint()}:")
        print(describe(uploads))
        return uploads
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=hub_token())
    pushed: list[str] = []
    user = _call("checking the token", pushed, api.whoami)
    print(f"Pushing run {run.params.run_name} to {endpoint()} as {user.get('name', '?')}: {len(uploads)} {visibility} repo(s).", flush=True)
    for u in uploads:
        u.artifact.card_path.write_text(str(u.card), encoding="utf-8")  # the run keeps the card it pushed
        url = _call(f"creating {u.repo_id}", pushed, api.create_repo, u.repo_id, private=not public, exist_ok=True)
        operations = [CommitOperationAdd("README.md", str(u.artifact.card_path))]
        operations += [CommitOperationAdd(path, str(local)) for path, local in u.files]
        message = f"tunebook run {run.params.run_name}: {u.artifact.name}"
        commit = _call(f"uploading {u.artifact.name} to {u.repo_id}", pushed, api.create_commit, u.repo_id, operations, commit_message=message)
        print(f"  {u.artifact.name:<18} -> {url}  ({len(operations)} files, {human_size(u.size)}; commit {commit.oid[:10]})", flush=True)
        pushed.append(u.repo_id)
    return uploads


def _call(doing: str, pushed: list[str], action, *args, **kwargs):
    """action(*args, **kwargs), with what the Hub says turned into one message naming what was being done."""
    try:
        return action(*args, **kwargs)
    except Exception as e:
        error = hub_error(e, doing, pushed)
        if error is None:
            raise
        raise error from None
