"""Prompt building and headline clean-up, shared by every backend so all techniques see the same text."""

from __future__ import annotations

from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with BOS (gemma does, and generates garbage without it).

    Prompts are tokenized with add_special_tokens=False because chat templates already hold BOS, so base
    model prompts carry the BOS text themselves.
    """
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def build_prompt(summary: str, template: str, few_shot: list[dict[str, str]], chat: bool, tokenizer: Any = None, date: str | None = None) -> str:
    """The task prompt for one summary.

    Chat models get the instruction as a user turn through their chat template. Base models (no template)
    get the same instruction in a few-shot block ending in "Headline:", so that the first line they write
    is the headline.

    Args:
        summary: the news summary.
        template: the instruction with a `{summary}` field.
        few_shot: example {summary, headline} pairs for base models.
        chat: use the tokenizer's chat template.
        tokenizer: needed when `chat` is true; for base models it tells whether to start with BOS.
        date: the date chat templates print (Llama 3.x writes "Today Date" from the clock unless given
            `date_string`): fixed, so that a prompt does not depend on the day it is built.
    """
    instruction = template.format(summary=summary.strip())
    if chat:
        messages = [{"role": "user", "content": instruction}]
        extra = {"date_string": date} if date else {}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    bos = tokenizer.bos_token if tokenizer is not None and adds_bos(tokenizer) else ""
    shots = "".join(f"{template.format(summary=s['summary'].strip())}\nHeadline: {s['headline'].strip()}\n\n" for s in few_shot)
    return f"{bos}{shots}{instruction}\nHeadline:"


def clean_headline(text: str) -> str:
    """Keep the first non-empty line, without surrounding quotes or a 'Headline:' label."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            break
    else:
        return ""
    if line.lower().startswith("headline:"):
        line = line[len("headline:") :].strip()
    return line.strip().strip('"').strip("*").strip()
