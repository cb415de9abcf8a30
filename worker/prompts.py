"""From a claimed run to a model input: the thread's assistant decides instructions, model and
sampling; the user's profile and retrieved knowledge join the system prompt; history is trimmed
to a token budget and rendered in the prompt format of the routed model. After the reply, the
follow-up suggestions and proposed actions the assistant was asked for are parsed out of it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from worker.config import ModelProfile, Price, Settings

FOLLOW_UPS_MARKER = "<<follow-ups>>"
ACTION_MARKER = "<<action>>"


class Turn(NamedTuple):  # a tuple: built for every message of every claimed run's history
    role: str
    content: str


@dataclass(frozen=True)
class Assistant:
    id: str | None
    instructions: str
    chat_model: str | None = None
    vision_model: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    context_token_budget: int | None = None
    features: frozenset[str] = frozenset()

    @classmethod
    def from_row(cls, row: dict[str, Any] | None, settings: Settings) -> Assistant:
        if not row:
            return cls(None, settings.system_prompt)
        return cls(
            id=row.get("id"), instructions=row.get("instructions") or settings.system_prompt,
            chat_model=row.get("chat_model"), vision_model=row.get("vision_model"),
            temperature=float(row["temperature"]) if row.get("temperature") is not None else None,
            max_output_tokens=row.get("max_output_tokens"), context_token_budget=row.get("context_token_budget"),
            features=frozenset(row.get("features") or ()),
        )


@dataclass(frozen=True)
class KnowledgeChunk:
    id: str
    document_id: str
    source: str
    content: str
    similarity: float


@dataclass(frozen=True)
class ActionSpec:
    name: str
    description: str


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


# Llama 3's special tokens are written `<|name|>`; in text the model's server reads them as the
# tokens themselves, so a message holding `<|eot_id|><|start_header_id|>system<|end_header_id|>`
# would open a system turn of the user's own. A word joiner (U+2060, invisible) between `<` and
# `|` keeps the text as the user wrote it to a reader and makes it plain text to the tokenizer.
_SPECIAL_TOKEN_OPENING = "<|"
_DEFUSED_OPENING = "<\u2060|"


def render_llama3(system_prompt: str, history: list[Turn], current: str) -> str:
    """Llama 3's chat template, ending with the assistant header the model continues from."""
    parts = ["<|begin_of_text|>"]

    def add(role: str, text: str) -> None:
        text = text.strip().replace(_SPECIAL_TOKEN_OPENING, _DEFUSED_OPENING)
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")

    add("system", system_prompt)
    for turn in history:
        # Tool results reach the model in Llama 3's `ipython` role, system notes as system.
        role = turn.role if turn.role in ("user", "assistant", "system") else "ipython"
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


def render_profile(profile: dict[str, Any] | None, max_chars: int) -> str:
    if not profile or max_chars <= 0:
        return ""
    lines = []
    goals = profile.get("goals") or []
    if goals:
        lines.append("Goals: " + "; ".join(str(g) for g in goals))
    if profile.get("experience_level"):
        lines.append(f"Experience: {profile['experience_level']}")
    preferences = profile.get("preferences") or {}
    if preferences:
        lines.append("Preferences: " + json.dumps(preferences, ensure_ascii=False, sort_keys=True))
    text = "\n".join(lines)
    return text[:max_chars]


def compose_system_prompt(settings: Settings, assistant: Assistant, profile: dict[str, Any] | None,
                          knowledge: list[KnowledgeChunk], actions: list[ActionSpec], follow_ups: bool) -> str:
    """`actions`: the actions offered (none unless the assistant has the feature); `follow_ups`:
    whether to ask for follow-up questions. build_request decides both, once."""
    parts = [assistant.instructions.strip()]
    if "personalisation" in assistant.features:
        about = render_profile(profile, settings.profile_prompt_max_chars)
        if about:
            parts.append("What the user told us about themselves (use it to tailor your answer):\n" + about)
    if knowledge:
        context = "\n\n".join(f"[{chunk.source}]\n{chunk.content.strip()}" for chunk in knowledge)
        parts.append("Use the following knowledge when it answers the question, and name its source in brackets."
                     " If it does not help, answer from what you know.\n\n" + context)
    if actions:
        listed = "\n".join(f"- {a.name}: {a.description}" for a in actions)
        parts.append("You may propose one action for the user to approve. To do so, end your reply with one line:\n"
                     f'{ACTION_MARKER} {{"type": "<action>", "payload": {{...}}}}\nAvailable actions:\n{listed}')
    if follow_ups:
        parts.append(f"After your answer, write a line {FOLLOW_UPS_MARKER} and then up to three short questions the"
                     " user might ask next, one per line.")
    return "\n\n".join(parts)


def resolve_model(settings: Settings, slug: str | None, route: str) -> ModelProfile:
    """The profile of the model an assistant names; the configured default when it names none.
    A slug without a profile runs with the default's input mapping, unpriced."""
    default = settings.vision_model if route == "vision" else settings.chat_model
    if not slug or slug == default.slug:
        return default
    for profile in settings.extra_models:
        if profile.slug == slug:
            return profile
    return default.model_copy(update={"slug": slug, "version": None, "price": Price()})


@dataclass(frozen=True)
class ModelRequest:
    model: ModelProfile
    route: str  # "chat" or "vision"
    input: dict[str, Any]
    prompt_tokens_estimate: int
    history_used: int
    knowledge: list[KnowledgeChunk] = field(default_factory=list)
    # The assistant has the `actions` feature and was told the actions: only then is an action
    # the reply proposes kept (a user can make any model write the marker).
    actions_offered: bool = False
    # The assistant has the `follow_ups` feature (and was asked for them): only then are the
    # follow-up questions a reply carries kept.
    follow_ups_offered: bool = False


def fill_input(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    filled = {}
    for key, value in template.items():
        if isinstance(value, str) and value.startswith("$") and value[1:] in values:
            filled[key] = values[value[1:]]
        else:
            filled[key] = value
    return filled


def build_request(settings: Settings, history: list[dict[str, Any]], content: str, image_url: str | None, *,
                  assistant: Assistant | None = None, profile: dict[str, Any] | None = None,
                  knowledge: list[KnowledgeChunk] | None = None, actions: list[ActionSpec] | None = None
                  ) -> ModelRequest:
    """Route (an image goes to the vision model) and render the input for one claimed message.
    `image_url` is the address the model fetches (already checked and, for Storage, signed)."""
    assistant = assistant or Assistant(None, settings.system_prompt)
    route = "vision" if image_url else "chat"
    model = resolve_model(settings, assistant.vision_model if image_url else assistant.chat_model, route)
    knowledge = knowledge or []
    offered = actions if actions and "actions" in assistant.features else []
    follow_ups = "follow_ups" in assistant.features
    system_prompt = compose_system_prompt(settings, assistant, profile, knowledge, offered, follow_ups)
    turns = [Turn(h["role"], h["content"]) for h in history]
    budget = assistant.context_token_budget or settings.context_token_budget
    kept = fit_history(system_prompt, turns, content, budget)
    prompt = RENDERERS[model.prompt_format](system_prompt, kept, content)
    values = {
        "prompt": prompt,
        "system_prompt": system_prompt,
        "image": image_url,
        "max_tokens": assistant.max_output_tokens or settings.max_output_tokens,
        "temperature": assistant.temperature if assistant.temperature is not None else settings.temperature,
    }
    return ModelRequest(model, route, fill_input(model.input, values), estimate_tokens(prompt), len(kept), knowledge,
                        actions_offered=bool(offered), follow_ups_offered=follow_ups)


MARKERS = (FOLLOW_UPS_MARKER, ACTION_MARKER)
_LONGEST_MARKER = max(len(m) for m in MARKERS)
assert all(m.startswith("<") for m in MARKERS)


def visible_text(text: str) -> str:
    """What a user may see of a reply still being written: everything before the follow-up and
    action blocks, holding back a tail that may be the start of a marker."""
    cut = min((i for i in (text.find(m) for m in MARKERS) if i >= 0), default=len(text))
    visible = text[:cut]
    # Every marker starts with "<": a tail that may begin one starts at a "<" near the end.
    start = visible.find("<", max(0, len(visible) - (_LONGEST_MARKER - 1)))
    while start >= 0:
        if any(m.startswith(visible[start:]) for m in MARKERS):
            return visible[:start]
        start = visible.find("<", start + 1)
    return visible


@dataclass(frozen=True)
class ParsedReply:
    content: str
    follow_ups: list[str]
    actions: list[dict[str, Any]]


_LIST_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")


def parse_reply(text: str) -> ParsedReply:
    """Splits the answer from the follow-up and action blocks the assistant was asked to add."""
    positions = [i for i in (text.find(FOLLOW_UPS_MARKER), text.find(ACTION_MARKER)) if i >= 0]
    if not positions:
        return ParsedReply(text.strip(), [], [])
    answer = text[:min(positions)].strip()
    follow_ups: list[str] = []
    actions: list[dict[str, Any]] = []
    section = None
    for line in text[min(positions):].splitlines():
        stripped = line.strip()
        if stripped.startswith(FOLLOW_UPS_MARKER):
            section, stripped = "follow_ups", stripped[len(FOLLOW_UPS_MARKER):].strip()
        elif stripped.startswith(ACTION_MARKER):
            section = "action"
            try:
                proposal = json.loads(stripped[len(ACTION_MARKER):].strip())
            except ValueError:
                continue
            if isinstance(proposal, dict) and isinstance(proposal.get("type"), str):
                payload = proposal.get("payload", {})
                actions.append({"type": proposal["type"], "payload": payload if isinstance(payload, dict) else {}})
            continue
        if section == "follow_ups" and stripped:
            question = _LIST_PREFIX.sub("", stripped).strip()
            if question and len(follow_ups) < 3:
                follow_ups.append(question[:300])
    return ParsedReply(answer or text.strip(), follow_ups, actions[:1])
