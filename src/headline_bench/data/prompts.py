"""Prompt building and headline clean-up, shared by every engine so all techniques see the same text."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headline_bench.settings import Prompt as PromptSettings

SLOT = "\ue000summary\ue000"  # stands for the summary while the template is rendered (a private-use character)


class Prompt(str):
    """A prompt's text that remembers which parts are trusted (the template, few-shot examples) and which
    are data (the summary), so backends tokenize data as plain text: control-token strings inside an article
    (`<|im_end|>`, `<start_of_turn>`, `[INST]`, ...) cannot end the user turn or open an assistant turn.

    It is still a str (the text every backend saw before); `ids` is set by the generate stage with the
    model's tokenizer (safe_ids), `controls` holds the control-token strings of that tokenizer.
    """

    parts: tuple[tuple[str, bool], ...]
    ids: list[int] | None
    controls: frozenset[str]

    def __new__(cls, parts: Iterable[tuple[str, bool]]) -> Prompt:
        parts = tuple((text, trusted) for text, trusted in parts if text)
        prompt = super().__new__(cls, "".join(text for text, _ in parts))
        prompt.parts, prompt.ids, prompt.controls = parts, None, frozenset()
        return prompt


def control_strings(tokenizer: Any) -> frozenset[str]:
    """Every added token of a transformers tokenizer (special or not) that is more than whitespace: the
    strings its tokenizer would turn into a control token wherever they appear in text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {t.content for t in added.values()} | set(getattr(tokenizer, "all_special_tokens", []) or [])
    return frozenset(t for t in texts if t.strip())


def split_controls(text: str, controls: Iterable[str]) -> list[str]:
    """Cut `text` one character into every occurrence of a control string, so no piece holds one whole."""
    cuts = sorted({m.start() + 1 for c in controls if len(c) > 1 for m in re.finditer(re.escape(c), text)})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if b > a]


def safe_ids(parts: Iterable[tuple[str, bool]], tokenize: Callable[[str, bool], list[int]], controls: Iterable[str]) -> list[int]:
    """Token ids of a prompt whose untrusted parts are tokenized as plain text.

    When no untrusted part holds a control string, this is the whole text tokenized at once (exactly the
    ids the prompt string always had). Otherwise each part is tokenized on its own, the template with
    special tokens parsed and the data without (split inside every control string, for tokenizers that
    parse added tokens even with special parsing off). Whitespace before the data moves into it, as
    byte-level pre-tokenizers attach a space to the following word.

    Args:
        parts: (text, trusted) pairs in order.
        tokenize: (text, parse_special) -> ids, without BOS/EOS added.
        controls: the tokenizer's control-token strings (control_strings).
    """
    parts, controls = list(parts), list(controls)
    if not any(c in text for text, trusted in parts if not trusted for c in controls):
        return tokenize("".join(text for text, _ in parts), True)
    ids: list[int] = []
    carry = ""
    for i, (text, trusted) in enumerate(parts):
        text, carry = carry + text, ""
        if trusted:
            if i + 1 < len(parts) and not parts[i + 1][1]:
                stripped = text.rstrip()
                text, carry = stripped, text[len(stripped) :]
            ids += tokenize(text, True) if text else []
        else:
            for piece in split_controls(text, controls):
                ids += tokenize(piece, False)
    return ids


def hf_tokenize(tokenizer: Any) -> Callable[[str, bool], list[int]]:
    """A transformers tokenizer as safe_ids' `tokenize`: special-token parsing on or off, no BOS/EOS added."""

    def tokenize(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]

    return tokenize


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts plain text with BOS (gemma does, and generates garbage without it).

    Prompts are tokenized with add_special_tokens=False because chat templates already hold BOS, so base
    model prompts carry the BOS text themselves.
    """
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def build_prompt(summary: str, template: str, few_shot: list[dict[str, str]], chat: bool, tokenizer: Any = None, date: str | None = None) -> Prompt:
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

    Returns:
        the prompt text, as a Prompt that marks the summary as untrusted data.
    """
    instruction = template.format(summary=SLOT)  # the summary goes in after rendering: it never passes through a template
    if chat:
        messages = [{"role": "user", "content": instruction}]
        extra = {"date_string": date} if date else {}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    else:
        bos = tokenizer.bos_token if tokenizer is not None and adds_bos(tokenizer) else ""
        shots = "".join(f"{template.format(summary=s['summary'].strip())}\nHeadline: {s['headline'].strip()}\n\n" for s in few_shot)
        text = f"{bos}{shots}{instruction}\nHeadline:"
    pieces = text.split(SLOT)
    parts: list[tuple[str, bool]] = [(pieces[0], True)]
    for piece in pieces[1:]:
        parts += [(summary.strip(), False), (piece, True)]
    return Prompt(parts)


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


def prompts_for(rows: list[dict[str, Any]], tokenizer: Any, settings: PromptSettings, limit: int) -> tuple[list[Prompt], list[dict[str, Any]], list[dict[str, Any]]]:
    """Build prompts with their token ids (the summary tokenized as plain text: prompts.safe_ids); rows whose
    prompt exceeds `limit` tokens are set aside with a reason, not dropped."""
    shots = [s.model_dump() for s in settings.few_shot]
    chat = has_chat_template(tokenizer)
    controls = control_strings(tokenizer)
    prompts, kept, too_long = [], [], []
    for row in rows:
        prompt = build_prompt(row["summary"], settings.template, shots, chat, tokenizer, settings.date)
        prompt.ids, prompt.controls = safe_ids(prompt.parts, hf_tokenize(tokenizer), controls), controls
        n = len(prompt.ids)
        if n > limit:
            too_long.append({**row, "prediction": None, "skipped": f"prompt has {n} tokens > limit {limit}"})
            continue
        prompts.append(prompt)
        kept.append(row)
    return prompts, kept, too_long
