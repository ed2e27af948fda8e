"""`DemoConfig` (`trl-opsdl demo`) and `RealDemoConfig` (`trl-opsdl demo --real`): one field per command-line option.
Imports nothing heavy, so the command line can build its options from them."""

from dataclasses import dataclass, field


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DemoConfig:
    """Everything `trl-opsdl demo` does; the defaults are the documented experiment (docs/demo.md)."""

    output_dir: str = "opsdl-demo"
    model_path: str | None = None  # None: the pretrained model shipped in trl_opsdl/assets/demo_model
    seed: int = 0
    # Training: `max_steps` batches of `batch_size` long prompts, each with `train_pairs` pairs.
    max_steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-3
    temperature: float = 1.0
    train_pairs: tuple[int, int] = (16, 32)
    distillation_mode: str = "full_logits"
    teacher_model_kind: str = "base"
    short_prompt_ratio: float = 0.0
    lora: bool = True  # the base teacher is then the adapter-free model, and the base weights are never changed
    lora_r: int = 16
    lora_target_modules: tuple[str, ...] = ALL_LINEAR
    # Evaluation: `short` has `short_pairs` pairs, then one setting per entry of `long_pairs`.
    short_pairs: int = 4
    long_pairs: tuple[int, ...] = (16, 24, 32)
    eval_examples: int = 500
    eval_batch_size: int = 250
    save_model: bool = False  # also save the trained model and tokenizer to <output_dir>/model
    num_threads: int = 1  # torch's CPU threads: more help only where no other job shares the cores
    logging_steps: int = 10
    overwrite: bool = False  # replace an earlier run's results in a non-empty output_dir


@dataclass
class RealDemoConfig:
    """Everything `trl-opsdl demo --real` does; the defaults are the documented run (docs/real_demo.md)."""

    output_dir: str = "opsdl-demo-real"
    model: str | None = None  # None: SmolLM2-135M-Instruct from PyPI; or a .gguf file, a model folder, a hub id
    # The documents and questions: a RULER task (e.g. "niah_single": a needle sentence with a made-up word in essay
    # text; the needle lines are the short context) over the essays of `essays`, `num_eval_articles` of them held out
    # as the evaluation's haystack; or "squad" (Wikipedia articles; the gold paragraph is the short context). None:
    # "squad" when `squad` names a file, else "niah_single" (the essays are on PyPI; SQuAD no longer is, docs)
    task: str | None = None
    squad: str | None = None  # None: SQuAD v1.1 dev from PyPI, else from its publisher; or any SQuAD-format JSON file
    essays: str | None = None  # RULER tasks' haystack: None = the Paul Graham essays from PyPI; or a folder of .txt
    # Train on a mixture of RULER families instead of `task` alone (e.g. niah_single,niah_multikey,vt,niah_multiquery):
    # an equal share of the training prompts per (family, length), all from the training essays. () = `task` only.
    # The demo still measures `task` before and after; `trl-opsdl bench ruler` measures every family (docs).
    mix: tuple[str, ...] = ()
    # `--compare`'s short-context check from another source: None = SQuAD-shifts' New York Times set (fetched as
    # `squad`), or any SQuAD-format JSON file (its paragraphs + questions, no long context)
    squad_check: str | None = None
    short_check: bool = True  # False (--no-short-check): `--compare` without that check, where no source can be had
    seed: int = 0
    num_eval_articles: int = 12  # of SQuAD dev's 48: held out, never trained on
    # Evaluation: `eval_short` questions on the gold paragraph, `eval_long` at each of `eval_lengths` tokens.
    eval_lengths: tuple[int, ...] = (512, 1024)
    eval_short: int = 300
    eval_long: int = 100
    eval_max_new_tokens: int = 24
    eval_batch_size: int = 8
    # Training: `max_steps` batches of `batch_size` long prompts, at the lengths of `train_lengths` in turn.
    train_lengths: tuple[int, ...] = (512, 1024)
    max_steps: int = 40
    batch_size: int = 4
    # The recipe: the top-k reverse KL at lr 3e-4, half of each batch sampled from the short prompt ("anchors": there
    # the student and the adapter-free teacher read the same prompt, so the loss holds the student's short-prompt
    # replies where the base model had them). The first recipe was `--distillation-mode full_logits --learning-rate
    # 1e-3 --short-prompt-ratio 0`.
    learning_rate: float = 3e-4
    temperature: float = 0.7
    max_completion_length: int = 24
    distillation_mode: str = "topk_logits"
    teacher_model_kind: str = "base"
    short_prompt_ratio: float = 0.5  # also TRL's SFT baselines in --compare: that share of rows on the short prompt
    lora_r: int = 16
    # The linear layers LoRA trains (by name; the toy demo's option too): "all-linear" (peft's name for every linear
    # layer but the output head, whatever the architecture calls them) by default. The attention projections alone
    # (q_proj,k_proj,v_proj,o_proj) leave the MLPs as they were: docs/results.md ("LoRA on the attention projections
    # only").
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    # > 0: every `eval_steps` training steps, "contained" on the longest eval length's questions, long and with their
    # gold paragraph (`curve` in results.json / the run file); each point costs an evaluation of 2 x `eval_long` rows.
    eval_steps: int = 0
    system_prompt: str | None = None  # None: the chat template's default system prompt
    num_threads: int = 2
    logging_steps: int = 1
    save_model: bool = False
    # > 0 (with `save_model`): the LoRA adapter every `save_steps` training steps too, to `checkpoint-<step>` inside
    # the saved adapter's folder (`--compare`: models/<method>-seed<k>; alone: model/), each loadable by
    # `trl-opsdl bench ruler --adapter`: a run's scores step by step, benched after training.
    save_steps: int = 0
    overwrite: bool = False
    extra: dict = field(default_factory=dict)  # further OPSDLConfig fields

    def __post_init__(self):
        if self.task is None:
            self.task = "squad" if self.squad is not None else "niah_single"
