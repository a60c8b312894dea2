"""LightningCLI / jsonargparse parse errors as one line with the nearest valid name.

jsonargparse reports an unknown init argument, a wrong type or a misspelt ``class_path`` inside a long
``Union`` message after the whole usage text; :func:`explain_parse_error` turns that message into one
:class:`~zoo.errors.UsageError` line ("unknown option model.init_args.lrr of zoo.modules.CausalLMModule
(did you mean 'lr'?)"). :func:`join_negative_values` lets ``--key -1e-3`` through (Python 3.11's argparse
reads a value in exponent notation as an option).
"""

from __future__ import annotations

import importlib
import inspect
import re

from zoo.errors import UsageError, did_you_mean

_NEGATIVE = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def join_negative_values(argv: list[str]) -> list[str]:
    """``[--key, -1e-3]`` -> ``[--key=-1e-3]`` for every negative number following an option without ``=``."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def class_arguments(class_path: str) -> list[str]:
    """Init argument names of ``class_path`` and, through ``**kwargs``, of its bases."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in params
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def class_candidates(class_path: str) -> list[str]:
    """Importable class paths near ``class_path``: the names its module exports (or its parent's)."""
    module = class_path.rpartition(".")[0]
    while module:
        try:
            imported = importlib.import_module(module)
            return [f"{module}.{n}" for n in dir(imported) if n[:1].isupper()]
        except ImportError:
            module = module.rpartition(".")[0]
    return []


def option_names(parser) -> list[str]:
    """Every option string of ``parser`` and its subcommand parsers."""
    names = list(getattr(parser, "_option_string_actions", {}))
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in (getattr(subcommands, "_name_parser_map", None) or {}).values():
        names += list(getattr(sub, "_option_string_actions", {}))
    return names


def explain_parse_error(message: str, parser=None) -> UsageError:
    """One line for a jsonargparse error ``message`` (the full text stays in ``--debug``)."""
    key = re.findall(r'Parser key "([^"]+)"', message)
    where = ".".join(k for k in key) if key else ""
    class_path = re.search(r"Problem with given class_path '([^']+)'", message)
    unknown = re.search(r"Option '([^']+)' is not accepted", message) or re.search(
        r"Key \"?'?([\w.]+)'?\"? is not expected", message)
    if unknown and class_path:
        name = unknown.group(1)
        hint = did_you_mean(name, class_arguments(class_path.group(1)))
        return UsageError(f"unknown option {key[0] + '.init_args.' if key else ''}{name} of "
                          f"{class_path.group(1)}{hint}; `--{key[0] if key else 'model'}.help "
                          f"{class_path.group(1)}` lists them")
    missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'|No module named '([\w.]+)'", message)
    if class_path and (missing or "Import path" in message or "not a subclass" in message or "does not"
                       in message and "import" in message):
        path = class_path.group(1)
        hint = did_you_mean(path, class_candidates(path), cutoff=0.8)
        detail = missing.group(0) if missing else message.strip().splitlines()[-1].strip()
        return UsageError(f"{where or 'class_path'}: cannot import class {path!r} ({detail}){hint}")
    expected = re.search(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", message) or re.search(
        r"Expected a (.+?)\. Got value: (.*)", message)
    if expected:
        names = list(dict.fromkeys(key))
        value = expected.group(2).strip()
        if len(names) > 1 and names[0] in ("model", "data"):
            option = f"{names[0]}.init_args.{names[-1]}"
        else:
            option = names[-1] if names else "a value"
        return UsageError(f"{option}: expected {expected.group(1)}, got {value!r}")
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        option = unrecognized.group(1).split("=")[0]
        hint = did_you_mean(option, option_names(parser)) if parser is not None else ""
        return UsageError(f"unknown option {option}{hint}; `zoo fit --help` lists the options")
    not_accepted = re.search(r"does not accept option '([\w.]+)'", message)
    if not_accepted:
        option = f"--{not_accepted.group(1)}"
        hint = did_you_mean(option, option_names(parser)) if parser is not None else ""
        return UsageError(f"unknown config key {not_accepted.group(1)!r}{hint.replace('--', '')}; "
                          "`zoo fit --print_config` shows the valid keys")
    one_argument = re.search(r"argument (--[\w.]+): expected one argument", message)
    if one_argument:
        return UsageError(f"{one_argument.group(1)} needs a value; a negative number in exponent form is "
                          "written --key=-1e-3")
    if "No action for key" in message or "is not expected" in message:
        bad = re.search(r'key "([^"]+)"|Key "?([\w.]+)', message)
        name = next((g for g in (bad.groups() if bad else ()) if g), "")
        hint = did_you_mean(f"--{name}", option_names(parser)) if parser is not None and name else ""
        return UsageError(f"unknown config key {name!r}{hint}; `zoo fit --print_config` shows the valid keys")
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    detail = next((line for line in lines if "Expected" in line or "not" in line), lines[-1] if lines else "")
    prefix = f"{where}: " if where and where not in detail else ""
    return UsageError(f"invalid arguments: {prefix}{detail}")
