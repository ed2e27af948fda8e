"""Two processes on CPU (gloo) under `accelerate launch`: DDP, ZeRO-2 and ZeRO-3 train like one process.

One launch per layout trains every teacher kind in turn (`tests/dist_worker.py`), with the configs users launch
(`examples/accelerate_configs/`; on CPU: `--mixed_precision no`, DDP with `ACCELERATE_USE_CPU=1`, ZeRO-3 with
`stage3_param_persistence_threshold: 0` so the tiny model is really partitioned). The reference is the same cases in
this process with one process and the same global batch of 4 rows. Generation is greedy, so both see the same
completions, and the loss is normalized by the global token count, so the two layouts compute the same number.

Tolerance: the logged losses of the first two steps agree within rtol=2e-5 (seen: <= 6e-7; only the order of the
float reductions differs), the weights saved after two steps within atol=1e-5 (seen: <= 5e-7, on weights up to ~2).
A wrong normalization (x2 per rank), a teacher built from empty ZeRO-3 shards or a missed gradient reduction moves
step 1 or step 2 by far more (two SGD steps at lr 0.1 move each weight tensor by 4e-4 to 0.18 at most, median 7e-3).

The first DeepSpeed launch on a fresh machine compiles DeepSpeed's CPU communication op (~65 s, needs ninja); each
launch then takes ~30 s on two cores.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_worker import CASES, run_case, save_models


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "accelerate_configs"
OPSDL_CASES = ["base_peft", "base", "live", "ema", "ema_peft", "base_peft_context_none", "ema_context_none"]
LAUNCH_CASES = ["distill", *OPSDL_CASES]  # `distill` (TRL's own DistillationTrainer) checks the harness itself
LAYOUTS = {  # name -> (config file, extra environment, zero stage)
    "ddp": ("ddp.yaml", {"ACCELERATE_USE_CPU": "1"}, None),
    "zero2": ("zero2.yaml", {}, 2),
    "zero3": ("zero3.yaml", {}, 3),
}
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("single"))
    return out_dir, {name: run_case(name, model_dir, out_dir, num_processes=1) for name in LAUNCH_CASES}


def _launch(layout: str, model_dir: str, out_dir: str) -> dict:
    config, env_extra, _ = LAYOUTS[layout]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / config), "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()),
        str(REPO / "tests" / "dist_worker.py"),
        "--model_dir", model_dir, "--out_dir", out_dir, "--cases", ",".join(LAUNCH_CASES),
    ]  # fmt: skip
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        pytest.fail(
            f"accelerate launch ({layout}) exited with {run.returncode}:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
        )
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def _saved_weights(case_dir: str) -> dict:
    folder = os.path.join(case_dir, "model")
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(folder, "adapter_model.safetensors")) else None
    return load_file(os.path.join(folder, name or "model.safetensors"))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_processes_match_one(layout, model_dir, reference, tmp_path):
    ref_dir, ref = reference
    results = _launch(layout, model_dir, str(tmp_path))
    _, _, zero_stage = LAYOUTS[layout]
    for name in LAUNCH_CASES:
        got, want = results[name], ref[name]
        assert got["num_processes"] == 2, f"{layout}/{name}: the launch did not start two processes: {got}"
        assert got["zero_stage"] == zero_stage, f"{layout}/{name}: {got}"
        if zero_stage == 3:
            assert got["partitioned"], f"{layout}/{name}: ZeRO-3 left some parameters whole: the test proves nothing"
        assert len(got["losses"]) == len(want["losses"]) == 2
        message = f"{layout}/{name}: losses {got['losses']} with two processes, {want['losses']} with one"
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=2e-5, atol=1e-6, msg=message
        )

        # Saving gathers full weights (under ZeRO-3: `zero3_save_16bit_model: true` in zero3.yaml), equal to the
        # weights one process reaches after the same two steps.
        saved, expected = _saved_weights(os.path.join(tmp_path, name)), _saved_weights(os.path.join(ref_dir, name))
        assert saved.keys() == expected.keys(), f"{layout}/{name}: saved {sorted(saved)[:5]}..."
        for key, tensor in expected.items():
            assert saved[key].shape == tensor.shape and saved[key].numel() > 0, f"{layout}/{name}: {key} not full"
            torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-5, msg=f"{layout}/{name}: {key}")
        if not CASES[name][2]:  # a full model: every parameter of the architecture is there
            assert len(saved) == 21  # 2 layers x 9 tensors + embeddings + final norm + lm_head
