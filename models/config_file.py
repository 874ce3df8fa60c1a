"""A model directory's config.json read as plain JSON, with one clear error for a missing or unparsable file.

For checks that should not wait for transformers to import (run_train.sh's, before the launch);
models.quant_model.read_config runs the same check, then reads the config through transformers."""
import json
from pathlib import Path

from models.errors import InputError


def config_json(path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():  # checked first: transformers would ask the hub for a repo id
        raise InputError(f"model {str(path)!r}: not a local Hugging Face model directory (no config.json)")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise InputError(f"model {str(path)!r}: cannot read its config.json ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise InputError(f"model {str(path)!r}: cannot read its config.json (a JSON object is needed)")
    return config


def text_hidden_size(config: dict) -> int:
    """The width of the text model (multimodal configs nest it in text_config); 0 if the config has none."""
    return (config.get("text_config") or config).get("hidden_size", 0)


def first_line(e):
    """An exception's message in one line (its type's name if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
