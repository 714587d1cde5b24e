"""Size, rate and duration parsing: exact values, refusals, and round trips."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclemirror.errors import UsageError
from cyclemirror.units import (
    format_duration,
    format_rate,
    format_size,
    parse_rate,
    parse_seconds,
    parse_size,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("4KB", 4096),
        ("64M", 64 << 20),
        ("1.5K", 1536),
        ("2G", 2 << 30),
        ("3T", 3 << 40),
        (" 8 M ", 8 << 20),
        (512, 512),
    ],
)
def test_parse_size_reads_binary_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "4Q", "-4K", "4 KK", "1e3", "0.1K", "1.2345", "4P"])
def test_parse_size_refuses_what_it_cannot_read_exactly(text):
    with pytest.raises(UsageError) as info:
        parse_size(text, "--size")
    assert "--size" in str(info.value)


def test_parse_size_refuses_non_numbers_and_negative_ints():
    for bad in (None, True, 4.5, -1, [4]):
        with pytest.raises(UsageError):
            parse_size(bad)


@pytest.mark.parametrize("text, expected", [("10M", 10 << 20), ("10M/s", 10 << 20), ("0", 0)])
def test_parse_rate_accepts_per_second_suffix(text, expected):
    assert parse_rate(text) == expected


@given(st.integers(min_value=0, max_value=1 << 50), st.sampled_from(["", "K", "M", "G", "T"]))
def test_parse_size_is_exact_for_every_integer_and_suffix(number, suffix):
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[suffix]
    assert parse_size(f"{number}{suffix}") == number * factor
    assert parse_size(f"{number}{suffix.lower()}iB" if suffix else str(number)) == number * factor


@given(st.integers(min_value=0, max_value=1 << 60))
def test_format_size_is_within_a_tenth_of_a_unit(nbytes):
    text = format_size(nbytes)
    number, unit = text.split(" ")
    if unit == "B":
        assert int(number) == nbytes
    else:
        scale = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}
        assert abs(float(number) * scale[unit] - nbytes) <= 0.05 * scale[unit] + 1


def test_parse_seconds_refuses_negative_and_infinite_values():
    assert parse_seconds("2.5") == 2.5
    assert parse_seconds(0) == 0
    for bad in ("-1", "inf", "nan", "soon", None):
        with pytest.raises(UsageError):
            parse_seconds(bad, "--interval")
    with pytest.raises(UsageError):
        parse_seconds(0, "--timeout", allow_zero=False)


def test_format_duration_and_rate_read_naturally():
    assert format_duration(0.25) == "0.25s"
    assert format_duration(42) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(2 * 3600 + 7 * 60) == "2h07m"
    assert format_duration(None) == "-"
    assert format_rate(1536) == "1.5 KiB/s"
    assert format_rate(None) == "-"
