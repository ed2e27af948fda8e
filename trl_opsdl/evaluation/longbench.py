"""LongBench (v1) and LongBench v2 records from local files, as evaluation rows with LongBench's own prompts."""

import os

from ..data.columns import build_from_columns
from ..data.reader import load_records
from ..data.templates import render_prompt
from ..tokenization import count_tokens
from .metrics import TASK_METRICS


_MULTI_DOC = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me "
    "the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)
# LongBench's prompts for its English tasks (adapted from its `dataset2prompt`; `{input}` is `{question}` here).
LONGBENCH_PROMPTS = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {question}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. Do not provide any explanation.\n\n"
        "Question: {question}\n\nAnswer:"
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
    ),
    "hotpotqa": _MULTI_DOC,
    "2wikimqa": _MULTI_DOC,
    "musique": _MULTI_DOC,
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}"
        "\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {question}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write "
        "a one-page summary of all the news.\n\nSummary:"
    ),
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{question}",
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{question}"
    ),
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{question}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, "
        "3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{question}\n\nPlease enter the number of the "
        'paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\n'
        "The answer is: "
    ),
    "lcc": "Please complete the code given below. \n{context}Now, the next line of code is:\n",
    "repobench-p": "Please complete the code given below. \n{context}{question}Next line of code:\n",
}
LONGBENCH_DEFAULT_PROMPT = (
    "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
    "above text, only give me the answer and do not output any other words.\n\nQuestion: {question}\nAnswer:"
)
LONGBENCH_V2_PROMPT = (
    "Please read the following text and answer the question below.\n\n<text>\n{context}\n</text>\n\n"
    "What is the correct answer to this question: {question}\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)


def _read_records(path: str):
    if not os.path.isfile(str(path)):
        raise ValueError(f"LongBench file {path!r} does not exist; pass a local .json or .jsonl file.")
    return load_records(str(path))


def _fit_context(tokenizer, template, context, question, conversational, max_length):
    """Cut the context in its middle (LongBench's convention) until the prompt has at most `max_length` tokens."""
    prompt = render_prompt(template, context, question, "", conversational)
    excess = count_tokens(tokenizer, prompt) - max_length
    while excess > 0:
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        keep = max(0, len(ids) - excess - 2)
        if keep == 0:
            raise ValueError(f"max_length={max_length} leaves no room for the context of a LongBench row.")
        head = tokenizer.decode(ids[: keep // 2], skip_special_tokens=True)
        tail = tokenizer.decode(ids[len(ids) - (keep - keep // 2) :], skip_special_tokens=True)
        context = head + "\n...\n" + tail
        prompt = render_prompt(template, context, question, "", conversational)
        excess = count_tokens(tokenizer, prompt) - max_length
    return context, prompt


def _finish(rows, extractor, tokenizer):
    from datasets import Dataset

    if not rows:
        raise ValueError("No LongBench records to load.")
    dataset = Dataset.from_list(rows)
    if extractor is not None:
        dataset = build_from_columns(dataset, extractor=extractor, tokenizer=tokenizer)
    return dataset


def load_longbench(path, task: str | None = None, tokenizer=None, max_length: int | None = None,
                   conversational: bool = False, extractor=None):  # fmt: skip
    """
    Load LongBench (v1) records (`context`, `input`, `answers`, `length`, `all_classes`, `dataset`) from a local file.

    Args:
        path (`str`):
            A `.jsonl` (LongBench's own files) or `.json` file.
        task (`str`, *optional*):
            The LongBench dataset name (e.g. `hotpotqa`), which picks the prompt and the metric. Defaults to each
            record's `dataset` field, else the file name.
        tokenizer / max_length (*optional*):
            With both, contexts are cut in the middle so that each prompt fits `max_length` tokens.
        conversational (`bool`, *optional*, defaults to `False`):
            One-user-message prompts.
        extractor (*optional*):
            Also build `teacher_prompt` with this extractor (see `trl_opsdl.data.build_from_columns`).

    Returns:
        [`~datasets.Dataset`] with `prompt` (and `teacher_prompt` with an extractor), `answers`, `task`, `metric`,
        `length` (LongBench-E's buckets of the record's word count: `0-4k`, `4-8k`, `8k+`), `num_words`,
        `all_classes`, `context`, `question`, `id`.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs the tokenizer that counts it.")
    rows = []
    default_task = task or os.path.splitext(os.path.basename(str(path)))[0]
    for i, record in enumerate(_read_records(path)):
        missing = [k for k in ("context", "input", "answers") if k not in record]
        if missing:
            raise ValueError(f"LongBench record {i} of {path} lacks {missing}; is this LongBench v1 data?")
        name = task or record.get("dataset") or default_task
        template = LONGBENCH_PROMPTS.get(name, LONGBENCH_DEFAULT_PROMPT)
        context, question = record["context"], record["input"]
        if max_length is not None:
            context, prompt = _fit_context(tokenizer, template, context, question, conversational, max_length)
        else:
            prompt = render_prompt(template, context, question, "", conversational)
        words = int(record.get("length") or len(record["context"].split()))
        rows.append({
            "prompt": prompt,
            "answers": [str(a) for a in record["answers"]],
            "task": name,
            "metric": TASK_METRICS.get(name, "token_f1"),
            "length": "0-4k" if words < 4000 else "4-8k" if words < 8000 else "8k+",
            "num_words": words,
            "all_classes": record.get("all_classes"),
            "context": context,
            "question": question,
            "id": str(record.get("_id", i)),
        })  # fmt: skip
    return _finish(rows, extractor, tokenizer)


def load_longbench_v2(path, tokenizer=None, max_length: int | None = None, conversational: bool = False,
                      extractor=None):  # fmt: skip
    """
    Load LongBench v2 four-choice records (`context`, `question`, `choice_A`..`choice_D`, `answer`, `difficulty`,
    `length`, `domain`) from a local `.json` or `.jsonl` file. Scored with `choice_accuracy` (random is 25%).

    Returns:
        [`~datasets.Dataset`] with `prompt` (and `teacher_prompt` with an extractor), `answers` (`[letter]`), `task`
        (`longbench_v2`), `metric`, `length` (`short`/`medium`/`long`), `difficulty`, `domain`, `context`,
        `question` (with the choices), `id`.
    """
    if max_length is not None and tokenizer is None:
        raise ValueError("max_length needs the tokenizer that counts it.")
    rows = []
    for i, record in enumerate(_read_records(path)):
        missing = [
            k
            for k in ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer")
            if k not in record
        ]
        if missing:
            raise ValueError(f"LongBench v2 record {i} of {path} lacks {missing}.")
        if str(record["answer"]).strip() not in ("A", "B", "C", "D"):
            raise ValueError(f"LongBench v2 record {i}: answer must be A, B, C or D, got {record['answer']!r}.")
        question = (
            record["question"].strip() + "\nChoices:\n" + "\n".join(f"({c}) {record[f'choice_{c}']}" for c in "ABCD")
        )
        context = record["context"]
        if max_length is not None:
            context, prompt = _fit_context(
                tokenizer, LONGBENCH_V2_PROMPT, context, question, conversational, max_length
            )
        else:
            prompt = render_prompt(LONGBENCH_V2_PROMPT, context, question, "", conversational)
        rows.append({
            "prompt": prompt,
            "answers": [str(record["answer"]).strip()],
            "task": "longbench_v2",
            "metric": "choice_accuracy",
            "length": record.get("length", "unknown"),
            "difficulty": record.get("difficulty"),
            "domain": record.get("domain"),
            "context": context,
            "question": question,
            "id": str(record.get("_id", i)),
        })  # fmt: skip
    return _finish(rows, extractor, tokenizer)
