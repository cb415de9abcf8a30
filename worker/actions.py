"""Actions the model may propose and the user approves: a registry of Python handlers.

    registry = ActionRegistry()

    @registry.action("create_reminder", "Create a reminder; payload: {\\"text\\": str, \\"at\\": ISO time}")
    async def create_reminder(context: ActionContext, payload: dict) -> dict:
        ...
        return {"reminder_id": ...}

The worker registers the types in `assistant_action_types` at start (only registered types are
stored when proposed), executes approved requests with their handler, and records `executed`
with the result or `failed` with the error, plus a `tool` message in the thread."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from worker.store import RunStore

log = logging.getLogger("worker.actions")


@dataclass(frozen=True)
class ActionContext:
    store: RunStore
    request_id: uuid.UUID
    user_id: uuid.UUID
    thread_id: uuid.UUID


Handler = Callable[[ActionContext, dict[str, Any]], Awaitable[dict[str, Any]]]


class ActionError(Exception):
    """A handler's refusal, shown to the user as the reason the action failed."""


@dataclass
class ActionType:
    name: str
    description: str
    handler: Handler
    payload_schema: dict[str, Any] = field(default_factory=dict)


class ActionRegistry:
    def __init__(self) -> None:
        self.types: dict[str, ActionType] = {}

    def action(self, name: str, description: str, payload_schema: dict[str, Any] | None = None
               ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.types[name] = ActionType(name, description, handler, payload_schema or {})
            return handler

        return register

    def as_rows(self) -> list[dict[str, Any]]:
        return [{"name": t.name, "description": t.description, "payload_schema": t.payload_schema}
                for t in self.types.values()]

    async def execute(self, store: RunStore, request: dict[str, Any]) -> str:
        """Runs one claimed request and records its outcome. Returns the final status."""
        action = self.types.get(request["action_type"])
        context = ActionContext(store, uuid.UUID(str(request["id"])), uuid.UUID(str(request["user_id"])),
                                uuid.UUID(str(request["thread_id"])))
        succeeded, result, error = False, None, None
        if action is None:
            error = f"no handler is registered for {request['action_type']}"
        else:
            try:
                result = await action.handler(context, dict(request.get("payload") or {}))
                succeeded = True
            except ActionError as exc:
                error = str(exc)
            except Exception as exc:  # a handler's bug must not stop the worker
                log.exception("action handler crashed", extra={"event": "action.crashed", "action_request_id": str(context.request_id)})
                error = f"{type(exc).__name__}: {exc}"
        status = await store.call("finish_action_request", {"p_id": context.request_id, "p_succeeded": succeeded,
                                                            "p_result": result, "p_error": error})
        log.info("action finished", extra={"event": "action.finished", "action_request_id": str(context.request_id),
                                           "action_type": request["action_type"], "status": status})
        return str(status)


default_registry = ActionRegistry()


@default_registry.action(
    "update_profile_preferences",
    'Remember preferences in the user\'s profile; payload: {"preferences": {"key": "value", …}}',
    {"type": "object", "required": ["preferences"], "properties": {"preferences": {"type": "object"}}},
)
async def update_profile_preferences(context: ActionContext, payload: dict[str, Any]) -> dict[str, Any]:
    preferences = payload.get("preferences")
    if not isinstance(preferences, dict) or not preferences:
        raise ActionError("payload.preferences must be a non-empty object")
    merged = await context.store.call("apply_profile_preferences",
                                      {"p_user_id": context.user_id, "p_preferences": preferences})
    return {"preferences": merged}
