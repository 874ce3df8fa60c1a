"""Targets for tests/test_llama_cpp_tools.py's child processes (utils.child imports them by name)."""
import ctypes


def double(payload):
    return payload * 2


def segfault(payload):
    ctypes.string_at(0)


def fail(payload):
    raise ValueError("no good")
