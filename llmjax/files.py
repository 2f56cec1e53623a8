"""Model folders: the bundled models' names, and reading a folder's small JSON files with errors that
name the file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from typing import Any


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# Models that ship inside the package, by name; `load(name)` and `convert(name, ...)` find them
# wherever llmjax is installed.
BUNDLED = ("tiny-stdlib",)
DEFAULT_MODEL = "tiny-stdlib"


def resolve(path: str | os.PathLike) -> str:
    """The folder `load` or `convert` reads: `path` itself (`~` expanded, as a shell would: a quoted
    `"~/models/x"` is never a folder named `~` in the working directory), or a bundled model's folder
    when `path` is its name and no such file or folder exists (a folder of that name in the working
    directory wins)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        error = TypeError if not isinstance(path, (str, os.PathLike)) else ValueError
        raise error(f"the model path must be a folder's path or a bundled model's name (such as {BUNDLED[0]!r}), "
                    f"got {path!r}")
    path = os.path.expanduser(os.fspath(path))
    if path in BUNDLED and not os.path.exists(path):
        return os.path.join(ASSETS, path)
    return path


def read_json(path: str | os.PathLike, *, optional: bool = False,
              fix: str = "restore it from the model's release") -> dict[str, Any]:
    """The JSON object in `path`; `{}` for a missing file when `optional`. `fix`: what an error tells
    the user to do (a file llmjax writes is not restored from a release but written again)."""
    path = os.fspath(path)
    if optional and not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        what = f"is a link to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "is missing"
        raise FileNotFoundError(f"{path} {what}; {fix}") from None
    except PermissionError:
        raise PermissionError(not_permitted(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds {type(value).__name__}, not a JSON object; {fix}")
    return value


def hub_cache_hint(folder: str) -> str:
    """For a folder of the Hugging Face hub cache that is not a model folder itself (`models--org--name`
    or its `snapshots`): the sentence naming the snapshot folder to pass instead (`refs/main`'s, else the newest); else ''."""
    folder = os.path.abspath(folder)
    snapshots = os.path.join(folder, "snapshots")
    if os.path.basename(folder) == "snapshots":
        snapshots, folder = folder, os.path.dirname(folder)
    if not os.path.isdir(snapshots):
        return ""
    try:
        names = sorted(n for n in os.listdir(snapshots) if os.path.isfile(os.path.join(snapshots, n, "config.json")))
    except OSError:
        return ""
    if not names:
        return f"; {folder} is a Hugging Face hub cache folder, but none of its snapshots holds config.json"
    try:
        with open(os.path.join(folder, "refs", "main"), encoding="utf-8") as f:
            main = f.read().strip()
    except OSError:
        main = None
    # The link's own time (when the snapshot took the file), not its blob's: snapshots share one blob for a
    # file that did not change between them, so the blob's time would tie them (then the first by name).
    newest = max(names, key=lambda n: os.lstat(os.path.join(snapshots, n, "config.json")).st_mtime)
    pick = main if main in names else newest
    more = f" (it holds {len(names)} snapshots: {', '.join(names)})" if len(names) > 1 else ""
    return (f"; {folder} is a Hugging Face hub cache folder: pass its snapshot folder, "
            f"{os.path.join(snapshots, pick)}{more}")


def check_folder(path: str, kind: str) -> None:
    """Refuses a file given where a folder goes (naming the folder that holds it: `kind`, "model
    folder" say) and a folder this user may not read."""
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file; pass the {kind} that holds it ({os.path.dirname(path) or '.'})")
    if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(not_permitted(path))


def not_permitted(path: str) -> str:
    """The message for a file or folder this process may not read (not a damaged one)."""
    return (f"{path}: permission denied; this user may not read it: fix its permissions (chmod, chown) "
            "or run as a user who can")


def remove_tree(path: str) -> None:
    """`shutil.rmtree(path)`, errors ignored, with Ctrl-C ignored until it is done (in the main
    thread, which alone receives it): a cleanup that a second Ctrl-C cut short would leave a half
    removed folder behind."""
    if threading.current_thread() is not threading.main_thread():
        shutil.rmtree(path, ignore_errors=True)
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, and SIGTERM or SIGHUP where Python handles them (the CLI's convert turns SIGTERM into an
    exit), wait until the block is done, then take effect as they would have (in the main thread;
    elsewhere nothing is held). For orbax's saves: cut short by the exception a handler raises, a
    save leaves its writes going on in orbax's threads, which then write into the folder the cleanup
    has just removed, and leave it behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    # (Windows has no SIGHUP)
    signals = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {s: signal.getsignal(s) for s in signals}
    held = [s for s, handler in previous.items() if callable(handler)]  # (not SIG_DFL, SIG_IGN, or set outside Python)
    for s in held:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, previous[s])
        if caught:
            signal.raise_signal(caught[0])

