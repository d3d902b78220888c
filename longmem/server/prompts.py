"""Chat messages -> one prompt string.

A tokenizer with a chat template uses it (`apply_chat_template`, with the generation
prompt). One without (the default model's) gets a plain transcript in the layout of
`longmem.chat` ("User: ...\nAssistant:"), one turn per line:

    System: ...
    User: ...
    Assistant:

and generation stops where the model starts the next user or system turn (`CHAT_STOPS`).
"""

from __future__ import annotations

from longmem.chat import STOP_STRINGS

CHAT_STOPS = [*STOP_STRINGS, "\nSystem:"]
LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, list[str]]:
    """(prompt text, stop strings the layout needs) for `messages` [{"role", "content"}, ...]."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), []
    lines = [f"{LABELS[m['role']]}: {m['content']}\n" for m in messages]
    return "".join(lines) + "Assistant:", list(CHAT_STOPS)
