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


def test_a_base_file_without_every_setting_is_refused_before_the_self_instruct_step(tmp_path, monkeypatch):
    from tests.real_fixtures import save_bpe_chat_model, write_squad

    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    base = tmp_path / "base.json"
    base.write_text('{"scores": {"short": {"contains": 10.0}}}')  # no long_* settings
    monkeypatch.setattr(
        self_instruct_vs_human, "self_instruct_dataset", lambda *a, **k: pytest.fail("generated before the check")
    )
    argv = ["--quick", "--model", model, "--squad", squad, "--sides", "self_instruct", "--base-from", str(base),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match=r"--base-from .* has no 'long_256' scores; drop --base-from"):
        self_instruct_vs_human.main(argv)
