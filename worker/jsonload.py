"""JSON parsing on the worker's hot paths (claimed histories from PostgreSQL, Replicate's
answers): orjson, with the standard library's results. On a 50-message history it takes 21 µs
against the standard library's 108, the digit check below included (orjson alone: 13 µs).

orjson differs from the standard library on two kinds of valid input: it refuses some (lone
surrogate escapes, numbers that overflow a double, NaN), and it reads integers beyond 64 bits as
floats, losing digits (jsonb keeps any numeric, and users write their own profile preferences).
Refusals are read again with the standard library; so is any document with a run of 19 or more
digits, found with one translate and one find: an integer beyond 64 bits has at least 20 digits
(19 after a minus sign), and the margin costs only a slower read of a document that has such a
run (in a string, say). Text (str) goes to the standard library as it is: orjson would read it
differently (a leading BOM, lone surrogates), and the hot paths hand over bytes."""

from __future__ import annotations

import json
import sys
from typing import Any

import orjson

_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_LONG_NUMBER = b"0" * 19


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    if isinstance(data, str):
        return json.loads(data)
    raw = bytes(data)
    if raw.translate(_DIGITS_AS_ZERO).find(_LONG_NUMBER) < 0:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


# numeric, and with it a jsonb number, has up to 131,072 digits before the decimal point.
JSONB_INTEGER_DIGITS = 131_072


def allow_jsonb_integers() -> None:
    """Lets this process read and print any integer a jsonb value can hold. Python refuses to
    convert integers of more than 4,300 digits to or from text (CVE-2020-10735), and jsonb
    stores `1e5000` in a few bytes and prints it as 5,001 digits: one such number in a user's
    profile made every claim that carried it fail, and with it the other runs of that claim,
    on both transports (PostgREST's client reads with the standard library as well). The cost
    of the largest such conversion is bounded (about 0.3 s), and since 20261123001500 (validated
    in 20261123001700) a profile's numbers have at most about 100 digits."""
    current = sys.get_int_max_str_digits()
    if current and current < JSONB_INTEGER_DIGITS:
        sys.set_int_max_str_digits(JSONB_INTEGER_DIGITS)
