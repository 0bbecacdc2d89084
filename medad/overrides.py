"""Strict ``--key value`` overrides for the ``medad`` front, checked against a bundle's own config files.

Stock ``python -m monai.bundle run`` hands every ``--key value`` pair to fire, which turns ``--quick false`` into the
*string* ``'false'`` (true in Python) and accepts ``--max_stepz 10`` without a word. The ``medad`` front parses
overrides here instead, against the top-level keys of the workflow's merged config files:

==========================  ===================================================================================
default in the config        accepted on the command line
==========================  ===================================================================================
``true`` / ``false``         ``true``/``false`` in any case, ``1``/``0``
integer                      an integer
number                       a number
string                       any text
list                         a list literal, e.g. ``"[20, 200, 400]"``
section (``{...}``)          not as a whole: set one entry, ``--section#entry value``
``null`` or ``$expression``  the type ``medad/schemas/keys.json`` declares for the key (``"int?"``: an integer or
                             ``none``); without one, a literal: ``true``/``false``, ``none``, a number, a list, text
==========================  ===================================================================================

A value that starts with ``$`` or ``@`` is passed on unchanged (a MONAI expression or reference) for any key.
An unknown key, a value of the wrong type or a malformed list raises :class:`OverrideError`, whose message is one
sentence naming the key and the fix (the ``medad`` front prints it and exits with code 2).

This module imports only the standard library, so ``medad run --config <bundle> --help`` answers at once.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "OverrideError",
    "split_args",
    "parse_bool",
    "merged_config",
    "check_overrides",
    "describe_keys",
    "key_descriptions",
]

#: keys that are plumbing of the config itself, never settings a user changes
HIDDEN_KEYS: frozenset[str] = frozenset({"imports"})
#: MONAI's id separators: ``a#b`` (and the legacy ``a::b``) address entry ``b`` of section ``a``
_SEP = "#"
_TRUE, _FALSE = ("true", "1"), ("false", "0")


class OverrideError(ValueError):
    """A command-line override that does not fit the bundle; the message is one sentence with the fix."""


def split_args(argv: Sequence[str]) -> tuple[list[str], dict[str, str | None]]:
    """Split ``argv`` into positional arguments and ``--key value`` / ``--key=value`` options.

    A ``--key`` followed by another option (or by nothing) has the value ``None`` (a bare flag).
    Repeating a key is an error, not a silent last-one-wins.
    """
    positional: list[str] = []
    options: dict[str, str | None] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("::", _SEP)
            if not eq:
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                if nxt is not None and nxt != "-h" and not (nxt.startswith("--") and len(nxt) > 2):
                    value, i = nxt, i + 1
                else:
                    value = None  # type: ignore[assignment]
            if key in options:
                raise OverrideError(f"--{key} is given twice; give it once.")
            options[key] = value
        elif arg == "-h":
            options["help"] = None
        else:
            positional.append(arg)
        i += 1
    return positional, options


def parse_bool(key: str, text: str | None) -> bool:
    """``true``/``false`` in any case, ``1``/``0``; a bare ``--key`` flag is true."""
    if text is None or text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise OverrideError(f"--{key} takes true or false (or 1/0), not {text!r}.")


def _read(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise OverrideError(f"{path}: config file not found; check the path.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # MONAI's own dependency for YAML configs; only needed for YAML files

            content = yaml.safe_load(text)
        else:
            content = json.loads(text)
    except Exception as error:  # the parser's reason, in one line
        raise OverrideError(f"{path}: not a valid config file ({str(error).splitlines()[0]}).") from None
    if not isinstance(content, dict):
        raise OverrideError(f"{path}: a config file must hold a mapping of keys to values.")
    return content


def _set_nested(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.replace("::", _SEP).split(_SEP)
    node: Any = config
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return  # MONAI would fail on it too; not a setting this module checks
    if isinstance(node, list) and parts[-1].isdigit():
        if int(parts[-1]) < len(node):
            node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value


def merged_config(files: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """The config files merged as MONAI merges them: later files replace top-level keys, ``a#b`` keys set entries."""
    merged: dict[str, Any] = {}
    for path in files:
        for key, value in _read(path).items():
            if _SEP in key or "::" in key:
                _set_nested(merged, key, value)
            else:
                merged[key] = value
    return merged


def _closest(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"did you mean --{match[0]}?" if match else "see --help for the keys this bundle takes."


def _target_parameters(section: Mapping[str, Any]) -> dict[str, Any]:
    """``name -> default`` of the keyword arguments of a config section's ``_target_`` (empty when it has none).

    A component's arguments that its config leaves out (``--training_step#margin 0``) are valid overrides, as in
    MONAI; a required argument without default maps to None (its type is not checked).
    """
    target = section.get("_target_")
    if not isinstance(target, str) or target[:1] in "$@%":
        return {}
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(obj).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    """The default of ``key`` (``a#b#c`` walks into sections); raises :class:`OverrideError` when it does not exist."""
    parts = key.split(_SEP)
    node: Any = config
    for depth, part in enumerate(parts):
        prefix = _SEP.join(parts[:depth])
        if isinstance(node, dict) and part in node and (depth or part not in HIDDEN_KEYS):
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif depth == len(parts) - 1 and isinstance(node, dict) and part in _target_parameters(node):
            return _target_parameters(node)[part]  # an argument of the component that its config leaves at default
        else:
            if isinstance(node, dict):
                names = [n for n in node if (depth or n not in HIDDEN_KEYS) and not n.startswith("_")]
                names += [n for n in (_target_parameters(node) if depth == len(parts) - 1 else {}) if n not in node]
                choices = [f"{prefix}{_SEP}{n}" if prefix else n for n in names]
            else:
                choices = []
            where = f"section '{prefix}'" if prefix else "this bundle's configs"
            raise OverrideError(f"unknown key --{key} (not in {where}); {_closest(key, choices)}")
    return node


def _literal(text: str) -> Any:
    """``true``/``false``, ``none``/``null``, a number, a list/tuple/dict literal, else the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip()[:1] in "[({":
        try:
            return ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            pass
        try:
            return json.loads(text)
        except ValueError:
            raise OverrideError(f"{text!r} is not a valid list or mapping literal; quote it, e.g. \"[1, 2]\".") from None
    return text


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "literal" if default[:1] in "$@%" else "str"
    if isinstance(default, list):
        return "list"
    if isinstance(default, dict):
        return "section"
    return "literal"  # null


def _declared(key: str) -> tuple[str, bool] | None:
    """``(kind, nullable)`` declared in ``keys.json`` for ``key`` (``"int?"`` = an integer or none), or None."""
    declared = key_descriptions().get(key, {}).get("type")
    return (declared.rstrip("?"), declared.endswith("?")) if declared else None


def _parse(key: str, text: str | None, default: Any) -> Any:
    kind, nullable = _kind(default), default is None
    declared = _declared(key)
    if declared and (kind == "literal" or (kind, declared[0]) == ("int", "float")):
        # an expression/null default takes the type keys.json declares; an integer default of a real-valued
        # setting (cutoff 30) accepts any number
        kind, nullable = declared
    if kind == "bool":
        return parse_bool(key, text)
    if text is None:
        raise OverrideError(f"--{key} needs a value (its default is {_show(default)}).")
    if text[:1] in "$@":  # a MONAI expression or reference: the user takes charge of its type
        return text
    if nullable and text.strip().lower() in ("none", "null"):
        # monai.bundle.run drops None-valued overrides (update_kwargs(ignore_none=True)): say None as an expression
        return "$None"
    if kind == "str":
        choices = key_descriptions().get(key, {}).get("choices")
        if choices and text not in choices:
            raise OverrideError(f"--{key} takes one of {', '.join(choices)}, not {text!r}.")
        return text
    value = _literal(text)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise OverrideError(f"--{key} takes an integer (default {_show(default)}), not {text!r}.")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OverrideError(f"--{key} takes a number (default {_show(default)}), not {text!r}.")
        value = float(value)
    elif kind == "list":
        if not isinstance(value, (list, tuple)):
            raise OverrideError(f"--{key} takes a list such as \"[16, 32, 64]\", not {text!r}.")
        value = list(value)
    elif kind == "section" and not isinstance(value, dict):
        if not isinstance(default, dict):  # a dict-valued setting that defaults to null
            raise OverrideError(f"--{key} takes a dict such as \"{{'a': 1}}\" or none, not {text!r}.")
        entries = ", ".join(f"--{key}{_SEP}{n}" for n in list(default)[:4] if not n.startswith("_"))
        raise OverrideError(f"--{key} is a config section, not a single value; set one of its entries ({entries}).")
    return "$None" if value is None else value


def check_overrides(
    files: Sequence[str | os.PathLike], options: Mapping[str, str | None], extra_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """Typed overrides for the merged ``files``, from the command line's ``--key value`` texts.

    Args:
        files: the workflow's config files (merged in order, as MONAI merges them).
        options: ``key -> text`` from :func:`split_args` (``None`` for a bare flag).
        extra_keys: further accepted keys that are not in the configs (taken as literals).

    Returns:
        ``key -> value`` ready for ``monai.bundle.run(**overrides)``.

    Raises:
        OverrideError: unknown key (with the closest valid key), or a value of the wrong type.
    """
    config = merged_config(files)
    typed: dict[str, Any] = {}
    for key, text in options.items():
        if key in extra_keys:
            typed[key] = text if text is None else _literal(text)
            continue
        typed[key] = _parse(key, text, _lookup(config, key))
    return typed


@lru_cache(maxsize=1)
def key_descriptions() -> dict[str, dict[str, str]]:
    """``key -> {"help": one line, "type": ...}`` for the config keys of every bundle (``medad/schemas/keys.json``)."""
    path = Path(__file__).resolve().parent / "schemas" / "keys.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _show(value: Any, width: int = 72) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_keys(files: Sequence[str | os.PathLike]) -> str:
    """The help text of a bundle: every settable key with its default and a one-line description."""
    config = merged_config(files)
    descriptions = key_descriptions()
    settings, sections = [], []
    for key, value in config.items():
        if key in HIDDEN_KEYS:
            continue
        if isinstance(value, dict):
            target = value.get("_target_", "")
            entries = ", ".join(n for n in value if not n.startswith("_"))
            text = descriptions.get(key, {}).get("help") or (f"component {target}" if target else "section")
            sections.append(f"  --{key}#<entry>\n      {text}" + (f". Entries: {entries}" if entries else ""))
        else:
            text = descriptions.get(key, {}).get("help", "(no description)")
            settings.append(f"  --{key} {_show(value)}\n      {text}")
    return "\n".join(["settings (--key value; default shown):", *settings, "",
                      "sections (set one entry with --section#entry value):", *sections])
