"""absl flags derived from the config tree (`dual_path.config`), and the tree read back from them.

Each field declared with `config.setting` is a flag of the same name, its help and default
the declaration's; a StageConfig field declared with `config.stage_setting` is one flag per
stage its declaration names, `stage{N}_<field>`. Sequences are comma-separated lists
(`--head_dims=1024,1024`), loss weights "rank:image:text". Flagfiles (experiments/configs/) set
them as before. Fields declared with `config.from_shards` come from the shards' manifest.json.

    define_flags(FLAGS)                      # in a command's define_flags()
    tree = train_config(FLAGS, stages=(1, 2))
    flag_values = parse_flagfiles(["experiments/configs/flickr8k.flags"], ["--batch_size=8"])
    tree = train_config(flag_values, stages=(1, 2))               # benchmarks
"""
import dataclasses
import types
import typing
from typing import Any, Sequence

from absl import flags

from dual_path import config, input_pipeline


class ConfigFlagError(ValueError):
    """A flag contradicts the shards or cannot be turned into its field; names the flag."""


def _flag_kind(kind) -> tuple[str, Any]:
    """(absl DEFINE kind, item type) of a field type: bool, integer, float, string, list."""
    if isinstance(kind, types.UnionType):  # X | None
        (kind,) = [part for part in typing.get_args(kind) if part is not type(None)]
    origin = typing.get_origin(kind)
    if origin is not None and issubclass(origin, Sequence):
        return "list", typing.get_args(kind)[0]
    return {bool: "bool", int: "integer", float: "float"}.get(kind, "string"), kind


def _define(flag_values: flags.FlagValues, name: str, kind, default, metadata: dict,
            help_prefix: str = "") -> None:
    help_text = help_prefix + metadata["help"]
    define, item = _flag_kind(kind)
    if metadata.get("choices"):
        flags.DEFINE_enum(name, default, list(metadata["choices"]), help_text, flag_values=flag_values)
    elif define == "list":
        flags.DEFINE_list(name, None if default is None else [f"{part:g}" for part in default],
                          help_text, flag_values=flag_values)
    elif define in ("integer", "float"):
        number = (flags.IntegerParser if define == "integer" else flags.FloatParser)(
            lower_bound=metadata.get("lower_bound"))
        optional = isinstance(kind, types.UnionType)
        flags.DEFINE(_NoneOr(number) if optional else number, name, default, help_text,
                     flag_values=flag_values, serializer=flags.ArgumentSerializer())
    elif define == "bool":
        flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif dataclasses.is_dataclass(item):  # loss weights: "rank:image:text"
        flags.DEFINE_string(name, None if default is None else str(default), help_text,
                            flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


class _NoneOr(flags.ArgumentParser):
    """A number parser that also takes "none": the field's None (e.g. --alpha=none unsets a
    flagfile's width multiplier)."""

    def __init__(self, number_parser: flags.ArgumentParser):
        self._number_parser = number_parser

    def parse(self, argument):
        if isinstance(argument, str) and argument.lower() == "none":
            return None
        return self._number_parser.parse(argument)

    def flag_type(self) -> str:
        return self._number_parser.flag_type()


def _settings(cls) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) of cls's fields that are flags."""
    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls)
            if "help" in field.metadata and not field.metadata.get("from_shards")]


def stage_flag(number: int, field_name: str) -> str:
    return f"stage{number}_{field_name}"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, require: bool = True) -> None:
    """Defines one flag per setting of TrainConfig, DualPathConfig and StageConfig
    (--embedding_dim is checked against the shards); with require, TrainConfig's REQUIRED
    fields (--model_dir, --shard_dir) are required flags."""
    for cls in (config.TrainConfig, config.DualPathConfig):
        for field, kind in _settings(cls):
            _define(flag_values, field.name, kind, field.metadata["flag_default"], field.metadata)
    for field, kind in _settings(config.StageConfig):
        for number, default in field.metadata["per_stage"].items():
            _define(flag_values, stage_flag(number, field.name), kind, default, field.metadata,
                    help_prefix=f"Stage {number}: ")
    if require:
        required = [field.name for field, _ in _settings(config.TrainConfig)
                    if field.default is config.REQUIRED]
        flags.mark_flags_as_required(required, flag_values=flag_values)


def _field_value(flag_values: flags.FlagValues, name: str, kind, metadata: dict):
    """The flag's value as its field holds it."""
    value = flag_values[name].value
    if value is None:
        return None
    if metadata.get("parse"):
        try:
            return metadata["parse"](value)
        except ValueError as error:
            raise ConfigFlagError(f"--{name}: {error}") from error
    define, item = _flag_kind(kind)
    if define == "list":
        try:
            return tuple(item(part) for part in value)
        except ValueError as error:
            raise ConfigFlagError(f"--{name}={','.join(value)}: {error}") from error
    return value


def _values(flag_values: flags.FlagValues, cls) -> dict:
    return {field.name: _field_value(flag_values, field.name, kind, field.metadata)
            for field, kind in _settings(cls)}


def model_config(flag_values: flags.FlagValues, manifest: dict) -> config.DualPathConfig:
    """The architecture from the flags; vocabulary size, classes, L and the word vector size
    from the shards' manifest.

    Raises:
      ConfigFlagError: --embedding_dim contradicts the shards' word vectors.
    """
    sizes = config.shard_sizes(manifest)
    values = model_settings(flag_values)
    if values["embedding_dim"] is not None and values["embedding_dim"] != sizes["embedding_dim"]:
        raise ConfigFlagError(
            f"--embedding_dim={values['embedding_dim']}, but the shards in "
            f"{flag_values['shard_dir'].value} hold {sizes['embedding_dim']}-d word vectors "
            "(manifest.json): leave it unset to take theirs")
    return config.DualPathConfig(**{**values, **sizes})


def stage_config(flag_values: flags.FlagValues, number: int) -> config.StageConfig:
    """Stage `number` from its stage{N}_* flags; fields without a flag for it keep the
    declaration's default."""
    values = {}
    for field, kind in _settings(config.StageConfig):
        if number in field.metadata["per_stage"]:
            values[field.name] = _field_value(flag_values, stage_flag(number, field.name), kind,
                                              field.metadata)
    return config.StageConfig(stage=number, **values)


def train_config(flag_values: flags.FlagValues, stages: Sequence[int]) -> config.TrainConfig:
    """The whole tree from parsed flags, with the given stages; the shards' manifest is read
    from --shard_dir.

    Raises:
      ConfigFlagError: a flag cannot be its field, or contradicts the shards.
      ValueError: the tree is inconsistent (TrainConfig's checks).
    """
    manifest = input_pipeline.load_manifest(flag_values["shard_dir"].value)
    return config.TrainConfig(
        model=model_config(flag_values, manifest),
        stages=tuple(stage_config(flag_values, number) for number in stages),
        **_values(flag_values, config.TrainConfig))


def parse_flagfiles(flagfiles: Sequence[str], overrides: Sequence[str] = ()) -> flags.FlagValues:
    """Fresh flags of the tree, parsed from flagfiles then overrides ("--name=value"), for tools
    that are not the training command (the benchmarks); --model_dir and --shard_dir optional.

    Raises:
      flags.Error: a flag is unknown or its value is invalid (the message names it).
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values, require=False)
    flag_values(["config_flags", *(f"--flagfile={path}" for path in flagfiles), *overrides])
    return flag_values


def model_settings(flag_values: flags.FlagValues) -> dict:
    """DualPathConfig's settings (not the sizes that come from shards) from parsed flags."""
    return _values(flag_values, config.DualPathConfig)
