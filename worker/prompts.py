"""From a claimed run to a model input: history trimmed to a token budget, rendered in the prompt
format of the routed model, placed into the model's input mapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.config import ModelProfile, Settings


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def estimate_tokens(text: str) -> int:
    """A cheap upper-side estimate (about four characters a token) for budgets and for models
    that report no token counts."""
    return len(text) // 4 + 1


def fit_history(system_prompt: str, history: list[Turn], current: str, budget: int) -> list[Turn]:
    """The newest turns that fit in `budget` tokens together with the system prompt and the
    current message (which are always kept), oldest first."""
    used = estimate_tokens(system_prompt) + estimate_tokens(current) + 8
    kept: list[Turn] = []
    for turn in reversed(history):
        cost = estimate_tokens(turn.content) + 4
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    return kept


def render_llama3(system_prompt: str, history: list[Turn], current: str) -> str:
    """Llama 3's chat template, ending with the assistant header the model continues from."""
    parts = ["<|begin_of_text|>"]

    def add(role: str, text: str) -> None:
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>")

    add("system", system_prompt)
    for turn in history:
        # Tool results and extra system notes reach the model as context of the turn they follow.
        role = turn.role if turn.role in ("user", "assistant") else "system" if turn.role == "system" else "ipython"
        add(role, turn.content)
    add("user", current)
    parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def render_plain(system_prompt: str, history: list[Turn], current: str) -> str:
    """A plain transcript for models that take one free-text prompt (vision models)."""
    lines = [system_prompt.strip(), ""] if system_prompt.strip() else []
    names = {"user": "User", "assistant": "Assistant", "system": "System", "tool": "Tool"}
    for turn in history:
        lines.append(f"{names.get(turn.role, turn.role)}: {turn.content.strip()}")
    lines.append(f"User: {current.strip()}" if history else current.strip())
    return "\n".join(lines)


RENDERERS = {"llama3": render_llama3, "plain": render_plain}


@dataclass(frozen=True)
class ModelRequest:
    model: ModelProfile
    route: str  # "chat" or "vision"
    input: dict[str, Any]
    prompt_tokens_estimate: int
    history_used: int


def fill_input(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    filled = {}
    for key, value in template.items():
        if isinstance(value, str) and value.startswith("$") and value[1:] in values:
            filled[key] = values[value[1:]]
        else:
            filled[key] = value
    return filled


def build_request(settings: Settings, history: list[dict[str, Any]], content: str, image_url: str | None) -> ModelRequest:
    """Route (an image goes to the vision model) and render the input for one claimed message."""
    model, route = (settings.vision_model, "vision") if image_url else (settings.chat_model, "chat")
    turns = [Turn(h["role"], h["content"]) for h in history]
    kept = fit_history(settings.system_prompt, turns, content, settings.context_token_budget)
    prompt = RENDERERS[model.prompt_format](settings.system_prompt, kept, content)
    values = {
        "prompt": prompt,
        "system_prompt": settings.system_prompt,
        "image": image_url,
        "max_tokens": settings.max_output_tokens,
        "temperature": settings.temperature,
    }
    return ModelRequest(model, route, fill_input(model.input, values), estimate_tokens(prompt), len(kept))
