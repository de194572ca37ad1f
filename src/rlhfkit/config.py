"""Configuration: one dataclass per stage, filled from defaults, then a YAML file, then `--set key=value`.

Each field is documented once, in its dataclass (a string literal under the field). Nested sections are
addressed with dots: `--set train.lr=1e-5`. Unknown keys and values of the wrong type are errors that name
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from rlhfkit.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def setting(default: Any, *, gt: float | None = None, ge: float | None = None,
            lt: float | None = None, le: float | None = None) -> Any:  # fmt: skip
    """A dataclass field with a numeric range, checked where the config is parsed (`from_dict`):
    `lr: float = setting(2e-5, gt=0)`. None (for optional settings) is always allowed."""
    return dataclasses.field(default=default, metadata={"range": (gt, ge, lt, le)})


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every ranged setting of a config built in Python (`from_dict` checks what it parses)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "range" in f.metadata:
            _check_range(value, f.metadata["range"], f"{prefix}{f.name}")
        if isinstance(value, float) and not math.isfinite(value) and f.default is not value:
            raise ConfigError(f"{prefix}{f.name}: expected a finite number, got {value!r}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, f"{prefix}{f.name}.")


def _check_range(value: Any, bounds: tuple[float | None, ...], key: str) -> None:
    if value is None:
        return
    gt, ge, lt, le = bounds
    tests = [(gt, lambda v, b: v > b, ">"), (ge, lambda v, b: v >= b, ">="),
             (lt, lambda v, b: v < b, "<"), (le, lambda v, b: v <= b, "<=")]  # fmt: skip
    failed = [f"{op} {bound:g}" for bound, ok, op in tests if bound is not None and not ok(value, bound)]
    if failed:
        wanted = " and ".join(f"{op} {bound:g}" for bound, _, op in tests if bound is not None)
        raise ConfigError(f"{key}: must be {wanted}, got {value!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:  # noqa: C901, PLR0912 - one branch per type
    """Check (and where lossless, convert) a value against a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # a member the value already is comes first: "all-linear" for `list[str] | str` stays a string
        members = sorted((a for a in args if a is not type(None)),
                         key=lambda a: not (isinstance(a, type) and isinstance(value, a)))  # fmt: skip
        for arg in members:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple) and isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]  # `--set reward=runs/rm` for a list field: a list of one
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _apply_renames(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Move settings a config class has renamed (its `RENAMED` map, old key -> "section.key") to their
    new place, with a deprecation message (given both ways, the old key's value is used). An old key equal
    to its new section's name (`data: FILE` -> `data.path`) is renamed only when it is not a mapping."""
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})
    if not renamed or not any(key in data for key in renamed):
        return data
    from rlhfkit.console import console

    data = dict(data)
    for old, new in renamed.items():
        section, _, key = new.partition(".")
        if old not in data or (old == section and isinstance(data[old], dict)):
            continue
        value = data.pop(old)
        moved = dict(data[section]) if isinstance(data.get(section), dict) else {}
        moved[key] = value
        data[section] = moved
        console.print(
            f"[yellow]deprecated[/]: setting '{prefix}{old}' is now '{prefix}{new}' "
            "(the old name works until rlhfkit 0.3)",
            highlight=False,
        )
    return data


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a dataclass from a (nested) dict, rejecting unknown keys."""
    data = _apply_renames(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown setting '{prefix}{key}' (known: {', '.join(sorted(names))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        default = fields[key].default_factory
        if (
            isinstance(value, dict)
            and dataclasses.is_dataclass(hints[key])
            and default is not dataclasses.MISSING
        ):
            # a section's own defaults (e.g. SFT's learning rate in its `train` section) stay unless set
            value = _merge(to_dict(default()), value)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
        if "range" in fields[key].metadata:
            _check_range(kwargs[key], fields[key].metadata["range"], f"{prefix}{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML-able data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Defaults <- `base` (e.g. CLI options) <- YAML file <- `--set key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of settings")
        data = _merge(data, loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set(data, key.strip(), value)
    return from_dict(cls, data)


def save_config(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def claim_run_dir(cfg: Any, out: Path, write: bool = True) -> None:
    """Refuse `out` when its config.yaml holds different settings; otherwise create it and save `cfg`
    (when `write`: one process of a distributed run writes). A run directory belongs to one config."""
    saved = out / "config.yaml"
    if saved.is_file():
        saved_settings = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
        diff = config_diff(saved_settings, to_dict(cfg), defaults=_defaults(cfg))
        if diff:
            raise ConfigError(
                f"{out} holds a run with a different configuration ({'; '.join(diff[:3])}); "
                "use another --output or delete that directory (after a stop, --resume-with-changes takes a "
                "changed learning rate, schedule or step count)"
            )
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)


def accept_changes(cfg: Any, out: Path, safe: Sequence[str]) -> list[str]:
    """`--resume-with-changes`: let `cfg` take over the run in `out` when it differs from the saved config
    only in `safe` settings (dotted keys; a key ending in "." stands for its whole section). config.yaml is
    rewritten and the change appended to config_history.jsonl; returns the changes (empty: none). Any
    other difference is refused, naming the key."""
    import json
    import time

    from rlhfkit.fileio import write_atomic

    saved = out / "config.yaml"
    if not saved.is_file():
        return []
    old = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changes = _changed_keys(old, to_dict(cfg))
    unsafe = [
        c for c in changes if not any(c[0] == k or (k.endswith(".") and c[0].startswith(k)) for k in safe)
    ]
    if unsafe:
        key, a, b = unsafe[0]
        allowed = ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in safe)
        raise ConfigError(
            f"{out}: cannot resume with {key} changed ({a!r} -> {b!r}); only these settings may change on a "
            f"resume: {allowed}. Use another --output for a different run"
        )
    if changes:
        described = [f"{k}: {a!r} -> {b!r}" for k, a, b in changes]
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": described}
        with open(out / "config_history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        write_atomic(saved, yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return described
    return []


def _changed_keys(
    old: dict[str, Any], new: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        default = (defaults or {}).get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.", default if isinstance(default, dict) else None)
        elif key not in old and defaults is not None and key in defaults and b == default:
            continue  # a setting added since the run was saved, at its default: the run had that behaviour
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _defaults(cfg: Any) -> dict[str, Any] | None:
    """The settings of `cfg`'s class at their defaults (None when it cannot be built without arguments)."""
    try:
        return to_dict(type(cfg)())
    except TypeError:
        return None


def config_diff(
    old: dict[str, Any], new: dict[str, Any], prefix: str = "", defaults: dict[str, Any] | None = None
) -> list[str]:
    """Human-readable differences between two config dicts (for refusing to resume a different run). With
    `defaults` (the config class's), a key the old config lacks is no difference where the new config holds
    its default: a setting added to rlhfkit since the run was saved, which a default keeps as it was."""
    return [f"{key}: {a!r} -> {b!r}" for key, a, b in _changed_keys(old, new, prefix, defaults)]


def import_spec(spec: str, setting: str) -> Any:
    """The object named by a `module:attribute` setting (a reward function, a gold preference)."""
    import importlib
    import os
    import sys

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{setting} {spec!r}: expected module:function")
    if os.getcwd() not in sys.path:  # `rlhfkit` as a console script: the user's modules sit in the cwd
        sys.path.append(os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting} {spec!r}: {exc}") from None
