"""Command-line flags generated from the config dataclasses (never written twice)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, config_fields


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    """int | None -> int; int | float | str | None -> str (parsed by the dataclass)."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing})  # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return args[0] if len(args) == 1 else str
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in config_fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(f.type)
        help_ = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction,
                               default=f.default, help=help_)
        elif f.metadata.get("nargs"):
            elem = typing.get_args(tp)[0] if typing.get_args(tp) else str
            group.add_argument(_flag(f.name), type=elem, nargs=f.metadata["nargs"],
                               default=f.default, help=help_)
        else:
            group.add_argument(_flag(f.name), type=tp, default=f.default, help=help_,
                               choices=f.metadata.get("choices"))


def config_from_args(cls, args: argparse.Namespace, **overrides):
    kw = {f.name: getattr(args, f.name) for f in config_fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for cls in (ModelConfig, CacheConfig, SchedulerConfig):
        add_config_args(parser, cls, skip)


def engine_config_from_args(args: argparse.Namespace, **model_overrides) -> EngineConfig:
    return EngineConfig(
        model=config_from_args(ModelConfig, args, **model_overrides),
        cache=config_from_args(CacheConfig, args),
        scheduler=config_from_args(SchedulerConfig, args),
    )


__all__ = ["add_config_args", "add_engine_args", "config_from_args", "engine_config_from_args",
           "dataclasses"]
