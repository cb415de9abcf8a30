"""Bring your own key: the Replicate token of a user on a `uses_own_key` plan.

With Supabase Vault the database hands the decrypted token to the worker. Without Vault a token
set by the user waits as `pending` (readable by no client) until the worker encrypts it with
BYOK_ENCRYPTION_KEY (Fernet); from then on only the ciphertext is stored. Tokens are never logged."""

from __future__ import annotations

import logging
import uuid

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

from worker.provider import ProviderError
from worker.store import RunStore

log = logging.getLogger("worker.byok")


class UserTokens:
    def __init__(self, store: RunStore, key: SecretStr | None) -> None:
        self.store = store
        self.fernet = Fernet(key.get_secret_value().encode()) if key else None

    async def token_for(self, user_id: uuid.UUID) -> str:
        stored = await self.store.replicate_token(user_id)
        if not stored:
            raise ProviderError("byok_token_missing", "no Replicate token is set for this user", retryable=False)
        if stored["source"] in ("vault", "pending"):
            if stored["source"] == "pending":
                await self._encrypt(user_id, int(stored["version"]), stored["token"])
            return str(stored["token"])
        if self.fernet is None:
            raise ProviderError("byok_token_unreadable", "BYOK_ENCRYPTION_KEY is not set", retryable=False)
        try:
            return self.fernet.decrypt(stored["ciphertext"].encode()).decode()
        except InvalidToken:
            raise ProviderError("byok_token_unreadable", "the stored token does not decrypt with BYOK_ENCRYPTION_KEY",
                                retryable=False) from None

    async def _encrypt(self, user_id: uuid.UUID, version: int, token: str) -> None:
        if self.fernet is None:
            return
        ciphertext = self.fernet.encrypt(token.encode()).decode()
        if await self.store.store_encrypted_replicate_token(user_id, version, ciphertext):
            log.info("byok token encrypted", extra={"event": "byok.encrypted", "user_id": str(user_id)})

    async def encrypt_pending(self) -> int:
        """Encrypts every token still waiting in plain form. Returns how many."""
        if self.fernet is None:
            return 0
        pending = await self.store.pending_replicate_tokens()
        for row in pending:
            await self._encrypt(uuid.UUID(str(row["user_id"])), int(row["version"]), row["token"])
        return len(pending)
