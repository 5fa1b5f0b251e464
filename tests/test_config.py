"""Every environment variable is validated; a bad value names the variable, the value and what is allowed."""

from __future__ import annotations

import pytest

from kvcached import Config, ConfigError
from kvcached.units import format_size, parse_size


def test_defaults_without_any_variable():
    config = Config.from_env({})
    assert (config.enabled, config.page_size_bytes, config.min_reserved_pages, config.max_reserved_pages) == (False, None, 1, 4)
    assert (config.memory_limit, config.virtual_size, config.ipc_name, config.log_level) == (None, None, None, "INFO")


def test_values_are_parsed():
    config = Config.from_env({
        "ENABLE_KVCACHED": "true", "KVCACHED_AUTOPATCH": "1", "KVCACHED_PAGE_SIZE_MB": "4",
        "KVCACHED_MIN_RESERVED_PAGES": "0", "KVCACHED_MAX_RESERVED_PAGES": "10", "KVCACHED_GPU_UTILIZATION": "0.9",
        "KVCACHED_MEMORY_LIMIT": "1.5G", "KVCACHED_VIRTUAL_SIZE": "64GiB", "KVCACHED_LOG_LEVEL": "debug",
        "KVCACHED_MAX_CACHED_TOKENS": "4096", "KVCACHED_TRIM_IDLE_S": "0.5", "KVCACHED_IPC_NAME": "llama",
    })
    assert config.enabled and config.autopatch
    assert config.page_size_bytes == 4 << 20
    assert (config.min_reserved_pages, config.max_reserved_pages, config.gpu_utilization) == (0, 10, 0.9)
    assert (config.memory_limit, config.virtual_size) == (3 << 29, 64 << 30)
    assert (config.log_level, config.max_cached_tokens, config.trim_idle_s, config.ipc_name) == ("DEBUG", 4096, 0.5, "llama")


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("ENABLE_KVCACHED", "maybe", "true/false"),
        ("KVCACHED_AUTOPATCH", "2", "true/false"),
        ("KVCACHED_PAGE_SIZE_MB", "0", "> 0"),
        ("KVCACHED_PAGE_SIZE_MB", "two", "could not convert"),
        ("KVCACHED_MIN_RESERVED_PAGES", "-1", ">= 0"),
        ("KVCACHED_MAX_RESERVED_PAGES", "1.5", "invalid literal"),
        ("KVCACHED_GPU_UTILIZATION", "1.2", "(0, 1]"),
        ("KVCACHED_GPU_UTILIZATION", "0", "(0, 1]"),
        ("KVCACHED_MEMORY_LIMIT", "lots", "not a size"),
        ("KVCACHED_MEMORY_LIMIT", "0", "> 0"),
        ("KVCACHED_VIRTUAL_SIZE", "12X", "unknown unit"),
        ("KVCACHED_LOG_LEVEL", "LOUD", "DEBUG, INFO"),
        ("KVCACHED_TRIM_IDLE_S", "-2", ">= 0"),
        ("KVCACHED_MAX_CACHED_TOKENS", "-5", ">= 0"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as info:
        Config.from_env({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}={value!r} is invalid")
    assert allowed in message


def test_maximum_reserve_below_minimum_is_refused():
    with pytest.raises(ConfigError, match="KVCACHED_MAX_RESERVED_PAGES=1 is below KVCACHED_MIN_RESERVED_PAGES=3"):
        Config.from_env({"KVCACHED_MIN_RESERVED_PAGES": "3", "KVCACHED_MAX_RESERVED_PAGES": "1"})


@pytest.mark.parametrize(
    "text, expected",
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("1048576", 1 << 20), ("2GB", 2 * 10**9),
     ("64k", 64 << 10), ("7B", 7), (" 3 MiB ", 3 << 20), (".5G", 1 << 29)],
)
def test_sizes_as_people_type_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "1.2.3G", "12 parsecs", "1e9"])
def test_text_that_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError, match="size|unit"):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (0, 1023, 1536, 16 << 20, 3 << 29, 5 << 40)] == ["0B", "1023B", "1.5K", "16M", "1.5G", "5T"]
