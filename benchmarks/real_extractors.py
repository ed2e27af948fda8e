"""Short contexts without annotations, on real documents: BM25 and the model's own quotes (SelfExtractor) against the
gold SQuAD paragraph.

    python benchmarks/real_extractors.py                 # 30 held-out questions at 1,024 tokens, SmolLM2-135M
    python benchmarks/real_extractors.py --num 4 --length 384 --max-new-tokens 32   # the smallest setting

For each long context (the gold paragraph among its article's neighbours, `build_squad_pairs`) each extractor
returns a short context; we report how often it contains the gold answer, the share of the gold paragraph's sentences
it kept (evidence recall), and its length in tokens. Writes a JSON.
"""

import argparse
import json
import re


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Default: SmolLM2-135M-Instruct from PyPI (converted GGUF).")
    parser.add_argument("--squad", default=None, help="SQuAD-format JSON (default: SQuAD v1.1 dev from PyPI).")
    parser.add_argument("--num", type=int, default=30)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--output", default="real_extractors.json")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_opsdl.data import BM25Extractor, SelfExtractor
    from trl_opsdl.data.columns import evidence_recall
    from trl_opsdl.data.squad import build_squad_pairs, load_squad, split_articles
    from trl_opsdl.downloads import squad_path
    from trl_opsdl.evaluation import contains_answer
    from trl_opsdl.gguf import prepare_model

    torch.set_num_threads(2)
    model_path = prepare_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    articles = load_squad(args.squad or squad_path())
    _, held_out = split_articles(articles, min(12, len(articles) - 1), seed=0)  # demo --real's held-out articles
    rows = build_squad_pairs(held_out, tokenizer, [args.length], num_samples=args.num, seed=7).to_list()
    model = AutoModelForCausalLM.from_pretrained(model_path)
    bm25 = BM25Extractor(top_k=3, chunk_size=64, tokenizer=tokenizer)
    extractors = {
        "bm25 (3 x 64 tokens)": bm25,
        "self (SmolLM2 quotes, BM25 fallback)": SelfExtractor(
            model, tokenizer, max_new_tokens=args.max_new_tokens, batch_size=4, fallback=bm25
        ),
    }
    contexts, questions = [r["context"] for r in rows], [r["question"] for r in rows]
    report = {"rows": len(rows), "length": args.length, "extractors": {}}
    for name, extractor in extractors.items():
        shorts = extractor.extract_many(contexts, questions) if hasattr(extractor, "extract_many") else [
            extractor(c, q) for c, q in zip(contexts, questions)]  # fmt: skip
        sentences = [[s for s in re.split(r"(?<=[.!?])\s+", r["evidence"][0]) if len(s) > 20] for r in rows]
        report["extractors"][name] = {
            "answer_contained": round(
                sum(contains_answer(s, r["answers"]) for s, r in zip(shorts, rows)) / len(rows), 1
            ),
            "gold_sentence_recall": round(
                100 * sum(evidence_recall(s, e) or 0 for s, e in zip(shorts, sentences)) / len(rows), 1
            ),  # fmt: skip
            "mean_tokens": round(sum(len(tokenizer(s)["input_ids"]) for s in shorts) / len(rows), 1),
            "stats": getattr(extractor, "stats", None),
        }
    gold = {
        "answer_contained": round(sum(contains_answer(r["evidence"][0], r["answers"]) for r in rows) / len(rows), 1),
        "gold_sentence_recall": 100.0,
        "mean_tokens": round(sum(len(tokenizer(r["evidence"][0])["input_ids"]) for r in rows) / len(rows), 1),
    }
    report["extractors"]["gold paragraph (reference)"] = gold
    print("| short context | answer contained (%) | gold-sentence recall (%) | tokens |\n|---|---|---|---|")
    for name, r in report["extractors"].items():
        print(f"| {name} | {r['answer_contained']} | {r['gold_sentence_recall']} | {r['mean_tokens']} |")
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


if __name__ == "__main__":
    main()
