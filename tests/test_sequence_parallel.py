"""Sequence parallelism: the split student forward gives the single-rank hidden states, loss and gradients.

The reference is TRL's own `DistillationTrainer._get_last_hidden_state` on the whole (left-padded prompt, right-padded
completion) batch with its padding mask; the loss is OPSDL's full-vocabulary reverse KL on the loss positions.
"""

import json
import os
import socket
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from trl import DistillationTrainer

from trl_opsdl import loss_utils
from trl_opsdl.sequence_parallel import (
    check_sequence_parallel,
    rotation_plan,
    sp_broadcast_batch,
    sp_student_hidden_states,
)


TOLERANCE = {"atol": 2e-5, "rtol": 1e-4}


def make_model(kind="llama", num_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    if kind == "qwen2":  # biases on q/k/v
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))


def make_batch(seed=0):
    """Two rows: prompts of 5 and 9 tokens (left-padded to 9), completions of 4 and 6 (right-padded to 6): L = 15."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(1, 97, (2, 9), generator=g)
    prompt_mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    completion_ids = torch.randint(1, 97, (2, 6), generator=g)
    completion_mask = torch.tensor([[1] * 4 + [0] * 2, [1] * 6])
    teacher_ids = torch.randint(1, 97, (2, 3), generator=g)
    return {
        "input_ids": torch.cat([prompt_ids * prompt_mask, completion_ids * completion_mask], dim=1),
        "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "teacher_input_ids": torch.cat([teacher_ids, completion_ids * completion_mask], dim=1),
        "teacher_attention_mask": torch.cat([torch.ones(2, 3, dtype=torch.long), completion_mask], dim=1),
    }


def reference_hidden(model, input_ids, attention_mask, logits_to_keep):
    """TRL's single-rank student forward, called as the trainer calls it."""
    trainer = types.SimpleNamespace(model_kwarg_keys=set(), _is_vlm=False)
    return DistillationTrainer._get_last_hidden_state(trainer, model, input_ids, attention_mask, logits_to_keep)


def opsdl_loss(model, student_hidden_BKH, batch):
    """OPSDL's loss on the student hidden states: teacher on the short prompt, reverse KL on the loss positions."""
    k = batch["completion_ids"].shape[1]
    with torch.no_grad():
        teacher_hidden_BKH = reference_hidden(model, batch["teacher_input_ids"], batch["teacher_attention_mask"], k)
    valid_BK = batch["completion_mask"].bool()
    head = loss_utils.LMHead.from_model(model)
    tokens_N = batch["completion_ids"][valid_BK]
    per_token_N, *_ = loss_utils.full_logits_divergence(
        student_hidden_BKH[valid_BK], teacher_hidden_BKH[valid_BK], head, head, tokens_N, beta=1.0
    )
    return per_token_N.sum() / valid_BK.sum()


def test_rotation_plan_puts_tokens_first_and_finds_completion_states():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    plan = rotation_plan(mask, logits_to_keep=2, sp_size=4)
    ids = torch.tensor([[0, 0, 10, 11, 12, 0], [20, 21, 22, 23, 24, 25]])
    rotated = ids.gather(1, plan.gather_index_BL)
    assert rotated.tolist() == [[10, 11, 12, 0, 0, 0], [20, 21, 22, 23, 24, 25]]
    assert plan.padded_length == 8
    # TRL keeps original positions L-1-K .. L-2 = 3, 4; row 0 rotated by 2 -> 1, 2; row 1 -> 3, 4
    kept = [[plan.window_start + int(i) for i in row] for row in plan.window_index_BK]
    assert kept == [[1, 2], [3, 4]]


def test_rotation_plan_refuses_a_mask_with_gaps():
    with pytest.raises(ValueError, match="contiguous run of ones"):
        rotation_plan(torch.tensor([[1, 0, 1, 1]]), logits_to_keep=1, sp_size=2)
    with pytest.raises(ValueError, match="logits_to_keep=4"):
        rotation_plan(torch.tensor([[1, 1, 1, 1]]), logits_to_keep=4, sp_size=2)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_single_rank_rotated_forward_matches_trl(kind):
    # No communication (group=None): what is left is the rotation, the padding to the group size and the mask-free
    # causal attention, which must give TRL's masked forward on the left-padded batch.
    model = make_model(kind)
    batch = make_batch()
    k = batch["completion_ids"].shape[1]
    expected = reference_hidden(model, batch["input_ids"], batch["attention_mask"], k)
    got = sp_student_hidden_states(model, batch["input_ids"], batch["attention_mask"], k, group=None)
    # Equal at every completion token; after the end of a completion (padding, out of the loss) TRL's masked
    # attention and the causal one differ, and neither value is used.
    valid_BK = batch["completion_mask"].bool()
    torch.testing.assert_close(got[valid_BK], expected[valid_BK], **TOLERANCE)
    # the attention wrapper passes plain calls through: the model's own forward is unchanged
    torch.testing.assert_close(reference_hidden(model, batch["input_ids"], batch["attention_mask"], k), expected)


def test_single_rank_rotated_forward_with_peft_matches_trl():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = make_batch()
    k = batch["completion_ids"].shape[1]
    expected = reference_hidden(model, batch["input_ids"], batch["attention_mask"], k)
    got = sp_student_hidden_states(model, batch["input_ids"], batch["attention_mask"], k, group=None)
    valid_BK = batch["completion_mask"].bool()
    torch.testing.assert_close(got[valid_BK], expected[valid_BK], **TOLERANCE)


def test_check_sequence_parallel_refuses_what_it_cannot_serve():
    model = make_model()  # 4 heads, 2 key/value heads, sdpa
    check_sequence_parallel(model, 2, world_size=4)
    check_sequence_parallel(model, 4, world_size=4)  # 4 ranks, 2 kv heads: the kv heads are copied
    with pytest.raises(ValueError, match="does not divide the 3 processes"):
        check_sequence_parallel(model, 2, world_size=3)
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        check_sequence_parallel(model, 3, world_size=3)
    with pytest.raises(ValueError, match="must be at least 1"):
        check_sequence_parallel(model, 0, world_size=1)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        check_sequence_parallel(model, 2, world_size=2)
    sliding = make_model("qwen2")
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding-window"):
        check_sequence_parallel(sliding, 2, world_size=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    try:
        group = dist.new_group([0, 1])
        for name, kind, kv_heads, checkpointing in [
            ("llama", "llama", 2, False),
            ("llama_checkpointing", "llama", 2, True),
            ("qwen2_kv_copied", "qwen2", 1, False),  # 1 kv head, 2 ranks: the kv head is copied to both
        ]:
            model = make_model(kind, kv_heads)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
            batch = make_batch()
            k = batch["completion_ids"].shape[1]

            ref_loss = opsdl_loss(
                model, reference_hidden(model, batch["input_ids"], batch["attention_mask"], k), batch
            )
            ref_loss.backward()
            ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)

            hidden = sp_student_hidden_states(model, batch["input_ids"], batch["attention_mask"], k, group=group)
            loss = opsdl_loss(model, hidden, batch)
            loss.backward()
            # DDP / DeepSpeed average the gradients over ranks
            max_grad_diff, max_grad = 0.0, 0.0
            for n, p in model.named_parameters():
                grad = p.grad.clone()
                dist.all_reduce(grad, group=group)
                grad /= 2
                torch.testing.assert_close(grad, ref_grads[n], **TOLERANCE, msg=f"{name}: gradient of {n}")
                max_grad_diff = max(max_grad_diff, (grad - ref_grads[n]).abs().max().item())
                max_grad = max(max_grad, ref_grads[n].abs().max().item())
            torch.testing.assert_close(loss, ref_loss, **TOLERANCE)
            results[name] = {
                "loss": loss.item(),
                "reference_loss": ref_loss.item(),
                "max_abs_grad_diff": max_grad_diff,
                "max_abs_grad": max_grad,
            }

        # sp_broadcast_batch: rank 1 ends with rank 0's tensors and random state
        torch.manual_seed(100 + rank)
        mine = {"ids": torch.full((2, 3 + rank), rank), "note": f"rank {rank}"}
        got = sp_broadcast_batch(mine, group)
        assert got["ids"].tolist() == [[0, 0, 0], [0, 0, 0]] and got["note"] == "rank 0"
        draws = [torch.zeros(1) for _ in range(2)]
        dist.all_gather(draws, torch.rand(1), group=group)
        assert draws[0].item() == draws[1].item(), "the CPU random state was not shared"
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_sequence_parallel_ranks_match_one_rank(tmp_path):
    # Two gloo processes on CPU: all_to_all_single, all_reduce and broadcast are all served by gloo.
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(results) == {"llama", "llama_checkpointing", "qwen2_kv_copied"}
        for name, result in results.items():
            assert result["max_abs_grad_diff"] <= 2e-5 + 1e-4 * result["max_abs_grad"]
            print(f"rank {rank} {name}: {result}")  # seen with `pytest -s`: the numbers docs/long_context.md quotes


@pytest.mark.slow
def test_opsdl_trainer_with_two_sequence_parallel_ranks_trains_like_one_process(tmp_path):
    # OPSDLConfig(sequence_parallel_size=2) under two DDP processes on CPU (one SP group) and one process without it
    # train on the same rows (tests/sp_trainer_worker.py): same losses, same weights.
    import subprocess
    import sys

    from tests.conftest import save_tiny

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    model_dir = save_tiny(tmp_path / "model")
    worker = os.path.join(repo, "tests", "sp_trainer_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    subprocess.run([sys.executable, worker, str(tmp_path), model_dir, "1"], check=True, env=env, cwd=repo)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              os.path.join(repo, "examples", "accelerate_configs", "ddp.yaml"), "--num_processes", "2",
              "--main_process_port", str(_free_port()), worker, str(tmp_path), model_dir, "2"]  # fmt: skip
    subprocess.run(launch, check=True, env=env, cwd=repo)
    one = json.loads((tmp_path / "result_1_0.json").read_text())
    for rank in range(2):
        two = json.loads((tmp_path / f"result_2_{rank}.json").read_text())
        assert len(two["losses"]) == 2 and two["losses"][0] > 0
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-7)
        for name, value in one["weights"].items():
            torch.testing.assert_close(torch.tensor(two["weights"][name]), torch.tensor(value), rtol=1e-4, atol=1e-5)
