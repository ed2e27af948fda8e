"""vLLM generation with the self-teacher, checked without vLLM: what the trainer would send it, and the errors.

vLLM needs a CUDA GPU, so here `VLLMGeneration` is replaced by a recorder that keeps what TRL's code would push to the
engine (`_iter_named_params`, the real weight-sync iterator: adapters merged under PEFT, names as vLLM expects) and
the prompts it would be asked to complete. The GPU run itself (colocate and server) is documented in docs/scaling.md.
"""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl.distributed import DistributedBackend
from trl.generation.vllm_generation import VLLMGeneration
from trl.import_utils import is_vllm_available

from tests.conftest import kv_rows, tiny_model, tiny_tokenizer
from trl_opsdl import OPSDLConfig, OPSDLTrainer
from trl_opsdl.train import main, make_parser


class RecordingVLLM(VLLMGeneration):
    """Stands in for vLLM: records each weight sync and each generation request; completes with `value 3 </s>`."""

    def __init__(self, model, accelerator, processing_class, mode, **kwargs):
        self.model, self.accelerator, self.processing_class, self.mode = model, accelerator, processing_class, mode
        self._dist = DistributedBackend(accelerator)
        self.synced, self.prompts = [], []

    def sync_weights(self):
        self.synced.append({name: param.detach().clone() for name, param in self._iter_named_params()})

    def generate(self, prompts, images, num_generations, profiler=None):
        self.prompts.extend(prompts)
        tokenizer = self.processing_class
        completion = tokenizer.convert_tokens_to_ids(["value", "3"]) + [tokenizer.eos_token_id]
        return None, [list(completion) for _ in prompts], None, None


def vllm_trainer(tmp_path, monkeypatch, **kwargs):
    monkeypatch.setattr("trl.trainer.distillation_trainer.is_vllm_available", lambda: True)
    monkeypatch.setattr("trl.trainer.distillation_trainer.VLLMGeneration", RecordingVLLM)
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = OPSDLConfig(
        output_dir=str(tmp_path), use_vllm=True, vllm_mode="colocate", max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, max_completion_length=4, report_to="none", gradient_checkpointing=False,
        save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = OPSDLTrainer(
        model, args=args, train_dataset=Dataset.from_list(kv_rows(12)), processing_class=tokenizer, **kwargs
    )
    return trainer, initial


def test_vllm_gets_the_long_prompts_and_the_merged_weights_each_step_with_lora(tmp_path, monkeypatch):
    # Colocate and server differ only inside VLLMGeneration (where the weights go); the trainer's side is the same.
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, initial = vllm_trainer(tmp_path, monkeypatch, peft_config=peft_config)
    trainer.train()
    vllm = trainer.vllm_generation
    tokenizer = trainer.processing_class

    # The student generates from the long prompts only; the short ones never reach vLLM.
    rows = trainer.train_dataset
    sent = {tokenizer.decode(ids) for ids in vllm.prompts}
    assert len(vllm.prompts) == 12 and sent <= set(rows["prompt"])
    assert not sent & set(rows["teacher_prompt"])

    # One sync per optimizer step, before its generation, under the names vLLM loads (no LoRA tensors).
    assert len(vllm.synced) == 3
    assert set(vllm.synced[0]) == set(initial)
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(vllm.synced[0][q], initial[q])  # LoRA's B starts at zero: merged == base
    assert not torch.allclose(vllm.synced[1][q], initial[q])  # then vLLM receives base + trained adapter
    down = "model.layers.0.mlp.down_proj.weight"
    for synced in vllm.synced:  # not adapted: the same frozen weights every time
        torch.testing.assert_close(synced[down], initial[down])

    # Merging for the sync and unmerging after it leaves the base weights where they were: the `base` teacher (the
    # model with its adapter disabled) is untouched.
    base = trainer.model.get_base_model()
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.base_layer.weight, initial[q], rtol=0, atol=1e-6)


def test_vllm_gets_the_trained_weights_and_the_frozen_teacher_stays_without_peft(tmp_path, monkeypatch):
    trainer, initial = vllm_trainer(tmp_path, monkeypatch)
    trainer.train()
    synced = trainer.vllm_generation.synced
    q = "model.layers.0.self_attn.q_proj.weight"
    assert len(synced) == 3
    torch.testing.assert_close(synced[0][q], initial[q])
    assert not torch.allclose(synced[2][q], initial[q])
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for name, param in teacher.named_parameters():  # the `base` teacher: a frozen copy of the initial weights
        torch.testing.assert_close(param, initial[name], rtol=0, atol=0)


def _skip_if_vllm():
    if is_vllm_available():
        pytest.skip("vLLM is installed here: the missing-vLLM errors cannot be triggered")


def test_script_with_use_vllm_and_no_vllm_fails_before_loading_the_model(tmp_path):
    _skip_if_vllm()
    data = tmp_path / "pairs.jsonl"
    Dataset.from_list(kv_rows(2)).to_json(str(data))
    # A model path that does not exist: reaching the model loading would raise another error.
    args = make_parser().parse_args_and_config(
        ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(data), "--output_dir",
         str(tmp_path), "--use_vllm", "--vllm_mode", "server", "--report_to", "none"]
    )  # fmt: skip
    with pytest.raises(ImportError, match=r"--use_vllm is set \(vllm_mode='server'\) but vLLM is not installed.*pip"):
        main(*args)


def test_trainer_with_use_vllm_and_no_vllm_says_what_to_install(tmp_path):
    # The trainer inherits TRL's check; its message names the flag and the install command.
    _skip_if_vllm()
    tokenizer = tiny_tokenizer()
    args = OPSDLConfig(output_dir=str(tmp_path), use_vllm=True, report_to="none", gradient_checkpointing=False)
    with pytest.raises(ImportError, match=r"vLLM is not available and `use_vllm` is set to True.*pip install"):
        OPSDLTrainer(tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(kv_rows(8)),
                     processing_class=tokenizer)  # fmt: skip
