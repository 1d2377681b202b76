"""Turning YAML / CLI values into a field's type, and the files and overrides they come from.

Every message names the field (and the file, as `where`), so that bad input fails in one line.
"""

from __future__ import annotations

import math
import os
import re
import struct
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from raydist.errors import ConfigError


def coerce(name: str, value: Any, type_: str, where: str = "") -> Any:
    optional = type_.endswith("| None")
    base = type_.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str) and value in ("", "null", "none")):
        if optional:
            return None
        raise ConfigError(f"{where}{name}: got nothing; expected {describe(base)}")
    try:
        return PARSERS[base](value)
    except OutOfRange as e:
        raise ConfigError(f"{where}{name}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}{name}: got {value!r}; expected {describe(base)}") from None


def as_int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return int(v) if not isinstance(v, str) else int(v.strip())


def as_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(v)
    return x


class OutOfRange(ValueError):
    """A number of the right type that the run cannot hold; its message says why."""


FLOAT32_MAX = struct.unpack("f", b"\xff\xff\x7f\x7f")[0]
FLOAT32_MIN = struct.unpack("f", b"\x01\x00\x00\x00")[0]  # the smallest subnormal


def as_float32(v: Any) -> float:
    """A float knob: training computes in float32, where a larger number is inf and a smaller
    one 0 (a learning rate of 1e308 fails inside the optimizer, an eps of 1e-300 divides by 0)."""
    x = as_float(v)
    if abs(x) > FLOAT32_MAX:
        raise OutOfRange(f"got {x:g}, too large for float32 (at most {FLOAT32_MAX:.4g})")
    if x and not struct.unpack("f", struct.pack("f", x))[0]:
        raise OutOfRange(f"got {x:g}, too small for float32 (it rounds to 0; at least {FLOAT32_MIN:.4g})")
    return x


def as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.lower() in ("true", "yes", "1")
    raise ValueError(v)


def as_str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(v)
    return v


def as_int_list(v: Any) -> list[int]:
    if isinstance(v, str):
        v = [p for p in v.strip("[] ").split(",") if p.strip()]
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list):
        raise ValueError(v)
    return [as_int(x) for x in v]


def as_int_or_range(v: Any) -> int | list[int]:
    """An integer, or a pair: [min, max] (YAML, --set) or MIN-MAX (a CLI flag)."""
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*-\s*\d+\s*", v):
        v = v.split("-")
    if isinstance(v, str) and v.strip().startswith("["):
        v = as_int_list(v)
    if isinstance(v, list | tuple):
        if len(v) != 2:
            raise ValueError(v)
        return [as_int(x) for x in v]
    return as_int(v)


def as_mapping(v: Any) -> dict[str, Any]:
    """A mapping of names to YAML values; from the command line, YAML text like {width: 256}."""
    if isinstance(v, str):
        try:
            v = yaml.safe_load(v) if v.strip() else {}
        except yaml.YAMLError:
            raise ValueError(v) from None
    if v is None:
        v = {}
    if not isinstance(v, dict) or not all(isinstance(k, str) and k.isidentifier() for k in v):
        raise ValueError(v)
    return dict(v)


SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(?:([kKmMgGtT])(i?)[bB]?|[bB]?)\s*")
SIZE_UNITS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str) -> float | None:
    """'16GiB' (binary), '2GB' or '2G' (decimal), '512MiB', '1e9' (bytes) -> bytes; None if not a
    size. The unit rules of `raydist plan`'s rates (parse_bandwidth below), with binary prefixes."""
    m = SIZE.fullmatch(text) if isinstance(text, str) else None
    if not m:
        return None
    power = SIZE_UNITS[m.group(2).lower()] if m.group(2) else 0
    return float(m.group(1)) * (1024 if m.group(3) else 1000) ** power


IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")
"""module.path:attribute, e.g. mypkg.nets:make_model"""


def is_import_path(value: str) -> bool:
    return bool(IMPORT_PATH.fullmatch(value))


RAY_ADDRESS_FORMS = "host:port, ray://host:port, auto or local"
"""The cluster addresses ray.init (Ray 2.60) takes: a head's GCS, a Ray Client server, the Ray
`ray start` left on this machine, a fresh embedded one."""
PROBE_S = 10.0
"""How long joining a cluster waits for its address to accept a connection (raydist.runtime.connect):
ray.init itself retries a silent address 20 times, ~40 s each (Ray 2.60)."""
HOST_PORT = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9_.-]+)):(\d{1,5})")


def host_port(text: str) -> tuple[str, int] | None:
    """('host', port) of 'host:port' or '[ipv6]:port'; None if `text` is neither (Ray's own
    check fails late, with a 30-line traceback, on a port that is not a number)."""
    m = HOST_PORT.fullmatch(text)
    if not m or not 1 <= int(m.group(3)) <= 65535:
        return None
    return m.group(1) or m.group(2), int(m.group(3))


def is_ray_address(text: str) -> bool:
    return text in ("auto", "local") or host_port(text.removeprefix("ray://")) is not None


def cluster_address(given: str | None, field: str = "address") -> tuple[str | None, str]:
    """The cluster to join and the field that names it: `given` (the address knob, a --address
    flag), else RAY_ADDRESS (which ray.init reads for "auto" too); None: none is named. A
    malformed one is refused in one line, before any work."""
    env = os.environ.get("RAY_ADDRESS")
    if env and given in (None, "auto"):
        given, field = env, "RAY_ADDRESS"
    if given:
        check_ray_address(given, field)
    return given or None, field


def check_ray_address(text: str, field: str) -> None:
    """A cluster address named by `field` (the address knob, --address, RAY_ADDRESS) in one of
    the forms ray.init takes."""
    if not is_ray_address(text):
        raise ConfigError(f"{field}: got {text!r}; expected {RAY_ADDRESS_FORMS}")


PARSERS = {"int": as_int, "float": as_float32, "bool": as_bool, "str": as_str, "list[int]": as_int_list,
           "int | list[int]": as_int_or_range, "dict[str, Any]": as_mapping}


def describe(base: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a non-empty string", "list[int]": "a list of integers",
            "int | list[int]": "an integer or a range [min, max]",
            "dict[str, Any]": "a mapping of names to values, e.g. {width: 256}"}[base]


# --- files and overrides ----------------------------------------------------------------------

class DuplicateKey(yaml.constructor.ConstructorError):
    pass


MERGE = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, and the user meant one of them."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key_node.tag == MERGE or not isinstance(key, Hashable):
                continue  # merged keys may be overridden; an unhashable key fails in super()
            if key in seen:
                raise DuplicateKey(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; every way it can be wrong is one ConfigError
    naming the file (and the line, where there is one)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        data = p.read_bytes()
        raw = yaml.load(data.decode("utf-8"), Loader=StrictLoader)
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (line {line_of(data, e.start)}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark else ""
        what = e.problem if isinstance(e, DuplicateKey) else "not valid YAML"
        raise ConfigError(f"{p}: {what}{line}") from None
    if raw is None:
        raise ConfigError(f"{p}: is empty; expected a mapping of field: value")
    if not isinstance(raw, dict):
        got = "a list" if isinstance(raw, list) else f"the single value {raw!r}"
        raise ConfigError(f"{p}: expected a mapping of field: value at the top level, not {got}")
    return raw


def parse_sets(items: list[str], flag: str = "--set") -> dict[str, str]:
    """`--set key=value` pairs; values stay strings and are typed by `coerce`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag}: got '{item}'; expected key=value")
        out[key.strip()] = value.strip()
    return out


# --- links: `raydist plan`'s flags and a sweep's `plan:` --------------------------------------

UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(text: str) -> float:
    """'25Gbit/s', '10GB/s', '100Mbit/s' -> bytes per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgtKMGT]?)(bit|b|B|byte)(/s|ps)?\s*", text)
    if not m:
        raise ConfigError(f"bandwidth: got '{text}'; expected a rate like 25Gbit/s or 3GB/s")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    return value / 8 if m.group(3) in ("bit", "b") else value


def parse_duration(text: str) -> float:
    """'10us', '2ms', '0.5s' -> seconds."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ns|us|ms|s)\s*", text)
    if not m:
        raise ConfigError(f"latency: got '{text}'; expected a time like 10us or 2ms")
    return float(m.group(1)) * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


MAPPINGS = ("model_args", "data_args")
"""Knobs that hold a mapping; `model_args.width: 256` names one entry (a sweep searches it)."""

def fold(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with each 'model_args.width: v' folded into raw['model_args']['width']."""
    out = {k: v for k, v in raw.items() if k.split(".", 1)[0] not in MAPPINGS or "." not in k}
    for key, value in raw.items():
        head, dot, name = key.partition(".")
        if dot and head in MAPPINGS:
            inner = out.get(head)
            out[head] = {**(inner if isinstance(inner, dict) else {}), name: value}
    return out
