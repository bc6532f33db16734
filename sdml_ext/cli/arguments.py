"""Checks of parsed command-line arguments that every command line shares, each refusal one
ValueError naming the flag (the runner prints it as one line, exit status 2), made before any
file is read or any work is done:

- :func:`refuse_empty`: a value given as an empty string (``--out ""``, ``--config ""``, a shell
  variable that was never set) is refused instead of being taken for "not given", which would
  fall back to a default silently, or for the current directory.
- :func:`check_paths`: a directory given where a file is read or written, or a file where a
  directory is (a missing input is left to the reader, whose message says what it looked for).
- :func:`at_least_one` and :func:`check_seed`: numbers outside their range.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Iterator


def _actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[argparse.Action]:
    """The parser's actions, and those of the subcommand chosen (``search build`` ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                yield from _actions(chosen, args)
        else:
            yield action


def _name(action: argparse.Action) -> str:
    """How the user wrote the argument: its long option (--out), or its metavar (BUNDLE)."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    return action.metavar or action.dest.upper()


def flag_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """dest -> the argument's name as the user wrote it, for the messages of other checks."""
    return {a.dest: _name(a) for a in _actions(parser, args) if a.dest != argparse.SUPPRESS}


def refuse_empty(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a string argument given empty (or blank); an argument whose own default is the
    empty string is left alone (giving it empty changes nothing)."""
    for action in _actions(parser, args):
        value = getattr(args, action.dest, None)
        if isinstance(value, str) and not value.strip() and action.default != value:
            name = _name(action)
            if not action.option_strings:
                raise ValueError(f"the {name} argument is empty")
            what = action.metavar or "value"
            article = "an" if what[0].lower() in "aeiou" else "a"
            leave = "" if action.required else f", or leave {name} out"
            raise ValueError(f"{name} is empty: give {article} {what}{leave}")


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, *, files: Iterable[str] = (),
                directories: Iterable[str] = (), new_files: Iterable[str] = (),
                new_directories: Iterable[str] = ()) -> None:
    """Refuse a path of the wrong kind, by dest: `files` are read (a directory is refused),
    `directories` are read (a file is refused), `new_files` and `new_directories` are created
    (an existing directory, or an existing file, is refused: a file never goes where a
    directory was asked for, nor the reverse). Paths that do not exist are left to the command."""
    names = flag_names(parser, args)
    for dests, wanted in ((files, "file"), (new_files, "file"), (directories, "directory"),
                          (new_directories, "directory")):
        for dest in dests:
            path = getattr(args, dest, None)
            if path is None:
                continue
            if wanted == "file" and os.path.isdir(path):
                raise ValueError(f"{names[dest]} {path} is a directory; give a file")
            if wanted == "directory" and os.path.exists(path) and not os.path.isdir(path):
                raise ValueError(f"{names[dest]} {path} is a file, not a directory")


def at_least_one(value, flag: str) -> None:
    """Refuse a count or size below 1 (None: not given)."""
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def check_seed(value, flag: str = "--seed") -> None:
    """Refuse a seed outside numpy's range [0, 2**32) (None: not given)."""
    from ..engine.training import SEED_LIMIT  # here: evaluate and search load no training machinery

    if value is not None and not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{flag} must be in [0, {SEED_LIMIT - 1}] (numpy's seed range), got {value}")
