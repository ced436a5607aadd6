"""Settings files for `igpt prepare / train / eval / probe / finetune / demo --config FILE`: a JSON or TOML
table of a config dataclass's fields, parsed as data (never imported or evaluated) and checked by name and type
before the dataclass's own validation runs. The JSON a run writes can be read back: its config section is used.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

from igpt.errors import IgptError
from igpt.io import unique_keys


def read_settings_file(path: str | Path, section: str) -> dict:
    """The table of settings in a .json or .toml file. A file whose ``section`` entry is itself a table (the
    JSON a run writes: a train run's config.json under "train"; a shard directory's meta.json, eval.json,
    probe.json, finetune.json and a demo's demo.json under "config") gives that table, so a run can be repeated from its own record."""
    if not str(path):  # (Path('') is '.')
        raise IgptError("--config is empty: give a .json or .toml file")
    p = Path(path)
    kind = {".json": "JSON", ".toml": "TOML"}.get(p.suffix.lower())
    if kind is None:
        raise IgptError(f"--config {p}: expected a .json or .toml file")
    try:
        text = p.read_text(encoding="utf-8")
        # a name given twice: TOML's parser refuses it, and unique_keys makes JSON's do the same (it kept the last)
        d = json.loads(text, object_pairs_hook=unique_keys) if kind == "JSON" else tomllib.loads(text)
    except FileNotFoundError:
        raise IgptError(f"--config {p}: no such file") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: the decoders' errors, and an integer of
        # more digits than Python converts (4300)
        raise IgptError(f"--config {p}: not a readable {kind} file ({e})") from None
    if not isinstance(d, dict):
        raise IgptError(f"--config {p}: expected a table of settings, got {type(d).__name__}")
    if isinstance(d.get(section), dict):
        if kind == "TOML" and len(d) > 1:  # runs write JSON; in a TOML file this is settings in two places
            others = sorted(k for k in d if k != section)
            raise IgptError(f"--config {p}: settings both at the top ({', '.join(others)}) and in a [{section}] "
                            f"table; put them all in one place")
        return Section(d[section], d, section, f"--config {p}")
    return d


class Section(dict):
    """The ``section`` table of a JSON settings file with other entries beside it (a run's record: resolved
    values, counts). Only the config class knows which of those are settings, so ``build`` checks them: a
    setting found only at the top would be silently ignored. One that the table also holds is the record
    repeating it (train's config.json: dtype 'float32' at the top for 'auto' in the table); the table wins."""

    def __init__(self, table: dict, whole: dict, section: str, where: str):
        super().__init__(table)
        self.section, self.where = section, where
        self.only_top = sorted(k for k in whole if k != section and k not in table)

    def check_top(self, cls) -> None:
        names = {f.name for f in fields(cls)}
        clash = [k for k in self.only_top if k in names]
        if clash:
            raise IgptError(f"{self.where}: settings both at the top ({', '.join(clash)}) and in a "
                            f"\"{self.section}\" table; put them all in one place")


MAX_SEED = 1 << 62  # torch's generators take 64-bit seeds, and seeds are combined (seed * 1000 + i, seed + rank)


def check_seed(seed, what: str) -> None:
    """IgptError unless ``seed`` is an integer in [0, 2^62)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_SEED:
        raise IgptError(f"{what}: seed must be an integer in [0, 2^62), got {seed!r}")


def check_settings(cls, d: dict, what: str) -> None:
    """IgptError naming the field for a name ``cls`` (a dataclass) does not have or a value of the wrong type
    (JSON lists are accepted for tuples; bool is not a number; an int is a float)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise IgptError(f"{what} config: unknown field(s) {unknown}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if not has_type(value, hints[name]):
            raise IgptError(f"{what} config: {name} must be {_type_name(hints[name])}, got {value!r}")
        if isinstance(value, str) and ("\x00" in value or _unencodable(value)):
            raise IgptError(f"{what} config: {name} holds a NUL character or an unpaired surrogate, which no "
                            f"path or name can: {value!r}")


def _unencodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def build(cls, d: dict, what: str):
    """``cls(**d)`` after ``check_settings``, with lists given for tuple fields made tuples (JSON and TOML have
    no tuples)."""
    if isinstance(d, Section):
        d.check_top(cls)
    check_settings(cls, d, what)
    hints = typing.get_type_hints(cls)
    tuples = {k for k, h in hints.items() if (typing.get_origin(h) or h) is tuple}
    return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})


def has_type(value, hint) -> bool:
    """isinstance for the annotations the config dataclasses use."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(has_type(value, h) for h in typing.get_args(hint))
    base = typing.get_origin(hint) or hint
    if base is type(None):
        return value is None
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:  # an int is a float, unless it is too large to be one
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            float(value)
        except OverflowError:
            return False
        return True
    if base is tuple:  # tuple[float, float] or tuple[int, ...]: a list or tuple of those
        parts = typing.get_args(hint)
        if len(parts) == 2 and parts[1] is Ellipsis:
            parts = (parts[0],) * len(value) if isinstance(value, (list, tuple)) else ()
        return (isinstance(value, (list, tuple)) and len(value) == len(parts)
                and all(has_type(v, h) for v, h in zip(value, parts)))
    return isinstance(value, base)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def merged(file: str | None, section: str, given: dict, what: str) -> dict:
    """The settings of ``file`` (none when None) with ``given`` (the flags set on the command line) over them; a
    table in ``given`` (train's model overrides) goes over the file's table key by key."""
    # (an empty --config, an unset shell variable's, is refused: it had read as no file, and the command ran on
    # its defaults, a demo replacing the last one)
    settings = read_settings_file(file, section) if file is not None else {}
    for k, v in given.items():
        if isinstance(v, dict) and k in settings:
            if not isinstance(settings[k], dict):
                raise IgptError(f"{what} config: {k} must be a table, got {settings[k]!r}")
            v = {**settings[k], **v}
        settings[k] = v
    return settings
