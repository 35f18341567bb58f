"""What a call's checkpoint never holds: the fields an app keeps private (a card number, its
expiry and CVV, a password, a token) and, in every text of the conversation (what the caller
said, tool arguments and results), those fields' values and anything shaped like a card number
(a Luhn-valid run of 13 to 19 digits, spaces and dashes allowed)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

# Field names that are never written to a checkpoint (matched anywhere in the name, any case).
NEVER_KEPT = ("card", "cvv", "cvc", "expir", "password", "passcode", "secret", "token", "ssn", "iban", "pin")


def fields_of(userdata: Any) -> dict[str, Any]:
    """A userdata's fields by name: a dataclass's, a dict's items, an object's attributes."""
    if dataclasses.is_dataclass(userdata) and not isinstance(userdata, type):
        return {f.name: getattr(userdata, f.name) for f in dataclasses.fields(userdata)}
    if isinstance(userdata, dict):
        return userdata
    return dict(getattr(userdata, "__dict__", {}))


_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
REDACTED = "[not kept]"


def private_values(userdata: Any, secret: re.Pattern[str]) -> list[str]:
    """The values of the private fields: they are also scrubbed from what was said."""
    if userdata is None:
        return []
    values = [str(v) for k, v in fields_of(userdata).items() if secret.search(k) and v not in (None, "")]
    return sorted({v for v in values if len(v) >= 3}, key=len, reverse=True)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _scrub_text(text: str, private: list[str]) -> str:
    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        return REDACTED if _luhn(digits) else m.group(0)

    text = _CARD.sub(card, text)
    for value in private:
        spaced = r"[ -]?".join(re.escape(ch) for ch in value) if value.isdigit() else re.escape(value)
        text = re.sub(spaced, REDACTED, text)
    return text


def scrub(chat: dict[str, Any], private: list[str]) -> dict[str, Any]:
    """Card numbers (Luhn-valid runs of 13 to 19 digits) and the private fields' values, out of
    every text of the conversation: a caller reads their card out loud."""
    for item in chat.get("items", []):
        content = item.get("content")
        if isinstance(content, list):
            item["content"] = [_scrub_text(c, private) if isinstance(c, str) else c for c in content]
        for key in ("arguments", "output"):  # tool calls and their results
            if isinstance(item.get(key), str):
                item[key] = _scrub_text(item[key], private)
    return chat


def matcher(never: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(n) for n in never) or r"(?!)", re.IGNORECASE)


__all__ = ["NEVER_KEPT", "REDACTED", "fields_of", "matcher", "private_values", "scrub"]
