"""Chat templates: a list of messages -> the prompt text, one simple template per model style.

Our models are pre-trained on plain text (or trained as agents on their game's prompts), not tuned on a
chat format, so these templates are conventions a client can rely on, not what the models learned:

    gpt2   "System: {system}\n\nUser: {user}\n\nAssistant: {assistant}\n\n ... Assistant:"
           (a plain-text dialogue, the way GPT-2 era models were prompted)
    llama  "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} [INST] {user} [/INST]"
           (the Llama-2 chat layout; <s></s> are left out: our tokenizers have no such tokens)

Every turn's role is system, user or assistant; the prompt always ends where the assistant's reply begins.
Nothing is added to `stop`: a reply ends at <|endoftext|>, `max_tokens`, or the client's `stop` strings.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ROLES", "STYLES", "render"]

ROLES = ("system", "user", "assistant")
STYLES = ("gpt2", "llama")


def render(style: str, messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for (role, content) pairs under `style`'s template."""
    if style == "gpt2":
        turns = [f"{role.capitalize()}: {content}\n\n" for role, content in messages]
        return "".join(turns) + "Assistant:"
    if style == "llama":
        out, system = [], None
        for role, content in messages:
            if role == "system":
                system = content if system is None else f"{system}\n{content}"
            elif role == "user":
                head = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system is not None else ""
                system = None
                out.append(f"[INST] {head}{content} [/INST]")
            else:
                out.append(f" {content} ")
        if system is not None:  # a system message after the last user turn still reaches the model
            out.append(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n [/INST]")
        return "".join(out)
    raise ValueError(f"no chat template for model style {style!r}; known: {', '.join(STYLES)}")
