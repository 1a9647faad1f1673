"""Property-based tests of the config schema (issue 18): for every field of RunConfig, any value
of the wrong type or out of its range is one ConfigError line naming the field; any value the
rule allows is accepted unchanged (ints where floats are declared become those floats)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm_core.config import FIELD_TYPES, RULES, ConfigError, RunConfig, load_config

FIELDS = sorted(FIELD_TYPES)
ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2))
# Values fixed beside the field under test so that cross-field rules cannot fire for other reasons.
NEUTRAL = {"index_factory": "Flat", "k": 1, "datastore_limit_tokens": 0, "search_batch": 1, "whiten": "none"}


def spelled(name: str) -> str:
    return "lambda" if name == "lam" else name


def try_load(name: str, value) -> RunConfig | ConfigError:
    """RunConfig with `name` = `value` (other fields neutral), or the ConfigError it raised."""
    overrides = {k: v for k, v in NEUTRAL.items() if k != name}
    overrides[name] = value
    try:
        return load_config(None, overrides)
    except ConfigError as err:
        return err


def allowed_by_rule(name: str, value) -> bool:
    """The schema's meaning, written out independently of config.py's Rule.ok."""
    typ, rule = FIELD_TYPES[name], RULES[name]
    if isinstance(value, bool):
        return False
    if typ is str:
        ok = isinstance(value, str) and "\x00" not in value
        return ok and (value in rule.choices if rule.choices else (bool(value.strip()) if rule.nonempty else True))
    if typ is int and not isinstance(value, int):
        return False
    if typ is float and not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False
    if rule.zero_ok and value == 0:
        return True
    if rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo):
        return False
    return rule.hi is None or value <= rule.hi


def check_one(name: str, value) -> None:
    if name == "whiten" and isinstance(value, str) and value not in ("none", ""):
        return  # whiten needs valid_corpus: its cross-field rule is tested on its own below
    if name == "index_factory" and isinstance(value, str) and value.strip():
        return  # a non-empty string is then parsed: test_any_factory_string_is_parsed_or_refused_in_one_line
    result = try_load(name, value)
    if allowed_by_rule(name, value) and not (name == "model" and value is None):
        if value is None:  # None means "not given" in overrides
            assert isinstance(result, RunConfig)
            return
        assert isinstance(result, RunConfig), f"{name} = {value!r} refused: {result}"
        got = getattr(result, name)
        assert got == value and type(got) is FIELD_TYPES[name]
    elif value is not None:
        assert isinstance(result, ConfigError), f"{name} = {value!r} accepted"
        message = str(result)
        assert "\n" not in message and spelled(name) in message and "fix:" in message, message


@pytest.mark.parametrize("name", FIELDS)
@settings(max_examples=40, deadline=None)
@given(value=ANYTHING)
def test_any_value_of_any_field(name, value):
    check_one(name, value)


@pytest.mark.parametrize("name", [n for n in FIELDS if FIELD_TYPES[n] in (int, float)])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_numbers_near_the_bounds(name, data):
    rule = RULES[name]
    points = [b for b in (rule.lo, rule.hi) if b is not None] + [0]
    centre = data.draw(st.sampled_from(points))
    if FIELD_TYPES[name] is int:
        value = data.draw(st.integers(int(centre) - 3, int(centre) + 3))
    else:
        value = data.draw(st.floats(centre - 1, centre + 1, allow_nan=False))
    check_one(name, value)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 5000), limit=st.integers(2, 5000))
def test_k_beyond_a_limited_datastore_is_refused(k, limit):
    try:
        load_config(None, {"k": k, "datastore_limit_tokens": limit, "index_factory": "Flat", "search_batch": 1})
        assert k <= limit - 1
    except ConfigError as err:
        assert k > limit - 1 and "k = " in str(err) and "\n" not in str(err)


@settings(max_examples=60, deadline=None)
@given(factory=st.text(alphabet="IVFPQOSHNWlatx,_0123456789", max_size=14))
def test_any_factory_string_is_parsed_or_refused_in_one_line(factory):
    """No factory string reaches faiss unparsed: each is accepted by the parser or one ConfigError line."""
    try:
        load_config(None, {"index_factory": factory})
    except ConfigError as err:
        assert "\n" not in str(err) and "index_factory" in str(err)


def test_whiten_needs_valid_corpus():
    with pytest.raises(ConfigError, match="valid_corpus"):
        load_config(None, {"whiten": "entries"})
    assert load_config(None, {"whiten": "entries", "valid_corpus": "x.txt"}).whiten_kinds == ("entries",)
