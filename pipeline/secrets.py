"""Secrets in configs and command lines: keys that name one by their words (hf_token, WANDB_API_KEY, db.password),
and their values replaced wherever a config or command line is written (config.yaml, W&B, job scripts)."""

from __future__ import annotations

import re

# A key naming a secret, by its words ("hf_token", "WANDB_API_KEY", "apiKey", "db.password"), whose value never
# reaches W&B's config panel. Whole words only: "max_tokens" and "tokens_per_update" are no secrets.
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
REDACTED = "<redacted>"  # what a secret's value is replaced by


def is_secret(key: object) -> bool:
    return bool(SECRET_WORDS.intersection(re.split(r"[^a-z0-9]+", str(key).lower())))


def redact(value):
    """The config with the values of secret-naming keys (SECRET_WORDS) replaced, safe to log."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# A Hydra override (key=value, +key=value, ++key=value, ~key=value), and a key inside a dict value ({hf_token: x}).
_OVERRIDE = re.compile(r"(?P<key>[+~]{0,2}[A-Za-z_][\w.@/-]*)=(?P<value>.*)", re.DOTALL)
_INNER_KEY = re.compile(r"[{,]\s*['\"]?([A-Za-z_][\w.-]*)['\"]?\s*:")


def redact_args(args: list[str]) -> list[str]:
    """A command line with the values of secret-naming overrides replaced (`+extra.hf_token=hf_x` ->
    `+extra.hf_token=<redacted>`; a dict value that holds a secret-naming key, whole)."""
    redacted = []
    for arg in args:
        match = _OVERRIDE.fullmatch(arg)
        if match and (is_secret(match["key"]) or any(is_secret(k) for k in _INNER_KEY.findall(match["value"]))):
            arg = f"{match['key']}={REDACTED}"
        redacted.append(arg)
    return redacted
