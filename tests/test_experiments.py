"""experiments/: the variants and ablations tried while building the demos still parse, name valid settings and run,
and their run files carry the step time split the package no longer records."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

from tests.real_fixtures import save_bpe_chat_model, write_squad


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import real_variants  # noqa: E402
import toy_variants  # noqa: E402


def test_real_variants_keep_the_recipes_of_the_research_log():
    variants = real_variants.REAL_VARIANTS
    assert {"opsdl_sampled_token_lr_3e-4", "opsdl_sampled_token_baseline", "sft_self_lr_3e-4_anchors"} <= set(variants)
    # the default recipe without a gradient through the context (an OPSDLConfig field of its own)
    assert variants["opsdl_topk_lr_3e-4_anchors_context_none"] == {
        **variants["opsdl_topk_lr_3e-4_anchors"],
        "extra": {"context_gradient": "none"},
    }


@pytest.mark.parametrize("set_name", ["compare", "ablation"])
def test_every_toy_variant_is_a_valid_demo_setting(set_name):
    """Each method names a known trainer and only `DemoConfig` fields the demo's checks accept."""
    from trl_opsdl.demo.config import DemoConfig
    from trl_opsdl.demo.toy import check_demo_config

    for name, spec in toy_variants.METHOD_SETS[set_name].items():
        spec = dict(spec)
        assert spec.pop("trainer", "opsdl") in ("opsdl", "sft_gold", "sft_self", "dpo"), name
        check_demo_config(dataclasses.replace(DemoConfig(), **spec))


def test_toy_variants_command_line(capsys):
    args, config, methods = toy_variants.parse_args(
        ["--set", "ablation", "--methods", "full_lr=1e-4", "--seeds", "1,2", "--max-steps", "7", "--no-lora"]
    )
    assert methods == {"full_lr=1e-4": toy_variants.ABLATION_METHODS["full_lr=1e-4"]} and args.seeds == [1, 2]
    assert (config.max_steps, config.lora, config.batch_size) == (7, False, 32)  # the rest: the demo's defaults
    for argv, message in (
        (["--methods", "opsdl,nope"], "--methods ['nope'] not in the set"),
        (["--eval-every", "0"], "--eval-every 0 must be at least 1"),
        (["--seeds", "a"], "'a' is not a comma-separated list of integers"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            toy_variants.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_toy_variants_bad_setting_is_one_line_before_any_work(tmp_path, capsys):
    assert toy_variants.main(["--methods", "opsdl", "--output-dir", str(tmp_path / "out"), "--max-steps", "0"]) == 2
    assert "max_steps=0 must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_variants_command_line(capsys):
    _, config, methods = real_variants.parse_args(["--quick", "--methods", "opsdl_lr_3e-4", "--train-lengths", "320"])
    assert list(methods) == ["opsdl_lr_3e-4"]
    assert (config.max_steps, config.train_lengths, config.task) == (2, (320,), "niah_single")  # --quick's steps
    assert real_variants.parse_args(["--squad", "x.json"])[1].task == "squad"  # as `trl-opsdl demo --real`
    with pytest.raises(SystemExit) as exit_info:
        real_variants.parse_args(["--methods", "nope"])
    assert exit_info.value.code == 2 and "--methods ['nope'] not in the set" in capsys.readouterr().err


@pytest.mark.slow
def test_real_variants_run_files_hold_the_step_time_split_of_opsdl_runs(tmp_path):
    model = save_bpe_chat_model(tmp_path / "tiny")
    squad = write_squad(tmp_path / "squad.json", num_articles=4, paragraphs=6)
    out = tmp_path / "cmp"
    argv = ["--quick", "--methods", "opsdl,sft_self", "--seeds", "0", "--model", model, "--task", "squad",
            "--squad", squad, "--squad-check", squad, "--output-dir", str(out)]  # fmt: skip
    assert real_variants.main(argv) == 0
    opsdl = json.loads((out / "runs" / "opsdl-seed0.json").read_text())
    split = opsdl["step_time_split"]
    assert split["steps"] == 1  # 2 steps, the first (warm-up) left out
    phases = ("generation", "teacher_forward", "student_forward_backward", "optimizer")
    assert all(split[p]["seconds"] > 0 for p in phases)
    assert sum(split[p]["share"] for p in phases) == pytest.approx(1.0, abs=0.01)
    assert opsdl["host"]["matmul_gflops_fp32"] > 0 and opsdl["host"]["torch_threads"] >= 1
    sft = json.loads((out / "runs" / "sft_self-seed0.json").read_text())
    assert sft["step_time_split"] == {} and sft["host"]["matmul_gflops_fp32"] > 0  # no OPSDL phases to time
    assert "| opsdl | 1 |" in (out / "compare.md").read_text()
