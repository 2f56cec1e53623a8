"""Reading the small JSON files of a model folder, with errors that name the file."""

from __future__ import annotations

import json
import os
from typing import Any


def read_json(path: str | os.PathLike, *, optional: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; `{}` for a missing file when `optional`."""
    path = os.fspath(path)
    if optional and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing; restore it from the model's release") from None
    except PermissionError:
        raise PermissionError(not_permitted(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the model's release") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds {type(value).__name__}, not a JSON object; restore it from the "
                         "model's release")
    return value


def not_permitted(path: str) -> str:
    """The message for a file or folder this process may not read (not a damaged one)."""
    return (f"{path}: permission denied; this user may not read it: fix its permissions (chmod, chown) "
            "or run as a user who can")
