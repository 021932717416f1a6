"""Plumbing of a paper file that trains a grid of runs and keeps them across reruns: its command line (a --flag
per Config field, presets that explicit flags override, comma lists), a protocol key (a short hash of the settings
that change a run's numbers), and a results.json that a rerun adds to -- runs finished under the same protocol
are skipped, none is ever replaced. Used by logit_correction.py; nothing here is paper-specific."""
import hashlib
import json
import os
from dataclasses import field, fields

from data.common import BadInput


def flag(default, help, group="run", choices=None):
    """A Config field that is also a --flag: its help text, its --help group, and (optionally) its choices."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


def parse_flags(cls, parser, argv, presets=()):
    """argv -> cls(...): one --flag per field of the dataclass cls (declared with flag()), in --help groups, each
    help ending in its default; a bool is a switch. presets: [(switch, {field: value})]: a given switch sets the
    fields that are not on the command line (the first such preset wins); flags given explicitly always win."""
    groups = {k: parser.add_argument_group(k) for k in dict.fromkeys(f.metadata["group"] for f in fields(cls))}
    for f in fields(cls):
        g, name = groups[f.metadata["group"]], "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            g.add_argument(name, action="store_true", help=f.metadata["help"])
        else:                                              # None: filled in below (a preset's value or the default)
            g.add_argument(name, type=type(f.default), default=None, choices=f.metadata["choices"],
                           help=f"{f.metadata['help']} (default {f.default if f.default != '' else '-'})")
    args = vars(parser.parse_args(argv))
    for f in fields(cls):
        if args[f.name] is None:
            args[f.name] = next((vals[f.name] for on, vals in presets if args[on] and f.name in vals), f.default)
    return cls(**args)


def parse_list(s, typ, name):
    """'1,2,3' -> [typ(v), ...]; a BadInput naming --name when a value does not parse or the list is empty."""
    try:
        vals = [typ(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--{name}: cannot parse {s!r} as a comma list of {typ.__name__}") from None
    if not vals:
        raise BadInput(f"--{name}: empty list")
    return vals


def protocol_key(protocol):
    """8 hex digits of the SHA-1 of the settings (a dict), independent of their order: runs are keyed by it."""
    return hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]


def load_results(path):
    """The results.json at path ({"runs": []} when there is none yet); a BadInput when it is not one."""
    if not os.path.exists(path):
        return {"runs": []}
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} exists but is not readable JSON ({e}); move it away") from None
    if not isinstance(res, dict) or not isinstance(res.get("runs"), list):
        raise BadInput(f"{path} exists but is not a results.json (no list of runs); move it away")
    return res


def by_protocol(res):
    """(key, its settings, its runs) for each protocol that results.json holds runs of, in key order."""
    for key in sorted({r.get("protocol") for r in res["runs"]}, key=str):
        yield key, res.get("protocols", {}).get(key, {}), [r for r in res["runs"] if r.get("protocol") == key]
