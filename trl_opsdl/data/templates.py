"""Prompt templates and prompt rendering shared by the builders, the extractors and the evaluation.

A row of every OPSDL dataset holds a long `prompt` (full context + question) and a short `teacher_prompt` (the
relevant evidence + the same question). Both are rendered from the same template, so they differ only in the context.
Token counting lives in `trl_opsdl.tokenization`; fitting a prompt to a token budget in `trl_opsdl.data.lengths`.
"""

# Multi-document QA (LongBench's multi-document template, with "documents" for "passages").
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
MULTI_DOC_QA_TEMPLATE = (
    QA_INSTRUCTION
    + "\n\nThe following are given documents.\n\n{context}\n\n"
    + QA_INSTRUCTION
    + "\n\nQuestion: {question}"
)
# Single context + question, for user data.
QA_TEMPLATE = (
    "Read the text and answer the question. Only give me the answer and do not output any other words.\n\n"
    "{context}\n\nQuestion: {question}"
)
QA_ANSWER_PREFIX = "\nAnswer:"


def render_prompt(template: str, context: str, question: str, answer_prefix: str = "", conversational: bool = False):
    """
    Fill `template` (with `{context}` and `{question}` fields) and return a plain prompt or a one-message conversation.

    Args:
        template (`str`):
            Format string with the fields `{context}` and `{question}`.
        context (`str`):
            The (long or short) context.
        question (`str`):
            The question, inserted verbatim.
        answer_prefix (`str`, *optional*, defaults to `""`):
            Text appended to a plain prompt to start the answer (RULER's convention). A conversational prompt ends
            with the user turn, so the prefix is left out there: the chat template opens the assistant turn.
        conversational (`bool`, *optional*, defaults to `False`):
            Return `[{"role": "user", "content": ...}]` instead of a string.
    """
    # `str.format` would choke on braces inside the context or question: substitute the two fields only.
    text = template.replace("{question}", "\0QUESTION\0").replace("{context}", "\0CONTEXT\0")
    text = text.replace("\0QUESTION\0", question).replace("\0CONTEXT\0", context)
    if conversational:
        return [{"role": "user", "content": text}]
    return text + answer_prefix


def replace_context(prompt, context: str, short_context: str):
    """Return `prompt` with its (only) occurrence of `context` replaced by `short_context`, keeping the template."""
    if isinstance(prompt, str):
        if context not in prompt:
            raise ValueError(
                "The row's `context` does not occur verbatim in its `prompt`; cannot swap in a short one."
            )
        return prompt.replace(context, short_context, 1)
    messages = [dict(m) for m in prompt]
    for message in messages:
        if isinstance(message.get("content"), str) and context in message["content"]:
            message["content"] = message["content"].replace(context, short_context, 1)
            return messages
    raise ValueError("The row's `context` does not occur verbatim in any message of its `prompt`.")
