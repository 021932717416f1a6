"""A grid of runs that survives reruns: comma lists from the command line, a protocol key (a short hash of the
settings that change a run's numbers), and a results.json that a rerun adds to -- runs finished under the same
protocol are skipped, none is ever replaced. Used by logit_correction.py; nothing here is paper-specific."""
import hashlib
import json
import os

from data.common import BadInput


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
