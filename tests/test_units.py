import pytest

from kvstore._errors import ConfigError
from kvstore._units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * 1024**2),
        ("4GiB", 4 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        (" 64 kib ", 64 * 1024),
        (7, 7),
        ("0", 0),
    ],
)
def test_parse_size_accepts_api_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "1.5", "4 parsecs", "1e9", -3, "0.1B"])
def test_parse_size_rejects_garbage_with_config_error(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_parse_duration():
    assert parse_duration("10s") == 10.0
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2m") == 120.0
    assert parse_duration(1.5) == 1.5
    with pytest.raises(ConfigError):
        parse_duration("soon")
    with pytest.raises(ConfigError):
        parse_duration(-1)


def test_format_size():
    assert format_size(4 * 1024**3) == "4.00 GiB"
    assert format_size(12) == "12 B"
