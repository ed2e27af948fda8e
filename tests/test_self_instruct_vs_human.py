"""`benchmarks/self_instruct_vs_human.py`: bad arguments are one line and exit 2, before any model or data is touched."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import self_instruct_vs_human  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sides", "human,gold"], "--sides 'human,gold': use 'human', 'self_instruct'"),
        (["--sides", ""], "--sides '': use"),
        (["--base-from", "missing/base.json"], "--base-from 'missing/base.json' is not a file"),
    ],
)
def test_bad_arguments_fail_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    from trl_opsdl.demo import real

    # would fetch the model and SQuAD if the argument checks did not stop first
    monkeypatch.setattr(real, "prepare", lambda *a, **k: pytest.fail("prepared before checking the arguments"))
    with pytest.raises(SystemExit) as exit_info:
        self_instruct_vs_human.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
