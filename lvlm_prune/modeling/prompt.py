"""Conversation templates: how a question (and optional context) becomes the LVLM's prompt text."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

# LLaVA's `conv_vicuna_v1` (conversation modes "v1" / "vicuna_v1"), which LLaVA-1.5 trains and evaluates with; its
# `conv_llava_v1` says "human" instead of "user"
LLAVA15_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """LLaVA-1.5's `vicuna_v1` layout: `{system} USER: <image>\\n{context}{question} ASSISTANT: {answer}</s>`.

    Args:
        system: system message ('' drops it; the tiny default does, to save ~30 tokens per sample).
        user_role: role name of the human turn.
        assistant_role: role name of the model turn.
        separator: between the system message and the first turn, and between turns.
        end_of_answer: appended to every answer in training targets (the tokenizer's EOS).
    """

    system: str = LLAVA15_SYSTEM
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    separator: str = " "
    end_of_answer: str = "</s>"

    def prompt(self, question: str, context: str | None = None, with_image: bool = True) -> str:
        """The text up to and including `ASSISTANT:`; generation continues from there."""
        if not question or not question.strip():
            raise ValueError("empty question: every sample needs a non-empty question text")
        image = f"{IMAGE_PLACEHOLDER}\n" if with_image else ""
        context_text = f"{context}\n" if context else ""
        head = f"{self.system}{self.separator}" if self.system else ""
        return f"{head}{self.user_role}: {image}{context_text}{question.strip()}{self.separator}{self.assistant_role}:"

    def next_turn(self, question: str) -> str:
        """A later user turn of a multi-turn conversation (after the previous answer's end token)."""
        if not question or not question.strip():
            raise ValueError("empty question in a later conversation turn")
        return f"{self.user_role}: {question.strip()}{self.separator}{self.assistant_role}:"

    def target(self, answer: str) -> str:
        """The text the model must produce after the prompt (leading space as LLaVA's separator)."""
        return f" {answer.strip()}{self.end_of_answer}"


VICUNA_V1 = ConversationTemplate()
TINY_DEFAULT = ConversationTemplate(system="")

TEMPLATES = {"vicuna_v1": VICUNA_V1, "tiny": TINY_DEFAULT}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
