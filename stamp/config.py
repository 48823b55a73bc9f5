"""Load, validate and print STAMP's ``config.yaml``.

The schema (one pydantic model per section) lives in :mod:`stamp.config_models` (import the
models from there; this module does not re-export them). This module reads YAML, turns
validation failures into one-line messages that name the file and the dotted ``section.key``,
writes the packaged commented template and dumps a validated config back to YAML. It imports
neither torch nor prefect.
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import stat
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from stamp.config_models import StampConfig

__all__ = [
    "ConfigError",
    "dump_config",
    "MAX_CONFIG_BYTES",
    "load_config",
    "parse_config",
    "require_section",
    "section_yaml",
    "template_text",
    "write_template",
]

# Keys that STAMP's own docs or template spell differently from its schema.
_KNOWN_MISSPELLINGS = {"slide_list": "wsi_list", "feature_dir": "feat_dir", "feat_dir": "feature_dir"}


#: Config files larger than this are refused before they are read (a real one is a few KiB).
MAX_CONFIG_BYTES = 1 << 20
#: YAML aliases may expand to at most this many nodes in total (an alias bomb reaches billions).
MAX_ALIAS_NODES = 10_000
_MAX_PROBLEMS = 20


class ConfigError(ValueError):
    """A config file that cannot be used; the message has one line per problem.

    ``summary`` says the same without any value from the file (only keys and the kind of problem), for
    records that untrusted input must not write into (``stamp watch``).
    """

    def __init__(self, problems: list[str] | str, summary: list[str] | str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if summary is None:
            summary = "invalid config"
        self.summary = [summary] if isinstance(summary, str) else list(summary)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_document(self) -> yaml.Node | None:
        self._sizes: dict[int, int] = {}
        self._expanded = 0
        return super().compose_document()  # type: ignore[no-untyped-call,no-any-return]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """Count what every alias expands to; refuse past :data:`MAX_ALIAS_NODES` (alias bombs)."""
        is_alias = self.check_event(yaml.AliasEvent)  # type: ignore[no-untyped-call]
        mark = self.peek_event().start_mark if is_alias else None  # type: ignore[no-untyped-call]
        node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        if is_alias and node is not None:
            self._expanded += self._size(node)
            if self._expanded > MAX_ALIAS_NODES:
                raise _RefusedYAML(f"YAML aliases expand to more than {MAX_ALIAS_NODES} values", mark)
        return node  # type: ignore[no-any-return]

    def _size(self, node: yaml.Node) -> int:
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        if isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
        else:
            size = 1
        self._sizes[id(node)] = size
        return size


class _RefusedYAML(yaml.composer.ComposerError):
    """A YAML construct we refuse; its problem text holds nothing from the file."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(None, None, problem, mark)


def _read_capped(path: Path) -> bytes:
    """The file's bytes, refusing anything that is not a regular file of at most MAX_CONFIG_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} not found; run `stamp init` to create one", "config file not found"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{path}: cannot read the config file ({err.strerror or err})", "config file cannot be read"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file; give a config.yaml file", "config is not a file")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: config file is larger than 1 MiB; is it the right file?",
            "config.yaml is larger than 1 MiB",
        )
    return data


def load_config(path: Path | str) -> StampConfig:
    """Read and validate a config file.

    Raises :class:`ConfigError` when the file is missing, larger than :data:`MAX_CONFIG_BYTES`, not
    UTF-8, not valid YAML, or does not match the schema; the message then has one line per problem,
    each naming the file and the key.
    """
    path = Path(path)
    return parse_config(_read_capped(path), path)


def parse_config(data: bytes, path: Path | str) -> StampConfig:
    """Validate the bytes of a config file; ``path`` is only named in messages (see :func:`load_config`)."""
    path = Path(path)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file is larger than 1 MiB", "config.yaml is larger than 1 MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8",
            "config.yaml is not UTF-8 text",
        ) from None
    try:
        parsed = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
        if parsed is None:
            parsed = {}
        if not isinstance(parsed, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections at the top level, got {_show(parsed)}",
                "config.yaml is not a mapping of sections",
            )
        try:
            return StampConfig.model_validate(parsed)
        except ValidationError as err:
            errors = err.errors(include_url=False)
            root = yaml.compose(text, Loader=_UniqueKeyLoader)
            raise ConfigError(_problems(path, errors, root), _summary(errors)) from None
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(path, err), _yaml_summary(err)) from None
    except RecursionError:
        raise ConfigError(
            f"{path}: the YAML is nested too deeply; a config is a few levels of sections and keys",
            "config.yaml is nested too deeply",
        ) from None


def _yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return f"{path}:{where} invalid YAML: {_clip(detail)}"


def _yaml_summary(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, _RefusedYAML):
        return f"config.yaml: {err.problem}" + (f" (line {mark.line + 1})" if mark is not None else "")
    return "config.yaml: invalid YAML" + (f" at line {mark.line + 1}" if mark is not None else "")


_SUMMARY_KINDS = {
    "extra_forbidden": "unknown key",
    "missing": "missing required key",
    "literal_error": "not one of the allowed values",
    "value_error": "invalid value",
    **{
        kind: "out of range"
        for kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
    },
}


def _summary(errors: list[ErrorDetails]) -> list[str]:
    """Key and kind of each problem, with no value from the file (keys clipped to 40 characters)."""
    lines: list[str] = []
    for error in errors:
        loc = tuple(error["loc"])
        kind = _SUMMARY_KINDS.get(error["type"], error["type"])
        if error["type"] == "extra_forbidden":
            parent = _walk(loc[:-1])[0]
            line = f"{parent}: unknown key {_clip(repr(str(loc[-1])), 40)}"
        else:
            line = f"{_walk(loc)[0]}: {kind}"
        if line not in lines:
            lines.append(line)
    return lines[:5] + ([f"({len(lines) - 5} more)"] if len(lines) > 5 else [])


# --------------------------------------------------------------------------- error messages


def _problems(path: Path, errors: list[ErrorDetails], root: yaml.Node | None) -> list[str]:
    """One line per distinct problem, in file order, each ending with its YAML line number."""
    found: dict[str, float] = {}
    for error in errors[:_MAX_PROBLEMS]:
        line = _line_of(root, tuple(error["loc"]))
        text = f"{path}: {_describe(error)}" + (f" [line {line}]" if line else "")
        found.setdefault(text, line or float("inf"))
    problems = sorted(found, key=found.__getitem__)
    if len(errors) > _MAX_PROBLEMS:
        problems.append(f"{path}: ... and {len(errors) - _MAX_PROBLEMS} more problem(s)")
    return problems


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line of the deepest YAML node on the error's path (skipping pydantic's union tags)."""
    node, line = root, None
    for item in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if str(k.value) == str(item)), None)
            if pair is not None:
                line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and item < len(node.value):
            node = node.value[item]
            line = node.start_mark.line + 1
    return line


def _describe(error: ErrorDetails) -> str:
    """Turn one pydantic error into ``section.key: what was expected, got what``."""
    kind = error["type"]
    loc = tuple(error["loc"])
    value = error.get("input")
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    dotted, info, is_key = _walk(loc)
    if kind == "missing":
        return f"missing required key '{dotted}'"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        hint = _did_you_mean(str(value), allowed)
        if is_key:
            parent = dotted.rsplit(".", 1)[0]
            return f"{parent}: unknown key {_show(value)}{hint}; expected one of {_quoted(allowed)}"
        return f"{dotted}: expected one of {_quoted(allowed)}, got {_show(value)}{hint}"
    if kind in _RANGE_ERRORS and info is not None:
        return f"{dotted}: must be {_range_text(info)}, got {_show(value)}"
    if kind == "value_error":
        return f"{dotted}: {_clip(error['msg'].removeprefix('Value error, '))}"
    expected = _EXPECTED.get(kind) or _EXPECTED.get(kind.rsplit("_", 1)[0])
    if kind in ("model_type", "dict_type"):
        expected = "a mapping of keys (an indented YAML block)"
    if expected:
        return f"{dotted}: expected {expected}, got {_show(value)}"
    return f"{dotted}: {_clip(error['msg'])} (got {_show(value)})"


_EXPECTED = {
    "int": "an integer",
    "int_from_float": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "path": "a path",
    "list": "a list",
    "too_short": "a non-empty list",
}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _unknown_key(loc: tuple[Any, ...]) -> str:
    key = str(loc[-1])
    dotted = _walk(loc[:-1])[0]
    model = _model_at(loc[:-1])
    valid = list(model.model_fields) if model is not None else []
    hint = _did_you_mean(key, valid)
    if not hint and valid:
        hint = f" (valid keys: {', '.join(valid)})"
    if not loc[:-1]:
        return f"unknown section '{key}'{hint}"
    return f"unknown key '{dotted}.{key}'{hint}"


def _did_you_mean(word: str, choices: list[str]) -> str:
    known = _KNOWN_MISSPELLINGS.get(word)
    if known in choices:
        return f" (did you mean '{known}'?)"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _walk(loc: tuple[Any, ...]) -> tuple[str, FieldInfo | None, bool]:
    """Follow a pydantic error location through the schema.

    Returns the dotted key path (``section.key``, ``list[2]``), the info of the last field on
    the path, and whether the error is about a mapping key rather than a value.
    Union-member tags that pydantic inserts into locations are skipped.
    """
    parts: list[str] = []
    model: type[BaseModel] | None = StampConfig
    info: FieldInfo | None = None
    in_mapping = is_key = False
    for item in loc:
        if item == "[key]":
            is_key = True
        elif isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
        elif model is not None and item in model.model_fields:
            info = model.model_fields[item]
            parts.append(item)
            model = _model_type(info.annotation)
            in_mapping = typing.get_origin(info.annotation) is dict
        elif in_mapping:
            parts.append(str(item))
            in_mapping = False
    return ".".join(parts) or "(top level)", info, is_key


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = StampConfig
    for item in loc:
        if model is None or item not in model.model_fields:
            return None
        model = _model_type(model.model_fields[item].annotation)
    return model


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``annotation`` (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _range_text(info: FieldInfo) -> str:
    """Describe a field's numeric bounds, e.g. ``in the range 0 < x < 1 (or null)`` or ``>= 2``."""
    bounds = {
        attr: getattr(item, attr)
        for item in info.metadata
        for attr in ("gt", "ge", "lt", "le")
        if getattr(item, attr, None) is not None
    }
    low = next(((op, bounds[attr]) for attr, op in (("gt", "<"), ("ge", "<=")) if attr in bounds), None)
    high = next(((op, bounds[attr]) for attr, op in (("lt", "<"), ("le", "<=")) if attr in bounds), None)
    if low and high:
        text = f"in the range {_num(low[1])} {low[0]} x {high[0]} {_num(high[1])}"
    elif low:
        text = f"{low[0].replace('<', '>')} {_num(low[1])}"
    elif high:
        text = f"{high[0]} {_num(high[1])}"
    else:
        text = "in the allowed range"
    nullable = _is_union(info.annotation) and type(None) in typing.get_args(info.annotation)
    return text + (" (or null)" if nullable else "")


def _num(value: float) -> str:
    return f"{value:g}"


def _quoted(values: list[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 5
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """A short repr of a value from the file: bounded before formatting, so huge values cost nothing."""
    return _clip(_REPR.repr(value), 60)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text[: limit * 2].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- dumping


def dump_config(cfg: StampConfig, *, stamp_only: bool = False) -> str:
    """Return the validated config as YAML that :func:`load_config` reads back to an equal config.

    Paths become plain strings. A key whose value is ``None`` is left out when ``None`` is its
    default too, but kept (as ``null``) where ``null`` switches a feature off, e.g.
    ``brightness_cutoff: null``; dropping it would bring the default back on reload.
    ``stamp_only=True`` leaves out our ``orchestration`` section, so that STAMP itself
    accepts the output.
    """
    data = _plain(cfg)
    if stamp_only:
        data.pop("orchestration", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def section_yaml(cfg: StampConfig, section: str) -> str:
    """YAML of one section (``section:`` and its keys), e.g. to log it when a command starts."""
    return yaml.safe_dump(
        {section: _plain(require_section(cfg, section))},
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def require_section(cfg: StampConfig, section: str) -> BaseModel:
    """Return ``cfg.<section>``; raise :class:`ConfigError` if the config has no such section."""
    if section not in StampConfig.model_fields:
        raise ConfigError(
            f"unknown config section '{section}'{_did_you_mean(section, list(StampConfig.model_fields))}"
        )
    value = getattr(cfg, section)
    if value is None:
        raise ConfigError(f"the config has no '{section}' section; add one (`stamp init` writes a template)")
    return typing.cast(BaseModel, value)


def _plain(model: BaseModel) -> dict[str, Any]:
    dumped = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None and info.default is None:
            continue
        out[name] = _plain(value) if isinstance(value, BaseModel) else dumped[name]
    return out


# --------------------------------------------------------------------------- template


def template_text() -> str:
    """The packaged commented ``config.yaml`` template (every key, its default and meaning)."""
    return resources.files("stamp").joinpath("config.yaml").read_text(encoding="utf-8")


def write_template(path: Path | str) -> None:
    """Write the commented template to ``path``; raise FileExistsError if ``path`` exists."""
    path = Path(path)
    text = template_text()
    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(text)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; not overwriting it (remove it or pass another path with -c)"
        ) from None
