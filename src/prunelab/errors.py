"""Errors shared across prunelab: a bad config value is a ``ConfigError`` (a ``ValueError``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config key holds a value prunelab cannot use; the message names the key and the fix."""


def bad_value(key: str, value: object, allowed: Iterable[object]) -> ConfigError:
    """``data.name='wikitxt' is not allowed; did you mean 'wikitext2'? allowed: embedded, wikitext2``."""
    choices = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return ConfigError(f"{key}={value!r} is not allowed{hint} allowed: {', '.join(choices)}")


class NonFiniteError(RuntimeError):
    """A NaN or an infinity where prunelab needs a number (weights, a loss, importance scores,
    a metric); the message says where it appeared and what to do."""


def unknown_key(node: str, key: object, allowed: Iterable[object]) -> ConfigError:
    """``data.max_rows.trainx is not a key of data.max_rows; did you mean 'train'? allowed: train``."""
    choices = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return ConfigError(f"{node}.{key} is not a key of {node}{hint} allowed: {', '.join(choices)}")
