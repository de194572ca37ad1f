"""Configuration: one dataclass per stage, filled from defaults, then a YAML file, then `--set key=value`.

Each field is documented once, in its dataclass (a string literal under the field). Nested sections are
addressed with dots: `--set train.lr=1e-5`. Unknown keys and values of the wrong type are errors that name
the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhfkit.errors import ConfigError

T = TypeVar("T")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
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
    if dataclasses.is_dataclass(annotation):
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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
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
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown setting '{prefix}{key}' (known: {', '.join(sorted(names))})")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
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
        diff = config_diff(yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, to_dict(cfg))
        if diff:
            raise ConfigError(
                f"{out} holds a run with a different configuration ({'; '.join(diff[:3])}); "
                "use another --output or delete that directory"
            )
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, saved)


def import_spec(spec: str, setting: str) -> Any:
    """The object named by a `module:attribute` setting (a reward function, a gold preference)."""
    import importlib

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{setting} {spec!r}: expected module:function")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting} {spec!r}: {exc}") from None


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts (for refusing to resume a different run)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
