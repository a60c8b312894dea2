"""Chat rendering shared by training data and decoding (core: no datamodule or module imports)."""

from __future__ import annotations


def render_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Token ids of the chat-formatted prompt up to the assistant turn (what generation sees)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)
