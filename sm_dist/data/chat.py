"""Chat rows (`messages`): checked and split into the turns before the answer and the answer, and the
prompt rendered with the tokenizer's own chat template (see `sm_dist.data.datasets`' docstring for the
rules, and why a conversation with several assistant turns is refused)."""

from __future__ import annotations

from sm_dist.data.sources import BadRow
from sm_dist.errors import DataError

MESSAGES = "messages"  # the field of a chat row


def split_messages(turns) -> tuple[tuple[dict, ...], str]:
    """A `messages` row -> (the turns before the answer, the answer: the last, assistant, turn)."""
    if not isinstance(turns, list) or not turns:
        raise BadRow("bad_messages", f"field {MESSAGES!r} must be a non-empty list of turns")
    for t in turns:
        if not (isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)):
            raise BadRow("bad_messages", f"a turn must be {{'role': str, 'content': str}}, got {str(t)[:80]}")
    roles = [t["role"] for t in turns]
    if roles[-1] != "assistant":
        raise BadRow("bad_messages", f"the last turn is {roles[-1]!r}; it must be the assistant's answer")
    if roles.count("assistant") > 1:
        raise BadRow(
            "multi_assistant",
            f"{roles.count('assistant')} assistant turns: a row trains one answer (the trace has no per-token "
            "roles to mark earlier assistant turns inside the context); split it into one row per assistant turn",
        )
    return tuple({"role": t["role"], "content": t["content"]} for t in turns[:-1]), turns[-1]["content"]


def chat_prompt_ids(tokenizer, messages) -> list[int]:
    """The prompt of a chat row: the tokenizer's chat template over the turns before the answer, with
    the assistant's generation prompt, as ids (the template's own BOS included)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            getattr(tokenizer, "name_or_path", "the tokenizer"), "has no chat template, and the data has chat rows (messages).",
            "use a model whose tokenizer_config.json has a chat_template, or rows with prompt/answer fields",
        )  # fmt: skip
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
