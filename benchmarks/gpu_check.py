"""One prepared GPU check of trl_opsdl: the CUDA loss paths, memory against the planner, and throughput at 7B shape.

Run on the GPU machine through `benchmarks/gpu_check.sh` (it installs the carried wheels first); on a CPU,
`--tiny --device cpu` runs the same code at toy shapes, so the script cannot rot between GPU runs (CI does this,
`tests/test_gpu_check.py`).

    bash benchmarks/gpu_check.sh                                   # GPU machine: everything, within 8 minutes
    python benchmarks/gpu_check.py --device cuda --out OUT_DIR     # the same, with the packages already installed
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gpu_check   # toy shapes on the CPU (~45 s)
    python benchmarks/gpu_check.py --table OUT_DIR/gpu_check.json  # print the table of a (possibly cut-off) run

Checks, in the order they run (each guarded: one failure still records the others):

  parity/<mode>/<path>/<dtype>   each loss mode on the hidden states and `lm_head` of a 7B-shaped step (4160
                 positions, hidden 3584, vocabulary 152064, so TRL's 4096 x 32768 tiles have remainders), fp32 and
                 bf16 inputs, against a float64 reference on the same (rounded) inputs: per-token values, entropy and
                 the gradients of the hidden states and the head, as ||out - ref|| / ||ref||. NaN never passes.
                 `full_logits/trl_kernel` is TRL's `ChunkedDivergenceFunction` (Triton on CUDA, the trainer's path
                 there), `full_logits/fused_torch` is `loss_utils.FusedReverseKL` (the trainer's path on CPU).
  loss_memory/<N>x<V>            peak memory of the fused `full_logits` loss (forward + backward) against a naive
                 full-logits reverse KL on the same inputs, and against the planner's "chunked loss" figure.
  setup/model                    the Qwen2.5-7B-shaped model (examples/recipes/configs/qwen2.5-7b, random weights,
                 bf16, built on the GPU) with LoRA r=16 on every projection.
  generation/<L>                 HF generate on an L-token prompt: prefill and decode tokens/s, peak memory against
                 the planner's generation phase.
  opsdl_step/<L>/<policy>/<attn> `OPSDLTrainer` steps at L prompt tokens (completion 256, teacher prompt L/8,
                 `base` teacher = the adapter-free model), checkpointing none / full / selective: peak memory per
                 phase against `trl-opsdl plan`'s prediction for the same run, and training tokens/s against TRL's
                 `SFTTrainer` on the same sequences (same model, same LoRA, same checkpointing). Generation runs once
                 per length (its time and memory are reported apart); every later step reuses its completion.

Results go to OUT/gpu_check.json after every check (an interrupted run keeps what it measured) and a Markdown table
to OUT/gpu_check.md; the table is printed last. A global time guard skips the checks that would not finish in the
budget (`--budget-s`). Exit code: 0 if nothing failed or broke, 1 otherwise.

The trl_opsdl names used, and nothing else of it: `trl_opsdl.OPSDLConfig`, `trl_opsdl.OPSDLTrainer`,
`trl_opsdl.loss_utils` (`LMHead`, `full_logits_divergence`, `chunked_divergence`, `sampled_token_logprobs`,
`sampled_token_surrogate`) and the planner (`trl_opsdl.planner`: `RunShape`, `estimate`, `model_shape_from_config`,
used in `planner_estimate` only). Nothing is imported from tests/.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
CONFIG_7B = REPO / "examples" / "recipes" / "configs" / "qwen2.5-7b"
GIB = 2**30
STATUSES = ("pass", "fail", "error", "skipped")
GROUPS = ("parity", "loss_memory", "setup", "generation", "opsdl_step")
LOSS_MODES = ("full_logits/trl_kernel", "full_logits/fused_torch", "topk_logits/chunked", "sampled_token/trl_kernel")
# ||out - ref|| / ||ref|| allowed per input dtype. The fp32 bound is tight enough to catch TF32 matmuls (~5e-4 on
# logits); bf16 inputs are upcast inside every path, so only the bf16 gradients returned add rounding (~2e-3).
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
# `topk_logits` picks the student's k most likely tokens: a row whose k-th and (k+1)-th float64 log-probabilities lie
# closer than this can pick either in float32 (on the H100, one row of 4160 did: 1.7e-3 relative error). Such rows
# are left out of both sides of the comparison (their weight in the loss is 0) and counted.
TOP_K_TIE_GAP = 1e-4
TOP_K_TIES_ALLOWED = 0.01  # share of rows
MEMORY_TOLERANCE = 0.15  # measured / planned - 1, either way
THROUGHPUT_GOAL = 0.9  # OPSDL training tokens/s over SFTTrainer's on the same sequences
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3; every other id is the word f"w{id}"


@dataclass(frozen=True)
class Shapes:
    """Sizes of every check: the GPU run's, or toy ones for the CPU (`--tiny`)."""

    parity_positions: int
    parity_hidden: int
    parity_vocab: int
    top_k: int
    loss_memory_cases: tuple  # (positions, vocabulary) pairs
    loss_memory_hidden: int
    model_overrides: dict  # over examples/recipes/configs/qwen2.5-7b/config.json
    lengths: tuple  # prompt tokens of the trainer steps
    completion_length: int
    steps: dict  # length -> optimizer steps per trainer (the first is a warm-up)
    generation_length: int
    generation_new_tokens: int
    budget_s: float
    # seconds each check is expected to take, for the time guard
    estimates: dict = field(default_factory=dict)


GPU_SHAPES = Shapes(
    parity_positions=4160,
    parity_hidden=3584,
    parity_vocab=152064,
    top_k=20,
    loss_memory_cases=((4096, 32000), (16384, 32000), (4096, 152064)),
    loss_memory_hidden=3584,
    model_overrides={},
    lengths=(8192, 32768),
    completion_length=256,
    steps={8192: 3, 32768: 2},
    generation_length=32768,
    generation_new_tokens=128,
    budget_s=420,
    estimates={"parity": 15, "loss_memory": 8, "setup": 40, "generation": 30, 8192: 40, 32768: 80},
)
TINY_SHAPES = Shapes(
    parity_positions=72,
    parity_hidden=32,
    parity_vocab=300,
    top_k=20,
    loss_memory_cases=((48, 320), (96, 320)),
    loss_memory_hidden=32,
    model_overrides=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
    ),  # fmt: skip
    lengths=(64, 256),
    completion_length=8,
    steps={64: 2, 256: 2},
    generation_length=256,
    generation_new_tokens=8,
    budget_s=300,
    estimates={"parity": 2, "loss_memory": 1, "setup": 2, "generation": 2, 64: 5, 256: 5},
)


# ---- small helpers ----------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def at_most(x, bound) -> bool:
    """`x <= bound` that is False for NaN/inf (a bare `nan <= bound` is False too, but `not nan > bound` is True)."""
    return finite(x) and x <= bound


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; NaN if either holds a NaN or an inf, or the shapes differ."""
    import torch

    if out is None or ref is None or tuple(out.shape) != tuple(ref.shape):
        return float("nan")
    out64, ref64 = out.detach().double(), ref.detach().double().to(out.device)
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return float("nan")
    denominator = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denominator if denominator > 0 else 1.0)


def gib(value):
    return None if value is None else value / GIB


def rounded(value, digits=4):
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


class Device:
    """Synchronization, peak memory and cleanup. On CUDA the memory is the caching allocator's (tensor bytes); on a
    CPU it is the process's resident set (VmRSS, peak VmHWM reset through /proc/self/clear_refs), so the same
    arithmetic runs in the CPU test, but CPU figures are never judged against the planner."""

    def __init__(self, name: str):
        import torch

        self.name = name
        self.torch = torch
        self.cuda = name == "cuda"
        self.memory_source = "cuda allocator" if self.cuda else ("rss" if self._status_bytes("VmRSS") else None)

    @staticmethod
    def _status_bytes(field_name):
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")

    def allocated(self):
        return self.torch.cuda.memory_allocated() if self.cuda else self._status_bytes("VmRSS")

    def peak(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return self._status_bytes("VmHWM")

    def peak_reserved(self):
        return self.torch.cuda.max_memory_reserved() if self.cuda else None

    def total_memory(self):
        return self.torch.cuda.get_device_properties(0).total_memory if self.cuda else None

    def cleanup(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def timer(self):
        self.sync()
        return time.perf_counter()


# ---- the results file, the time guard, one guarded check at a time -------------------------------------------------


class Results:
    def __init__(self, out_dir: Path, budget_s: float, meta: dict):
        self.out_dir = out_dir
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.interrupted = False
        self.record = {"schema": 1, "started": now_iso(), "finished": None, "budget_s": budget_s, **meta}
        self.record["checks"] = []
        self.write()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, check_id, group, status, seconds=0.0, figures=None, criteria=None, note=""):
        entry = {
            "id": check_id,
            "group": group,
            "status": status,
            "seconds": round(seconds, 2),
            "figures": rounded(figures or {}),
            "criteria": criteria or {},
            "note": note,
        }
        self.record["checks"].append(entry)
        self.write()
        print(f"[{time.monotonic() - self.start:6.1f}s] {status.upper():7s} {check_id}  {note}", flush=True)
        return entry

    def run(self, check_id, group, estimate_s, fn, *args, device=None, **kwargs):
        """Run `fn` (returning figures, criteria and a note) under the guards; returns its raw output or None."""
        if self.interrupted:
            self.add(check_id, group, "skipped", note="run interrupted")
            return None
        if self.remaining() < estimate_s:
            self.add(
                check_id,
                group,
                "skipped",
                note=f"time guard: ~{estimate_s:.0f} s needed, {self.remaining():.0f} s left",
            )
            return None
        t0 = time.monotonic()
        try:
            out = fn(*args, **kwargs)
        except KeyboardInterrupt:
            self.interrupted = True
            self.add(check_id, group, "error", time.monotonic() - t0, note="interrupted (hard time limit?)")
            return None
        except Exception as error:  # noqa: BLE001 - one failure must not stop the others
            kind = type(error).__name__
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
            tail = "".join(traceback.format_exception(error)[-3:])[-1500:]
            self.add(
                check_id, group, "error", time.monotonic() - t0, figures={"traceback": tail}, note=f"{kind}: {text}"
            )
            return None
        finally:
            if device is not None:
                device.cleanup()
        figures, criteria, note = out.get("figures", {}), out.get("criteria", {}), out.get("note", "")
        status = "fail" if any(v is False for v in criteria.values()) else "pass"
        self.add(check_id, group, status, time.monotonic() - t0, figures, criteria, note)
        return out

    def skip(self, check_id, group, note):
        self.add(check_id, group, "skipped", note=note)

    def finish(self):
        self.record["finished"] = now_iso()
        self.record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        summary = {}
        for entry in self.record["checks"]:
            counts = summary.setdefault(entry["group"], dict.fromkeys(STATUSES, 0))
            counts[entry["status"]] += 1
        self.record["summary"] = summary
        self.write()
        (self.out_dir / "gpu_check.md").write_text(format_table(self.record) + "\n")

    def write(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)  # a run killed mid-write still leaves the previous complete file


# ---- the environment ------------------------------------------------------------------------------------------------


def distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(dists=("trl", "datasets", "peft", "transformers", "accelerate")) -> list:
    """Requirements of the given installed distributions that the environment does not meet (the carried wheels are
    installed with --no-deps, so this is the only place a version clash shows before it breaks something)."""
    from packaging.requirements import Requirement

    problems = []
    for dist in dists:
        try:
            requirements = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist}: not installed")
            continue
        for line in requirements:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            installed = distribution_version(requirement.name)
            if installed is None:
                problems.append(f"{dist} needs {requirement}: not installed")
            elif not requirement.specifier.contains(installed, prereleases=True):
                problems.append(f"{dist} needs {requirement}: found {installed}")
    return problems


def environment(device_name: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: distribution_version(name)
            for name in ("torch", "triton", "transformers", "trl", "peft", "datasets", "accelerate", "flash_attn")
        },
        "unmet_requirements": unmet_requirements(),
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    if device_name == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        }
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# ---- the planner (the one place its names are used) -------------------------------------------------------------


def planner_estimate(config, context_length, completion_length, gradient_checkpointing, dtype, device, gpu_gib,
                     lora_rank=16, context_gradient="full", checkpointing_policy="full",
                     generation="gathered"):  # fmt: skip
    """`trl-opsdl plan`'s per-GPU estimate for one GPU, no DeepSpeed, batch 1, `base` teacher: the phase peaks and the
    components, in bytes."""
    from trl_opsdl import planner

    shape = planner.model_shape_from_config(config, name="gpu-check model")
    run = planner.RunShape(
        context_length=context_length,
        completion_length=completion_length,
        num_gpus=1,
        gpu_memory_gib=gpu_gib,
        zero_stage=0,
        lora_rank=lora_rank,
        gradient_checkpointing=gradient_checkpointing,
        activation_checkpointing_policy=checkpointing_policy,
        dtype=dtype,
        device=device,
        teacher_kind="base",
        context_gradient=context_gradient,
        generation=generation,
    )
    plan = planner.estimate(shape, run)
    return {
        "phases": dict(plan.phases),
        "components": dict(plan.components),
        "peak": plan.peak,
        "reserve": plan.reserve,
    }


def planned_first_generation(plan):
    """The planner's generation phase is a steady-state step's, with the optimizer states (and LoRA's gradients)
    allocated; the checks measure generation before the first optimizer step, when neither exists yet."""
    components = plan["components"]
    return plan["phases"]["generation"] - components["optimizer states"] - components["gradients"]


def memory_verdict(measured, planned, judge=True):
    """measured / planned, and whether it is within MEMORY_TOLERANCE (None where nothing was measured, or where the
    measurement is not the allocator's: `judge=False`)."""
    if measured is None or not planned:
        return None, None
    ratio = measured / planned
    return ratio, (abs(ratio - 1) <= MEMORY_TOLERANCE) if judge else None


# ---- (a) loss parity ------------------------------------------------------------------------------------------------


def parity_inputs(shapes, dtype, device_name, seed):
    """Fresh random hidden states and a head whose logits have std ~3 (peaked, like a trained model's); the teacher's
    hidden states are the student's plus noise, so the reverse KL is ~1 nat per token, far from cancellation."""
    import torch

    generator = torch.Generator(device=device_name).manual_seed(seed)
    n, h, v = shapes.parity_positions, shapes.parity_hidden, shapes.parity_vocab
    hidden = torch.randn(n, h, device=device_name, generator=generator)
    teacher = hidden + 0.5 * torch.randn(n, h, device=device_name, generator=generator)
    weight = torch.randn(v, h, device=device_name, generator=generator) * (3.0 / math.sqrt(h))
    tokens = torch.randint(0, v, (n,), device=device_name, generator=generator)
    return hidden.to(dtype), teacher.to(dtype), weight.to(dtype), tokens


def parity_reference(mode, student_hidden, teacher_hidden, weight, tokens, top_k, chunk=256):
    """The loss written plainly in float64 on the same (already rounded) inputs, `chunk` positions at a time so the
    (N, V) float64 logits never exist at once; autograd gives the gradients. Returns (values, grads, row_weights):
    the weights are 1, or 0 for a `topk_logits` row whose top-k boundary is a tie (`TOP_K_TIE_GAP`), and the loss
    whose gradients are compared is the weighted mean."""
    import torch

    n = student_hidden.shape[0]
    hidden64 = student_hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    teacher64, teacher_weight64 = teacher_hidden.detach().double(), weight.detach().double()
    parts, row_weights = {}, []
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        s_logp = torch.log_softmax(hidden64[rows] @ weight64.T, dim=-1)
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher64[rows] @ teacher_weight64.T, dim=-1)
        out = {"entropy": -(s_logp.exp() * s_logp).sum(-1)}
        if mode.startswith("full_logits"):
            terms = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
            out["divergence"] = terms
        elif mode.startswith("topk_logits"):
            best = s_logp.detach().topk(top_k + 1, dim=-1)
            top = best.indices[:, :top_k]  # the student's top-k, a tail bucket for the rest
            weights = (best.values[:, top_k - 1] - best.values[:, top_k] >= TOP_K_TIE_GAP).double()
            s_k, t_k = s_logp.gather(-1, top), t_logp.gather(-1, top)
            s_b = torch.cat([s_k, torch.log1p(-s_k.exp().sum(-1, keepdim=True))], dim=-1)
            t_b = torch.cat([t_k, torch.log1p(-t_k.exp().sum(-1, keepdim=True))], dim=-1)
            terms = (s_b.exp() * (s_b - t_b)).sum(-1)
            out["divergence"] = terms
        else:  # sampled_token: the policy-gradient surrogate, advantage = log p_t(y) - log p_s(y) held constant
            s_tok = s_logp.gather(-1, tokens[rows, None])[:, 0]
            t_tok = t_logp.gather(-1, tokens[rows, None])[:, 0]
            terms = -(t_tok - s_tok).detach() * s_tok
            out["student_logprob"], out["teacher_logprob"] = s_tok, t_tok
        if not mode.startswith("topk_logits"):
            weights = torch.ones_like(terms)
        row_weights.append(weights)
        ((terms * weights).sum() / n).backward()
        for key, value in out.items():
            parts.setdefault(key, []).append(value.detach())
    values = {key: torch.cat(chunks) for key, chunks in parts.items()}
    return values, {"grad_hidden": hidden64.grad, "grad_weight": weight64.grad}, torch.cat(row_weights)


def parity_path(mode, student_hidden, teacher_hidden, weight, tokens, top_k, row_weights=None):
    """The project's loss path for `mode`, as the trainer calls it, its backward from the `row_weights`-weighted mean
    (all ones by default); returns (values, grads)."""
    import torch

    from trl_opsdl import loss_utils

    hidden = student_hidden.detach().clone().requires_grad_()
    head_weight = weight.detach().clone().requires_grad_()  # a trainable head (full fine-tuning)
    student_head = loss_utils.LMHead(head_weight)
    teacher_head = loss_utils.LMHead(head_weight.detach())  # the self-teacher's head: the same weights, no gradient
    n = hidden.shape[0]
    if mode.startswith("full_logits"):
        use_kernel = mode.endswith("trl_kernel")
        divergence, entropy, *_ = loss_utils.full_logits_divergence(
            hidden, teacher_hidden, student_head, teacher_head, tokens, beta=1.0, temperature=1.0,
            use_kernel=use_kernel,
        )  # fmt: skip
        values, terms = {"divergence": divergence, "entropy": entropy}, divergence
    elif mode.startswith("topk_logits"):
        divergence, entropy, _, _ = loss_utils.chunked_divergence(
            hidden, teacher_hidden, student_head, teacher_head, tokens, top_k=top_k
        )
        values, terms = {"divergence": divergence, "entropy": entropy}, divergence
    else:
        student_logp, entropy = loss_utils.sampled_token_logprobs(hidden, student_head, tokens)
        with torch.no_grad():
            teacher_logp, _ = loss_utils.sampled_token_logprobs(teacher_hidden, teacher_head, tokens)
        terms = loss_utils.sampled_token_surrogate(student_logp, teacher_logp)
        values = {"student_logprob": student_logp, "teacher_logprob": teacher_logp, "entropy": entropy}
    weights = torch.ones_like(terms) if row_weights is None else row_weights.to(terms.dtype)
    ((terms * weights).sum() / n).backward()
    return {k: v.detach() for k, v in values.items()}, {"grad_hidden": hidden.grad, "grad_weight": head_weight.grad}


def parity_check(mode, dtype_name, shapes, device, seed, inject=None):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    student_hidden, teacher_hidden, weight, tokens = parity_inputs(shapes, dtype, device.name, seed)
    t0 = device.timer()
    ref_values, ref_grads, row_weights = parity_reference(
        mode, student_hidden, teacher_hidden, weight, tokens, shapes.top_k
    )
    ref_s = device.timer() - t0
    if inject == "wrong_reference":  # a reference off by 5%: the comparison must notice
        ref_values = {k: v * 1.05 for k, v in ref_values.items()}
        ref_grads = {k: v * 1.05 for k, v in ref_grads.items()}
    if inject == "nan":  # one NaN in the path's input: it must never pass
        student_hidden = student_hidden.clone()
        student_hidden[0, 0] = float("nan")
    t0 = device.timer()
    values, grads = parity_path(mode, student_hidden, teacher_hidden, weight, tokens, shapes.top_k, row_weights)
    path_s = device.timer() - t0  # the first call: includes Triton's compilation where it compiles
    tolerance = TOLERANCE[dtype_name]
    figures = {"positions": shapes.parity_positions, "hidden": shapes.parity_hidden, "vocab": shapes.parity_vocab,
               "tolerance": tolerance}  # fmt: skip
    criteria = {}
    kept = row_weights > 0  # the per-row values of a top-k boundary tie are compared on neither side
    for name, ref in {**ref_values, **ref_grads}.items():
        out = values.get(name, grads.get(name))
        if name in ref_values:
            out, ref = out[kept.to(out.device)], ref[kept.to(ref.device)]
        error = rel_err(out, ref)
        figures[f"{name}_rel_err"] = error
        criteria[f"{name} rel err <= {tolerance:g}"] = at_most(error, tolerance)
    outputs = [*values.values(), *(g for g in grads.values() if g is not None)]
    criteria["outputs finite"] = all(bool(torch.isfinite(t).all()) for t in outputs)
    criteria["every gradient computed"] = all(g is not None for g in grads.values())
    if mode.startswith("topk_logits"):
        ties = int((~kept).sum())
        figures["top_k_boundary_ties"] = ties
        criteria[f"top-k boundary ties <= {TOP_K_TIES_ALLOWED:.0%} of rows"] = ties <= TOP_K_TIES_ALLOWED * len(kept)
    figures.update({"path_first_call_s": path_s, "reference_s": ref_s})
    if mode.startswith("full_logits"):  # full_logits_divergence(use_kernel=None) takes TRL's kernel on CUDA
        figures["trainer_path_on_this_device"] = mode.endswith("trl_kernel") == device.cuda
    worst = max((v for k, v in figures.items() if k.endswith("_rel_err")), key=lambda v: (not finite(v), v))
    note = f"worst rel err {worst:.2e} (tol {tolerance:g})" + (f", injected {inject}" if inject else "")
    return {"figures": figures, "criteria": criteria, "note": note}


def chunking_speed_check(shapes, device, seed):
    """The plain-torch loss path (`topk_logits`) with CPU-sized chunks (8 MiB of logits) against the device's
    default (128 MiB on CUDA): seconds per forward + backward, warmed up, and that both give the same values.
    Informational: on the first H100 run this path took 3-5 s for 4160 positions."""
    import torch

    from trl_opsdl import loss_utils

    student_hidden, teacher_hidden, weight, tokens = parity_inputs(shapes, torch.bfloat16, device.name, seed)
    head = loss_utils.LMHead(weight)
    sizes = {"cpu_chunks": loss_utils.positions_per_chunk(shapes.parity_vocab, "cpu"),
             "device_chunks": loss_utils.positions_per_chunk(shapes.parity_vocab, "cuda" if device.cuda else "cpu")}  # fmt: skip
    figures, values = {"top_k": shapes.top_k}, {}
    for name, chunk in sizes.items():
        timings = []
        for _ in range(3):  # the first is the warm-up
            hidden = student_hidden.detach().clone().requires_grad_()
            device.sync()
            t0 = device.timer()
            divergence, *_ = loss_utils.chunked_divergence(
                hidden, teacher_hidden, head, loss_utils.LMHead(weight.detach()), tokens, top_k=shapes.top_k,
                chunk_size=chunk,
            )  # fmt: skip
            divergence.sum().backward()
            device.sync()
            timings.append(device.timer() - t0)
        values[name] = divergence.detach().float()
        figures[f"{name}_positions"] = chunk
        figures[f"{name}_s"] = median(timings[1:])
    figures["speedup"] = figures["cpu_chunks_s"] / max(figures["device_chunks_s"], 1e-9)
    same = rel_err(values["device_chunks"], values["cpu_chunks"])
    figures["values_rel_diff"] = same
    criteria = {"same values either way (rel 1e-5)": at_most(same, 1e-5)}
    note = (f"{sizes['cpu_chunks']}-position chunks {figures['cpu_chunks_s']:.3g} s, "
            f"{sizes['device_chunks']}-position {figures['device_chunks_s']:.3g} s ({figures['speedup']:.1f}x)")  # fmt: skip
    return {"figures": figures, "criteria": criteria, "note": note}


# ---- (c) fused-loss memory against naive full logits ----------------------------------------------------------------


def loss_memory_planned(positions, vocab, shapes, device_kind):
    """The planner's "chunked loss" for `positions` completion tokens over `vocab`, frozen head (LoRA), bf16."""
    from transformers import Qwen2Config

    hidden_size = shapes.loss_memory_hidden
    config = Qwen2Config(hidden_size=hidden_size, vocab_size=vocab, intermediate_size=4 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False)  # fmt: skip
    return planner_estimate(config, 1, positions, True, "bf16", device_kind, gpu_gib=140)["components"]["chunked loss"]


def loss_memory_check(positions, vocab, shapes, device, seed):
    import torch
    import torch.nn.functional as F

    from trl_opsdl import loss_utils
    from trl_opsdl.planner.memory import loss_tiles

    dtype = torch.bfloat16
    hidden_size = shapes.loss_memory_hidden
    generator = torch.Generator(device=device.name).manual_seed(seed)
    # A frozen head (LoRA): gradients reach the hidden states only, as in the 7B LoRA step.
    weight = (
        torch.randn(vocab, hidden_size, device=device.name, generator=generator) / math.sqrt(hidden_size) * 3
    ).to(dtype)
    tokens = torch.randint(0, vocab, (positions,), device=device.name, generator=generator)
    data = torch.randn(positions, hidden_size, device=device.name, generator=generator)
    teacher_data = (data + 0.5 * torch.randn(positions, hidden_size, device=device.name, generator=generator)).to(
        dtype
    )
    data = data.to(dtype)
    del generator

    def measure(loss_fn):
        device.cleanup()
        base = device.allocated()  # the head, the data copies and the tokens: not the loss's
        hidden = data.clone().requires_grad_()
        teacher_hidden = teacher_data.clone()
        device.reset_peak()
        t0 = device.timer()
        loss = loss_fn(hidden, teacher_hidden)
        loss.backward()
        seconds = device.timer() - t0
        peak = device.peak()
        used = None if peak is None else peak - base  # the two input copies made above count: the loss saves them
        return loss.detach().float().item(), hidden.grad.float(), used, seconds

    def fused(hidden, teacher_hidden):
        head = loss_utils.LMHead(weight)
        divergence, *_ = loss_utils.full_logits_divergence(hidden, teacher_hidden, head, head, tokens, 1.0, 1.0)
        return divergence.sum() / positions

    def naive(hidden, teacher_hidden):
        # what `model(ids).logits` + a reverse KL does: bf16 logits for every position, upcast for the softmax
        student_logp = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
        with torch.no_grad():
            teacher_logp = torch.log_softmax(F.linear(teacher_hidden, weight).float(), dim=-1)
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1).mean()

    fused_loss, fused_grad, fused_bytes, fused_s = measure(fused)
    naive_loss, naive_grad, naive_bytes, naive_s = measure(naive)
    planned = loss_memory_planned(positions, vocab, shapes, "cuda" if device.cuda else "cpu")
    loss_err = abs(fused_loss - naive_loss) / max(abs(naive_loss), 1e-30)
    figures = {
        "positions": positions, "vocab": vocab, "hidden": hidden_size,
        "fused_gib": gib(fused_bytes), "naive_gib": gib(naive_bytes),
        "naive_over_fused": naive_bytes / fused_bytes if fused_bytes and naive_bytes is not None else None,
        "planned_chunked_loss_gib": gib(planned), "tiles": loss_tiles(positions, vocab),
        "fused_s": fused_s, "naive_s": naive_s,
        "loss_rel_diff": loss_err, "grad_hidden_rel_diff": rel_err(fused_grad, naive_grad),
    }  # fmt: skip
    ratio, within = memory_verdict(fused_bytes, planned, judge=device.cuda)
    figures["measured_over_planned"] = ratio
    criteria = {
        # the naive loss rounds its logits to bf16; the fused one keeps fp32 logits: they agree to ~1e-3
        "fused loss == naive loss (rel 1e-2)": at_most(loss_err, 1e-2),
        # One tile of TRL's loss ([4096, 32768] fp32, two of them) is as large as the naive logits of a loss that fits
        # in it (4096 x 32000: 1.8x on the H100): the saving is judged where the loss spans several tiles.
        "fused >= 3x less memory than naive (loss over 2+ tiles)": (
            (naive_bytes >= 3 * fused_bytes) if device.cuda and loss_tiles(positions, vocab) > 1 else None
        ),
        f"planner's chunked loss within {MEMORY_TOLERANCE:.0%}": within,
    }
    note = (
        f"fused {gib(fused_bytes):.2f} GiB vs naive {gib(naive_bytes):.2f} GiB ({naive_bytes / fused_bytes:.1f}x), "
        f"planned {gib(planned):.2f} GiB"
        if device.cuda
        else "memory as RSS on the CPU: not judged"
    )
    return {"figures": figures, "criteria": criteria, "note": note}


# ---- the 7B-shaped model, its tokenizer -----------------------------------------------------------------------------


def model_config(shapes, max_length):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(CONFIG_7B))
    for key, value in shapes.model_overrides.items():
        setattr(config, key, value)
    # the word-level tokenizer below: <pad>=0, <s>=2, </s>=3
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 2, 3
    config.max_position_embeddings = max(config.max_position_embeddings, max_length)
    config.use_cache = True
    return config


def build_model(config, device, dtype):
    """The model with random weights, created on the device itself (a 7B init on the CPU takes minutes), its
    initialization skipped and done here with in-place normal_ (never uninitialized memory, never zeros)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: let it initialize (on the device, still fast)
        no_init_weights = contextlib.nullcontext
    torch.manual_seed(0)
    with torch.device(device.name), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:  # matrices, embeddings and the q/k/v biases
                param.normal_(0.0, std)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 3
    return model


def build_tokenizer(vocab_size):
    """A word-level tokenizer over `w4`..`w{V-1}`: a prompt of n words is exactly n tokens, ids equal to the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left",
    )  # fmt: skip


def prompt_ids(length, vocab_size, seed):
    import random

    rng = random.Random(seed)
    return [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(length)]


def as_text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@dataclass
class ModelSetup:
    config: object
    model: object  # the PeftModel (LoRA on every projection)
    tokenizer: object
    dtype_name: str
    gpu_gib: float


def setup_model(shapes, device, holder):
    import torch
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if device.cuda else torch.float32
    config = model_config(shapes, max(shapes.lengths) + shapes.completion_length + 16)
    t0 = device.timer()
    model = build_model(config, device, dtype)
    build_s = device.timer() - t0
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    tokenizer = build_tokenizer(config.vocab_size)
    total = device.total_memory()
    holder.append(ModelSetup(config, model, tokenizer, "bf16" if device.cuda else "fp32", (total or 80 * GIB) / GIB))
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        all_finite = all(bool(torch.isfinite(t).all()) for t in [*model.parameters(), *model.buffers()])
    figures = {
        "parameters": params, "trainable": trainable, "layers": config.num_hidden_layers,
        "hidden": config.hidden_size, "vocab": config.vocab_size, "dtype": str(dtype), "build_s": build_s,
        "allocated_gib": gib(device.allocated()),
    }  # fmt: skip
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params:,}"
    note = f"{size} parameters ({trainable:,} trainable), built in {build_s:.1f} s"
    return {"figures": figures, "criteria": {"weights and buffers finite": all_finite}, "note": note}


def disable_checkpointing(model):
    # `activation_checkpointing_disable` in newer transformers, `gradient_checkpointing_disable` (5.17) before
    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()


def resident_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ---- (d) generation -------------------------------------------------------------------------------------------------


def generation_check(setup, shapes, device, merged=False):
    """Greedy HF generate of `generation_new_tokens` after a `generation_length` prompt, warmed up: prefill and decode
    speed, peak memory against the planner. `merged`: with the LoRA adapters merged into the weights (PEFT's
    `merge_adapter`), then unmerged — what unmerged adapters cost a batch-1 decode (12.3 tokens/s unmerged at 32K on
    the first H100 run); informational, and run last, since unmerging in bf16 does not give back the exact weights."""
    import torch

    model, length, new_tokens = setup.model, shapes.generation_length, shapes.generation_new_tokens
    ids = torch.tensor([prompt_ids(length, setup.config.vocab_size, seed=7)], device=device.name)
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=3, use_cache=True)
    model.eval()
    if merged:
        model.merge_adapter()
    try:
        with torch.no_grad():
            model.generate(input_ids=ids[:, :256], attention_mask=torch.ones_like(ids[:, :256]), max_new_tokens=4,
                           min_new_tokens=4, **common)  # warm-up  # fmt: skip
            t0 = device.timer()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, **common)
            prefill_s = device.timer() - t0
            device.reset_peak()
            base = device.allocated()
            t0 = device.timer()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, **common)  # fmt: skip
            total_s = device.timer() - t0
            peak = device.peak()
    finally:
        if merged:
            model.unmerge_adapter()
    generated = out.shape[1] - length
    decode_s = max(total_s - prefill_s, 1e-9)
    measured = None if peak is None else peak - base + resident_bytes(model)
    figures = {
        "prompt_tokens": length, "new_tokens": generated, "prefill_s": prefill_s,
        "prefill_tokens_per_s": length / prefill_s, "decode_tokens_per_s": (generated - 1) / decode_s,
        "total_s": total_s, "peak_gib": gib(measured),
    }  # fmt: skip
    criteria = {"generated every token": generated == new_tokens}
    note = f"prefill {length / prefill_s:,.0f} tok/s, decode {(generated - 1) / decode_s:,.1f} tok/s"
    if merged:
        return {"figures": figures, "criteria": criteria, "note": "adapters merged: " + note}
    planned = planned_first_generation(planner_estimate(
        setup.config, length, new_tokens, True, setup.dtype_name, "cuda" if device.cuda else "cpu", setup.gpu_gib
    ))  # fmt: skip
    ratio, within = memory_verdict(measured, planned, judge=device.cuda)
    figures.update({"planned_generation_gib": gib(planned), "measured_over_planned": ratio})
    criteria[f"planner's generation phase within {MEMORY_TOLERANCE:.0%}"] = within
    if measured is not None:
        note += f", peak {gib(measured):.3g} GiB vs planned {gib(planned):.3g} GiB"
    return {"figures": figures, "criteria": criteria, "note": note}


# ---- (b) OPSDLTrainer steps against the planner and SFTTrainer ------------------------------------------------------


class StepClock:
    """A trainer callback: wall time and peak memory at the end of every optimizer step."""

    def __init__(self, device):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                device.reset_peak()
                clock.begin = device.timer()

            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append(device.timer())
                clock.peaks.append(device.peak())
                clock.reserved.append(device.peak_reserved())
                device.reset_peak()

        self.begin, self.ends, self.peaks, self.reserved = None, [], [], []
        self.callback = Callback()

    def step_times(self):
        marks = [self.begin, *self.ends]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def instrument_opsdl(trainer, device, completions, phases):
    """Time and measure generation and the teacher forward of each step, apart from the rest; reuse the completion
    of a prompt once generated (the same sequences for every configuration and for SFTTrainer)."""
    generate, teacher = trainer._generate_single_turn, trainer._teacher_hidden_states

    def generate_once(prompt_ids, images, multimodal_fields, has_tool_images=False):
        key = tuple(tuple(ids) for ids in prompt_ids)
        record = {"generation_s": 0.0, "generation_peak": None, "generated": False, "key": key}
        phases.append(record)
        if key not in completions:
            device.reset_peak()
            t0 = device.timer()
            completions[key] = generate(prompt_ids, images, multimodal_fields, has_tool_images)
            record.update(generation_s=device.timer() - t0, generation_peak=device.peak(), generated=True)
            device.reset_peak()
        return [list(ids) for ids in completions[key]]

    def teacher_measured(*args, **kwargs):
        device.reset_peak()
        out = teacher(*args, **kwargs)
        if phases:
            phases[-1]["teacher_peak"] = device.peak()
        device.reset_peak()  # from here to the step's end: student forward, loss, backward, optimizer
        return out

    trainer._generate_single_turn = generate_once
    trainer._teacher_hidden_states = teacher_measured


def train_opsdl(setup, device, length, completion, steps, gc_policy, completions, output_dir, context_gradient="full"):
    import warnings

    from datasets import Dataset
    from transformers import PrinterCallback

    from trl_opsdl import OPSDLConfig, OPSDLTrainer

    ids = prompt_ids(length, setup.config.vocab_size, seed=length)
    row = {"prompt": as_text(ids), "teacher_prompt": as_text(ids[-(length // 8) :])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = OPSDLConfig(
            output_dir=output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=steps,
            max_completion_length=completion, generation_kwargs={"min_new_tokens": completion},
            learning_rate=1e-5, optim="adamw_torch", beta=1.0, logging_steps=1, save_strategy="no",
            report_to="none", bf16=device.cuda, use_cpu=not device.cuda, disable_tqdm=True, shuffle_dataset=False,
            gradient_checkpointing=gc_policy != "none",
            activation_checkpointing_policy="selective" if gc_policy == "selective" else "full",
            teacher_model_kind="base", seed=0, context_gradient=context_gradient,
        )  # fmt: skip
    clock, phases = StepClock(device), []
    trainer = OPSDLTrainer(
        model=setup.model, args=args, train_dataset=Dataset.from_list([row] * steps),
        processing_class=setup.tokenizer, callbacks=[clock.callback],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the log dicts would bury the table in the output
    instrument_opsdl(trainer, device, completions, phases)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    key = phases[-1]["key"]  # the prompt ids as the trainer tokenized them, and their completion
    sequence = (list(key[0]), list(completions[key][0]))
    checkpointing_kwargs = args.gradient_checkpointing_kwargs
    del trainer
    return clock, phases, losses, sequence, checkpointing_kwargs


def train_sft(setup, device, sequence, steps, gc_policy, checkpointing_kwargs, output_dir):
    import warnings

    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    prompt, completion = sequence
    row = {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = SFTConfig(
            output_dir=output_dir, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=steps,
            learning_rate=1e-5, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
            bf16=device.cuda, use_cpu=not device.cuda, disable_tqdm=True, shuffle_dataset=False, max_length=None,
            packing=False, gradient_checkpointing=gc_policy != "none",
            # the same checkpointing as OPSDL's step (TRL's own `selective` would wrap the shared model for good)
            gradient_checkpointing_kwargs=dict(checkpointing_kwargs) if gc_policy == "selective" else None,
            seed=0,
        )  # fmt: skip
    clock = StepClock(device)
    trainer = SFTTrainer(
        model=setup.model, args=args, train_dataset=Dataset.from_list([row] * steps),
        processing_class=setup.tokenizer, callbacks=[clock.callback],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    del trainer
    return clock


@contextlib.contextmanager
def pristine(model):
    """Give the model back as it was after a trainer used it: accelerate wraps `forward` (autocast, outputs to fp32)
    on the instance at each `prepare`, and the trainers turn checkpointing and input gradients on; several trainers
    on one model would otherwise stack them."""
    base_model = model.get_base_model()
    saved = {key: model.__dict__[key] for key in ("forward", "_original_forward") if key in model.__dict__}
    disable_checkpointing(base_model)  # a previous configuration's trainer left it on
    try:
        yield
    finally:
        for key in ("forward", "_original_forward"):
            model.__dict__.pop(key, None)
        model.__dict__.update(saved)
        disable_checkpointing(base_model)
        if getattr(base_model, "_require_grads_hook", None) is not None:
            base_model.disable_input_require_grads()


def plan_step(setup, length, completion, gc_policy, device_kind, context_gradient="full"):
    """The planner's estimate for one `opsdl_step` configuration. With `context_gradient="none"` the check reuses
    completions generated earlier, so no generation cache is kept and the loss prefills the context: the planner's
    path after vLLM generation."""
    return planner_estimate(setup.config, length, completion, gc_policy != "none", setup.dtype_name, device_kind,
                            setup.gpu_gib, context_gradient=context_gradient,
                            checkpointing_policy="selective" if gc_policy == "selective" else "full",
                            generation="vllm-server" if context_gradient == "none" else "gathered")  # fmt: skip


def opsdl_step_check(setup, shapes, device, length, gc_policy, completions, attn="sdpa", context_gradient="full"):
    # context_gradient="none": the completions are generated once per prompt and reused (so every configuration
    # trains on the same tokens), so after the first step no generation cache is kept and the loss prefills the
    # context without gradient: the figures are those of the prefill path (as after vLLM generation).
    steps, completion = shapes.steps[length], shapes.completion_length
    model = setup.model
    base_model = model.get_base_model()
    if attn != "sdpa":
        base_model.set_attn_implementation(attn)
    sft_error = None
    try:
        device.cleanup()
        allocated_before, resident = device.allocated(), resident_bytes(model)
        with pristine(model), tempfile.TemporaryDirectory() as out_dir:
            clock, phases, losses, sequence, ckpt_kwargs = train_opsdl(
                setup, device, length, completion, steps, gc_policy, completions, out_dir, context_gradient
            )
        device.cleanup()
        try:  # SFTTrainer holds the (L, V) logits: it may run out of memory where OPSDL did not
            with pristine(model), tempfile.TemporaryDirectory() as out_dir:
                sft_clock = train_sft(setup, device, sequence, steps, gc_policy, ckpt_kwargs, out_dir)
        except Exception as error:  # noqa: BLE001
            sft_clock, sft_error = None, f"{type(error).__name__}: {str(error).strip()[:200]}"
    finally:
        if attn != "sdpa":
            base_model.set_attn_implementation("sdpa")
    tokens = len(sequence[0]) + len(sequence[1])
    opsdl_times = [t - p["generation_s"] for t, p in zip(clock.step_times(), phases)]
    measured_steps = slice(1, None) if steps > 1 else slice(0, None)  # the first step is the warm-up
    opsdl_s = median(opsdl_times[measured_steps])
    sft_s = median(sft_clock.step_times()[measured_steps]) if sft_clock else None
    generated = [p for p in phases if p["generated"]]

    # Memory per phase: allocated above what the process held before, plus the model's own tensors, so that a leak
    # from an earlier check does not count; the planner's phases include the resident weights and optimizer states.
    def absolute(peak):
        return None if peak is None or allocated_before is None else peak - allocated_before + resident

    last = phases[-1] if phases else {}
    measured = {
        "generation": absolute(generated[0]["generation_peak"]) if generated else None,
        "teacher_forward": absolute(last.get("teacher_peak")),
        "training": absolute(clock.peaks[-1]) if clock.peaks else None,  # student forward, loss, backward, optimizer
    }
    device_kind = "cuda" if device.cuda else "cpu"

    plan = plan_step(setup, length, completion, gc_policy, device_kind, context_gradient)
    planned_phases = plan["phases"]
    planned = {
        "generation": planned_first_generation(plan),
        "teacher_forward": planned_phases["teacher forward"],
        "training": max(planned_phases[k] for k in ("loss", "backward", "optimizer step")),
    }
    figures = {"prompt_tokens": len(sequence[0]), "completion_tokens": len(sequence[1]), "steps": steps,
               "loss_first_step": losses[0] if losses else None}  # fmt: skip
    ratio = sft_s / opsdl_s if opsdl_s and sft_s else None
    figures.update({
        "opsdl_train_s": opsdl_s, "sft_train_s": sft_s,
        "opsdl_tokens_per_s": tokens / opsdl_s if opsdl_s else None,
        "sft_tokens_per_s": tokens / sft_s if sft_s else None,
        "opsdl_over_sft_tokens_per_s": ratio,
        "opsdl_step_times_s": opsdl_times, "sft_step_times_s": sft_clock.step_times() if sft_clock else None,
        "sft_error": sft_error,
    })  # fmt: skip
    if generated:
        figures["generation_in_trainer_s"] = generated[0]["generation_s"]
    for phase in ("generation", "teacher_forward", "training"):
        figures[f"{phase}_peak_gib"] = gib(measured[phase])
        figures[f"{phase}_planned_gib"] = gib(planned[phase])
    reserved = [r for r in clock.reserved if r is not None]
    figures["opsdl_peak_reserved_gib"] = gib(max(reserved)) if reserved else None
    sft_peaks = [x for x in sft_clock.peaks if x is not None] if sft_clock else []
    figures["sft_peak_gib"] = gib(absolute(max(sft_peaks))) if sft_peaks else None
    figures["leaked_before_gib"] = None if allocated_before is None else gib(allocated_before - resident)
    criteria = {"loss finite": bool(losses) and all(finite(x) for x in losses)}
    (
        figures["training_measured_over_planned"],
        criteria[f"training peak within {MEMORY_TOLERANCE:.0%} of the planner"],
    ) = memory_verdict(measured["training"], planned["training"], judge=device.cuda)
    (
        figures["teacher_measured_over_planned"],
        criteria[f"teacher-forward peak within {MEMORY_TOLERANCE:.0%} of the planner"],
    ) = memory_verdict(measured["teacher_forward"], planned["teacher_forward"], judge=device.cuda)
    if generated:
        (
            figures["generation_measured_over_planned"],
            criteria[f"generation peak within {MEMORY_TOLERANCE:.0%} of the planner"],
        ) = memory_verdict(measured["generation"], planned["generation"], judge=device.cuda)
    # Toy shapes measure overheads, not a GPU's throughput: the goal is judged on the real run only. Where SFTTrainer
    # ran out of memory and OPSDL did not, there is no ratio to judge.
    criteria[f"tokens/s >= {THROUGHPUT_GOAL}x SFTTrainer"] = (
        (ratio >= THROUGHPUT_GOAL) if (device.cuda and ratio is not None) else None
    )
    note = f"{ratio:.2f}x SFTTrainer tokens/s" if ratio else f"no SFT ratio ({sft_error or 'not measured'})"
    if measured["training"] is not None:
        note += f", training peak {gib(measured['training']):.3g} GiB (planned {gib(planned['training']):.3g})"
    return {"figures": figures, "criteria": criteria, "note": note}


# ---- the table ------------------------------------------------------------------------------------------------------


TABLE_FIGURES = {
    "parity": ("divergence_rel_err", "student_logprob_rel_err", "entropy_rel_err", "grad_hidden_rel_err",
               "grad_weight_rel_err"),
    "loss_memory": ("fused_gib", "naive_gib", "naive_over_fused", "planned_chunked_loss_gib"),
    "setup": ("parameters", "build_s", "allocated_gib"),
    "generation": ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_gib", "planned_generation_gib"),
    "opsdl_step": ("opsdl_tokens_per_s", "sft_tokens_per_s", "opsdl_over_sft_tokens_per_s", "training_peak_gib",
                   "training_planned_gib", "teacher_forward_peak_gib", "generation_peak_gib", "generation_in_trainer_s"),
}  # fmt: skip


def format_value(value):
    if isinstance(value, float):
        return (
            f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:,.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        )
    return str(value)


def format_table(record) -> str:
    gpu = record.get("environment", {}).get("gpu", {})
    machine = gpu.get("name") or f"CPU ({record.get('environment', {}).get('cpu_threads')} threads)"
    versions = record.get("environment", {}).get("versions", {})
    lines = [
        f"GPU check {record.get('started')} on {machine}, {'tiny shapes' if record.get('tiny') else 'full shapes'}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        "",
        "| check | status | s | figures | note |",
        "|---|---|---:|---|---|",
    ]
    for entry in record.get("checks", []):
        keys = TABLE_FIGURES.get(entry["group"], ())
        figures = entry.get("figures", {})
        shown = "; ".join(f"{k} {format_value(figures[k])}" for k in keys if figures.get(k) is not None)
        failed = [name for name, ok in entry.get("criteria", {}).items() if ok is False]
        note = entry.get("note", "") + (f" — failed: {', '.join(failed)}" if failed else "")
        status = entry["status"].upper() if entry["status"] in ("fail", "error") else entry["status"]
        lines.append(f"| {entry['id']} | {status} | {entry['seconds']:.1f} | {shown} | {note.replace('|', '/')} |")
    counts = {}
    for entry in record.get("checks", []):
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    finished = record.get("finished")
    lines += ["", f"{', '.join(f'{v} {k}' for k, v in counts.items())}; "
              + (f"finished {finished} after {record.get('elapsed_s')} s" if finished else "NOT FINISHED (cut off)")]  # fmt: skip
    return "\n".join(lines)


# ---- the carried wheels -------------------------------------------------------------------------------------------


WHEEL_NAME = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>.+)\.whl$"
)


def wheel_fits(filename: str, python_version: str) -> bool:
    """Whether a wheel's tags install on CPython `python_version` (e.g. "3.12") on Linux x86_64."""
    match = WHEEL_NAME.match(filename)
    if not match:
        return False
    major, minor = python_version.split(".")[:2]
    pythons = {"py3", f"py{major}{minor}", f"cp{major}{minor}"}
    abis = {"none", "abi3", f"cp{major}{minor}"}
    platforms = match["platform"].split(".")
    platform_ok = any(p == "any" or (p.startswith("manylinux") and p.endswith("x86_64")) for p in platforms)
    return (
        bool(pythons & set(match["python"].split("."))) and bool(abis & set(match["abi"].split("."))) and platform_ok
    )


def check_wheels(folder: Path, requirements: list, python_version: str, limit_mib: float) -> list:
    """Problems with the carried wheels: a pinned requirement with no fitting wheel, two fitting versions of one
    package, or more than `limit_mib` in all. Empty when the folder is ready to copy."""
    problems, fitting = [], {}
    wheels = sorted(folder.rglob("*.whl"))
    for wheel in wheels:
        match = WHEEL_NAME.match(wheel.name)
        if match and wheel_fits(wheel.name, python_version) and wheel.parent == folder:
            fitting.setdefault(match["name"].lower().replace("_", "-"), set()).add(match["version"])
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        versions = fitting.get(name.lower().replace("_", "-"), set())
        if version not in versions:
            problems.append(f"{requirement}: no wheel for Python {python_version} on Linux x86_64 in {folder}")
        if len(versions) > 1:
            problems.append(f"{name}: several versions {sorted(versions)} (one only, or the install stops)")
    total_mib = sum(w.stat().st_size for w in wheels) / 2**20
    if total_mib > limit_mib:
        problems.append(f"{total_mib:.1f} MiB of wheels, over {limit_mib:g} MiB")
    return problems


def read_requirements(path: Path) -> list:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


# ---- the run --------------------------------------------------------------------------------------------------------


def parse_inject(text):
    """`CASE=KIND,...` with KIND `nan` or `wrong_reference` and CASE a parity id (`parity/full_logits/trl_kernel/fp32`
    or without the `parity/` prefix): make those cases wrong on purpose, to see them fail."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        case, _, kind = item.partition("=")
        if kind not in ("nan", "wrong_reference"):
            raise argparse.ArgumentTypeError(f"--inject {item!r}: the kind must be nan or wrong_reference")
        out[case if case.startswith("parity/") else f"parity/{case}"] = kind
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="Toy shapes (the CPU test): same code paths.")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="Folder for the results.")
    parser.add_argument("--budget-s", type=float, default=None, help="Time guard (default: 420 s full, 300 s tiny).")
    parser.add_argument("--only", default="", help=f"Comma-separated groups to run, from {GROUPS}.")
    parser.add_argument("--inject", type=parse_inject, default={}, help=parse_inject.__doc__.split(":")[0])
    parser.add_argument("--table", metavar="JSON", help="Only print the table of a results file.")
    parser.add_argument("--check-wheels", metavar="DIR", help="Only check the carried wheels in DIR.")
    parser.add_argument("--python-version", default=platform.python_version(), help="For --check-wheels.")
    parser.add_argument("--limit-mib", type=float, default=60.0, help="For --check-wheels.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(format_table(json.loads(Path(args.table).read_text())))
        return 0
    if args.check_wheels:
        requirements = read_requirements(Path(__file__).with_name("gpu_check_wheels.txt"))
        problems = check_wheels(Path(args.check_wheels), requirements, args.python_version, args.limit_mib)
        for problem in problems:
            print(f"wheel problem: {problem}")
        print(f"{len(requirements)} pinned wheels checked for Python {args.python_version}: "
              + ("OK" if not problems else f"{len(problems)} problem(s)"))  # fmt: skip
        return 1 if problems else 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda but torch sees no GPU; run with --tiny --device cpu on a CPU.")
        return 2
    shapes = TINY_SHAPES if args.tiny else GPU_SHAPES
    groups = set(filter(None, args.only.split(","))) or set(GROUPS)
    unknown = groups - set(GROUPS)
    if unknown:
        print(f"--only: unknown group(s) {sorted(unknown)}; choose from {GROUPS}")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import faulthandler

    budget = args.budget_s if args.budget_s is not None else shapes.budget_s
    stacks = open(out_dir / "stacks.txt", "w")  # noqa: SIM115 - kept open for the watchdog below
    faulthandler.dump_traceback_later(budget + 30, exit=False, file=stacks)  # where a hung check was, if one hangs

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = Device(args.device)
    meta = {"tiny": args.tiny, "device": args.device, "memory_source": device.memory_source,
            "shapes": rounded(shapes.__dict__),
            "environment": environment(args.device), "inject": args.inject}  # fmt: skip
    results = Results(out_dir, budget, meta)
    estimates = shapes.estimates

    if "parity" in groups:
        for i, mode in enumerate(LOSS_MODES):
            for dtype_name in ("fp32", "bf16"):
                case = f"parity/{mode}/{dtype_name}"
                results.run(case, "parity", estimates["parity"], parity_check, mode, dtype_name, shapes, device,
                            seed=100 + 2 * i + (dtype_name == "bf16"), inject=args.inject.get(case), device=device)  # fmt: skip
        results.run("parity/topk_logits/chunking_speed", "parity", estimates["parity"], chunking_speed_check,
                    shapes, device, seed=120, device=device)  # fmt: skip
    if "loss_memory" in groups:
        for i, (positions, vocab) in enumerate(shapes.loss_memory_cases):
            results.run(f"loss_memory/{positions}x{vocab}", "loss_memory", estimates["loss_memory"],
                        loss_memory_check, positions, vocab, shapes, device, seed=200 + i, device=device)  # fmt: skip

    holder = []
    if groups & {"setup", "generation", "opsdl_step"}:
        results.run("setup/model", "setup", estimates["setup"], setup_model, shapes, device, holder, device=device)
    setup = holder[0] if holder else None

    def needs_model(check_id, group, estimate_s, fn, *fn_args):
        if setup is None:
            results.skip(check_id, group, "no model (setup/model did not run or failed)")
            return None
        return results.run(check_id, group, estimate_s, fn, setup, *fn_args, device=device)

    if "generation" in groups:
        needs_model(f"generation/{shapes.generation_length}", "generation", estimates["generation"],
                    generation_check, shapes, device)  # fmt: skip
    if "opsdl_step" in groups:
        short, long = shapes.lengths
        completions = {}  # prompt ids -> completion ids, generated once per length
        # In order of importance: the default (full checkpointing) at both lengths first, then the others. A
        # configuration the planner says cannot fit is skipped (a run out of memory proves less and can leave the
        # allocator fragmented for the next).
        order = [(short, "full"), (long, "full"), (short, "none"), (short, "selective"), (long, "selective"),
                 (long, "none")]  # fmt: skip
        for length, policy in order:
            check_id = f"opsdl_step/{length}/{policy}/sdpa"
            if setup is not None and device.cuda:
                plan = plan_step(setup, length, shapes.completion_length, policy, args.device)
                needed = plan["peak"] + plan["reserve"]
                if needed > device.total_memory():
                    results.skip(check_id, "opsdl_step",
                                 f"planner: {gib(needed):.0f} GiB needed > {gib(device.total_memory()):.0f} GiB")  # fmt: skip
                    continue
            needs_model(check_id, "opsdl_step", estimates[length], opsdl_step_check, shapes, device, length,
                        policy, completions)  # fmt: skip
        # The long prompt's keys/values without gradient (`context_gradient="none"`), full checkpointing as the default
        needs_model(f"opsdl_step/{long}/full/sdpa/context_none", "opsdl_step", estimates[long], opsdl_step_check,
                    shapes, device, long, "full", completions, "sdpa", "none")  # fmt: skip
        check_id = f"opsdl_step/{long}/full/flash_attention_2"
        if importlib.util.find_spec("flash_attn") is None:
            results.skip(check_id, "opsdl_step", "flash-attn not installed (sdpa on CUDA uses PyTorch's own "
                                                 "FlashAttention kernel for bf16 without padding)")  # fmt: skip
        else:
            needs_model(check_id, "opsdl_step", estimates[long], opsdl_step_check, shapes, device, long, "full",
                        completions, "flash_attention_2")  # fmt: skip

    if "generation" in groups:  # last: merging and unmerging in bf16 moves the weights by their rounding
        needs_model(f"generation/{shapes.generation_length}/merged_lora", "generation", estimates["generation"],
                    generation_check, shapes, device, True)  # fmt: skip

    faulthandler.cancel_dump_traceback_later()
    results.finish()
    print()
    print(format_table(results.record))
    bad = [e for e in results.record["checks"] if e["status"] in ("fail", "error")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
