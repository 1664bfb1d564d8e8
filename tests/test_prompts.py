from __future__ import annotations

from headline_bench.data.prompts import build_prompt, clean_headline

TEMPLATE = "Generate a concise headline for the following news summary: {summary}"


def test_base_model_prompt_is_few_shot_ending_in_headline_label() -> None:
    shots = [{"summary": "A.", "headline": "H1"}]
    prompt = build_prompt(" The council voted. ", TEMPLATE, shots, chat=False)
    assert prompt == f"{TEMPLATE.format(summary='A.')}\nHeadline: H1\n\n{TEMPLATE.format(summary='The council voted.')}\nHeadline:"


class ChatTok:
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):  # noqa: ANN001, ANN201
        assert not tokenize and add_generation_prompt
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_chat_prompt_uses_template_with_instruction() -> None:
    prompt = build_prompt("S.", TEMPLATE, [], chat=True, tokenizer=ChatTok())
    assert prompt == f"<user>{TEMPLATE.format(summary='S.')}</user><assistant>"


def test_clean_headline_keeps_first_line_without_quotes_or_label() -> None:
    assert clean_headline('\n  "Council Freezes Taxes"\nmore text') == "Council Freezes Taxes"
    assert clean_headline("Headline: City Votes") == "City Votes"
    assert clean_headline("   \n ") == ""


class BosTok:
    bos_token, bos_token_id = "<bos>", 2

    def __call__(self, text):  # noqa: ANN001, ANN204
        return {"input_ids": [2, 100]}


def test_base_prompt_starts_with_bos_when_the_tokenizer_adds_one() -> None:
    """Prompts are tokenized without special tokens, so a base model's BOS must be in the text (gemma needs it)."""
    assert build_prompt("S.", TEMPLATE, [], chat=False, tokenizer=BosTok()).startswith("<bos>Generate")
