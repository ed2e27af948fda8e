"""Does OPSDL's signal point at right answers? The short-context teacher's advantage on the student's own samples,
split by whether the sample contains the gold answer.

    python benchmarks/real_advantage.py                 # 40 training questions at 512 tokens, 4 samples each
    python benchmarks/real_advantage.py --num 2 --samples 2 --length 256 --max-new-tokens 4   # the smallest setting

For each long prompt (the gold paragraph among its article's neighbours, `build_squad_pairs`, training articles of
`demo --real`'s split) the model samples `--samples` replies at `--temperature`, as `OPSDLTrainer` does. Each reply
y is scored twice without gradient: log p_S(y_t | long, y_<t) (the student) and log p_T(y_t | short, y_<t) (the same
model given the gold paragraph only: the `base` teacher). The per-token advantage

    A_t = log p_T(y_t) − log p_S(y_t)

is what the `sampled_token` loss weighs each sampled token's log-prob by, and its mean over the reply is minus the
sampled estimate of the reverse KL that `full_logits` computes exactly. If OPSDL's signal rewards right answers, a
reply that contains the gold answer should get a higher mean advantage than one that does not, above all between
replies to the same prompt (the advantage ranks samples of one prompt). Reports both, and the teacher's and the
student's own log-probs, which the advantage is the difference of. Log-probs at temperature 1. Writes a JSON.
"""

import argparse
import json
import sys
from pathlib import Path


def _reply_logprobs(model, prompt_ids_P, replies_KR, pad):
    """Per-token log-probs of each reply after the prompt (teacher-forced): replies right-padded to one length, so
    the prompt part of every row is the same and needs no mask. Returns one list per reply."""
    import torch

    width = max(len(r) for r in replies_KR)
    rows_KT = torch.tensor([prompt_ids_P + r + [pad] * (width - len(r)) for r in replies_KR])
    with torch.no_grad():
        # only the last width + 1 positions' logits: the one before the reply predicts its token 0, and so on, so
        # index j of these predicts reply token j (the prompt's 49K-way logits are never computed)
        logits_KWV = model(input_ids=rows_KT, logits_to_keep=width + 1).logits
    logprobs_KWV = logits_KWV.float().log_softmax(-1)
    return [logprobs_KWV[k, torch.arange(len(r)), torch.tensor(r)].tolist() for k, r in enumerate(replies_KR)]


def _sample(model, prompt_ids_P, k, temperature, max_new_tokens, eos, pad):
    """`k` replies sampled after the prompt, each cut after its end token, and the student's own per-token log-probs
    of them at temperature 1, read from `generate`'s raw logits (no second forward over the long prompt)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids_P] * k), attention_mask=torch.ones(k, len(prompt_ids_P),
            dtype=torch.long), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=max_new_tokens, pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    generated_KN = out.sequences[:, len(prompt_ids_P) :].tolist()
    logprobs_KNV = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # raw logits, before the temperature
    replies = [r[: r.index(eos) + 1] if eos in r else r for r in generated_KN]  # up to and with the end token
    student = [logprobs_KNV[j, torch.arange(len(r)), torch.tensor(r)].tolist() for j, r in enumerate(replies)]
    return replies, student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Default: SmolLM2-135M-Instruct from PyPI (converted GGUF).")
    parser.add_argument("--squad", default=None, help="SQuAD-format JSON (default: SQuAD v1.1 dev from PyPI).")
    parser.add_argument("--num", type=int, default=40, help="Long prompts (training articles).")
    parser.add_argument("--samples", type=int, default=4, help="Sampled replies per prompt.")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="demo --real's sampling temperature.")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--eval-tokens", type=int, default=24,
        help="Also score each reply's first N tokens: what demo --real's evaluation (24 greedy tokens) would see.",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="real_advantage.json")
    args = parser.parse_args(argv)
    for flag, value in (("--num", args.num), ("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens),
                        ("--eval-tokens", args.eval_tokens)):  # fmt: skip
        if value < 1:
            parser.error(f"{flag} {value} must be at least 1.")
    if args.temperature <= 0:
        parser.error(f"--temperature {args.temperature} must be positive (replies are sampled, as in training).")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_opsdl.data.squad import build_squad_pairs, load_squad, split_articles
    from trl_opsdl.downloads import squad_path
    from trl_opsdl.evaluation import contains_answer
    from trl_opsdl.gguf import prepare_model
    from trl_opsdl.tokenization import prompt_ids

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the experiments' step timer
    from step_timing import host_speed

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    model_path = prepare_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    articles = load_squad(args.squad or squad_path())
    train, _ = split_articles(articles, min(12, len(articles) - 1), seed=0)  # demo --real's training articles
    rows = build_squad_pairs(train, tokenizer, [args.length], num_samples=args.num, seed=args.seed + 500).to_list()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    samples = []
    for i, row in enumerate(rows):
        long_ids, short_ids = prompt_ids(tokenizer, row["prompt"]), prompt_ids(tokenizer, row["teacher_prompt"])
        replies, student = _sample(model, long_ids, args.samples, args.temperature, args.max_new_tokens, eos, pad)
        teacher = _reply_logprobs(model, short_ids, replies, pad)
        for reply, s, t in zip(replies, student, teacher):
            text = tokenizer.decode(reply, skip_special_tokens=True)
            head = tokenizer.decode(reply[: args.eval_tokens], skip_special_tokens=True)
            samples.append({
                "prompt": i, "contained": contains_answer(text, row["answers"]) > 0, "tokens": len(reply),
                "ended": reply[-1] == eos, "contained_in_eval_tokens": contains_answer(head, row["answers"]) > 0,
                "advantage": sum(a - b for a, b in zip(t, s)) / len(reply),
                "teacher_logprob": sum(t) / len(reply), "student_logprob": sum(s) / len(reply),
            })  # fmt: skip
        print(f"prompt {i + 1}/{len(rows)}: {sum(x['contained'] for x in samples[-args.samples:])} of "
              f"{args.samples} replies contain the answer", flush=True)  # fmt: skip

    def mean(values):
        return round(sum(values) / len(values), 4) if values else None

    by_class = {}
    for name, flag in (("contained", True), ("not_contained", False)):
        group = [x for x in samples if x["contained"] == flag]
        by_class[name] = {"replies": len(group), **{key: mean([x[key] for x in group])
                                                     for key in ("advantage", "teacher_logprob", "student_logprob")}}  # fmt: skip
    # Within one prompt: every (contained, not contained) pair of its replies; ties count half.
    wins, pairs = 0.0, 0
    for i in range(len(rows)):
        mine = [x for x in samples if x["prompt"] == i]
        for right in (x for x in mine if x["contained"]):
            for wrong in (x for x in mine if not x["contained"]):
                pairs += 1
                wins += 1.0 if right["advantage"] > wrong["advantage"] else 0.5 if right["advantage"] == wrong[
                    "advantage"] else 0.0  # fmt: skip
    report = {
        "prompts": len(rows), "samples_per_prompt": args.samples, "length": args.length,
        "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "by_class": by_class,
        # how many replies end before the limit, and how many contain the answer within the first --eval-tokens
        # tokens (what a 24-token evaluation would count) against anywhere in the reply
        "replies": {"ended": sum(x["ended"] for x in samples), "contained": sum(x["contained"] for x in samples),
                    "contained_in_eval_tokens": sum(x["contained_in_eval_tokens"] for x in samples),
                    "eval_tokens": args.eval_tokens, "mean_tokens": mean([x["tokens"] for x in samples])},
        "within_prompt": {"pairs": pairs, "contained_has_higher_advantage": round(wins / pairs, 3) if pairs else None,
                          "prompts_with_both": sum(len({x["contained"] for x in samples if x["prompt"] == i}) == 2
                                                   for i in range(len(rows)))},
        "host": host_speed(), "samples": samples,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
