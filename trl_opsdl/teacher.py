"""The self-teacher: which weights score the short prompt, how they are built (PEFT, ZeRO-3) and kept in sync.

Kinds (`OPSDLConfig.teacher_model_kind`):
- `base`: the frozen initial weights. With PEFT, the student itself with its adapters disabled (no extra memory).
  Without PEFT, a frozen copy: a deepcopy when the weights are whole, else rebuilt from the model's path (a deepcopy of
  a ZeRO-3 model copies empty shards).
- `live`: the student's current weights, under no-grad.
- `ema`: an exponential moving average of the student, updated by TRL's `SyncRefModelCallback` rule (ZeRO-3
  gathering included) at `OPSDLConfig.teacher_update_rate`. With LoRA, a second adapter on the same model; otherwise a
  frozen copy. Its weights are saved in every checkpoint (`opsdl_teacher_ema.pt`) and restored on resume, which TRL's
  callback does not do.
"""

import contextlib
import copy
import os

import torch
from accelerate.utils import is_peft_model
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models import prepare_deepspeed
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import create_model_from_path, get_config_model_id, use_adapter


EMA_ADAPTER = "opsdl_ema"
EMA_STATE_FILE = "opsdl_teacher_ema.pt"


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ZeRO-3 has already sharded the parameters (each holds a `ds_id`, its data is a stub)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def frozen_copy(model: torch.nn.Module, args, accelerator) -> torch.nn.Module:
    """A frozen copy of `model`'s current weights, prepared for the accelerator like TRL prepares a teacher."""
    if is_peft_model(model):
        model = model.get_base_model()
    if is_partitioned(model):
        path = get_config_model_id(model.config)
        if not path or not (os.path.isdir(path) or "/" in path):
            raise ValueError(
                f"The 'base' teacher needs a frozen copy of the initial weights, but the model is already sharded by "
                f"DeepSpeed ZeRO-3 (a copy would hold empty shards) and its config has no path to reload it from "
                f"(name_or_path={path!r}). Pass the model as a path or hub id (`OPSDLTrainer(model='path/or/id')`), "
                f"save it with `save_pretrained` first, or use PEFT (the base teacher is then the adapter-free model)."
            )
        init_kwargs = dict(args.model_init_kwargs or {})
        init_kwargs.setdefault("dtype", model.dtype)
        init_kwargs.setdefault("attn_implementation", model.config._attn_implementation)
        init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        init_kwargs["device_map"] = None
        teacher = create_model_from_path(path, **init_kwargs)
    else:
        teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    teacher.eval()
    if accelerator.state.deepspeed_plugin is not None:
        return prepare_deepspeed(teacher, accelerator)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def add_ema_adapter(model) -> None:
    """Give a LoRA model a second, frozen adapter that starts equal to the trained one."""
    active = model.active_adapter
    model.add_adapter(EMA_ADAPTER, model.peft_config[active])
    student, ema = _adapter_pairs(model, active)
    with torch.no_grad():
        for s, e in zip(student, ema, strict=True):
            e.copy_(s)
            e.requires_grad_(False)
    model.set_adapter(active)  # `add_adapter` may not leave the trained adapter active everywhere


def _adapter_pairs(model, active: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = dict(model.named_parameters())
    student, ema = [], []
    for name, param in params.items():
        if f".{active}." in name:
            twin = name.replace(f".{active}.", f".{EMA_ADAPTER}.")
            if twin in params:
                student.append(param)
                ema.append(params[twin])
    return student, ema


@contextlib.contextmanager
def _gathered(params: list[torch.Tensor], modifier_rank=None):
    if is_deepspeed_zero3_enabled():
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


class EMATeacher(SyncRefModelCallback):
    """Keeps the `ema` teacher at `(1 - rate) * teacher + rate * student` after every optimizer step.

    The update is TRL's `SyncRefModelCallback.sync_target_model` (which gathers ZeRO-3 shards and updates on rank 0).
    `teacher` is a separate frozen model, or `None` when the student carries the EMA as a second LoRA adapter: the
    adapter pairs are then handed to the same update as two parameter lists. OPSDL adds what TRL's callback lacks:
    the teacher's state in checkpoints, and its restoration on resume.
    """

    def __init__(self, student, teacher, update_rate: float, accelerator):
        super().__init__(ref_model=teacher, accelerator=accelerator)
        self.student, self.teacher, self.update_rate = student, teacher, update_rate
        self.resume_from: str | None = None

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student = self.accelerator.unwrap_model(self.student)
        if self.teacher is None:
            return _adapter_pairs(student, student.active_adapter)
        teacher = self.accelerator.unwrap_model(self.teacher)
        if is_peft_model(student):
            student = student.get_base_model()
        return list(student.parameters()), list(teacher.parameters())

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        # The parent reads `ref_model_sync_steps` / `ref_model_mixup_alpha` (DPO's names) and takes whole models; the
        # EMA here updates every step at its own rate, over parameter lists that may be two adapters of one model.
        student, teacher = self._pairs()
        self.sync_target_model(torch.nn.ParameterList(student), torch.nn.ParameterList(teacher), self.update_rate)

    def state_dict(self) -> list[torch.Tensor]:
        _, teacher = self._pairs()
        with _gathered(teacher):
            return [t.detach().cpu().clone() for t in teacher]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor]) -> None:
        _, teacher = self._pairs()
        if len(tensors) != len(teacher):
            raise ValueError(
                f"The EMA teacher state holds {len(tensors)} tensors but the teacher has {len(teacher)} parameters: "
                "the checkpoint comes from another model or PEFT setup. Resume with the same model and config."
            )
        with _gathered(teacher, modifier_rank=0):
            for t, saved in zip(teacher, tensors, strict=True):
                t.copy_(saved.to(t.device, t.dtype))

    def save(self, checkpoint_dir: str) -> None:
        state = self.state_dict()
        if self.accelerator.is_main_process:
            torch.save(state, os.path.join(checkpoint_dir, EMA_STATE_FILE))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resume_from is None:
            return
        path = os.path.join(self.resume_from, EMA_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming an 'ema' teacher from {self.resume_from!r}, but it has no {EMA_STATE_FILE}: the checkpoint "
                "was not written by OPSDLTrainer with teacher_model_kind='ema'. Resume from such a checkpoint, or "
                "start a new run."
            )
        self.load_state_dict(torch.load(path, map_location="cpu"))


def teacher_context(model, kind: str):
    """The context under which the student's own weights act as the teacher (PEFT base / EMA adapter)."""
    if is_peft_model(model) and kind == "base":
        return use_adapter(model, None)
    if is_peft_model(model) and kind == "ema":
        return use_adapter(model, EMA_ADAPTER)
    return contextlib.nullcontext()
