"""The one prompt builder (SPEC §5), shared by training, rollout, evaluation and inference.

Messages: system (format rules), user = [image, instruction]. The rollout prompt is the
teacher-forced prompt minus the assistant turn plus the generation prompt; we guarantee that by
construction: the teacher-forced sequence is ``prompt_ids + assistant_ids + [<|im_end|>]`` where
``prompt_ids`` is exactly what generation starts from.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are an object detector. Answer with ONE JSON object and nothing else. Keys are \"object_1\", "
    "\"object_2\", ... in reading order (top to bottom, then left to right). Each value is "
    "{\"desc\": <short description>, \"bbox_2d\": [x1, y1, x2, y2]} or {\"desc\": ..., \"poly\": [[x, y], ...]} "
    "with every coordinate written as a coord token <|coord_0|>..<|coord_999|> (0 = left/top edge, "
    "999 = right/bottom edge). If there is nothing to detect, answer {}."
)
USER_PROMPT = "Detect every object in the image."


def build_messages(system_prompt: str = SYSTEM_PROMPT, user_prompt: str = USER_PROMPT) -> list[dict]:
    """Chat messages without the assistant turn (the image comes first in the user turn)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": system_prompt}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_prompt}]},
    ]


def prompt_text(chat_template_owner, system_prompt: str = SYSTEM_PROMPT, user_prompt: str = USER_PROMPT) -> str:
    """Render the generation prompt (``... <|im_start|>assistant\\n``) with the tokenizer's or
    processor's chat template. One image placeholder; the processor expands it."""
    return chat_template_owner.apply_chat_template(
        build_messages(system_prompt, user_prompt), tokenize=False, add_generation_prompt=True
    )
