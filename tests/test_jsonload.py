"""worker.jsonload: orjson where it can, the standard library where orjson refuses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker import jsonload

HUGE = 123456789012345678901234567890  # beyond 64 bits: jsonb keeps it, orjson alone would read a float


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, lambda b: b.decode()])
def test_every_buffer_psycopg_and_aiohttp_hand_over_is_read(kind) -> None:
    text = json.dumps({"history": [{"role": "user", "content": "héllo \u2603"}], "n": 1.5, "big": HUGE})
    assert jsonload.loads(kind(text.encode())) == json.loads(text)


def test_integers_beyond_64_bits_are_read_exactly() -> None:
    assert jsonload.loads(b'{"big": 123456789012345678901234567890}') == {"big": HUGE}


def test_what_is_not_json_still_fails_as_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsonload.loads(b"<html>bad gateway</html>")


@pytest.mark.parametrize("text", ['[18446744073709551616]', '[-9223372036854775809]', '{"a": [1, 99999999999999999999.5]}',
                                  '"\\ud800"', '[1e400]', '[NaN, -Infinity]', '{"a": 1, "a": 2}', '[1.0000000000000002]',
                                  '"1234567890123456789012 in a string"'])
def test_the_results_are_the_standard_librarys(text: str) -> None:
    expected = json.loads(text)
    got = jsonload.loads(text.encode())
    assert repr(got) == repr(expected)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


@given(json_values)
def test_any_document_reads_as_with_the_standard_library(value: object) -> None:
    text = json.dumps(value)  # NaN and infinities as the standard library writes them
    assert repr(jsonload.loads(text.encode())) == repr(json.loads(text))
