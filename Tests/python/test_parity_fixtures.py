#!/usr/bin/env python3
"""The parity fixtures the Swift tests read (Tests/EngineTests/Fixtures) are what
scripts/make_parity_fixtures.py computes with python/vqmoe_torch today: every number of a freshly
generated set within 1e-5 of the committed one (relative to each array's largest value), so the
package and the fixtures cannot drift apart.

usage: python Tests/python/test_parity_fixtures.py FRESH_DIR
"""
import glob
import json
import os
import sys

COMMITTED = os.path.join(os.path.dirname(__file__), "..", "EngineTests", "Fixtures")


def numbers(v, path=""):
    """(path, list of floats) for every numeric array or scalar in a fixture."""
    if isinstance(v, dict):
        for k in sorted(v):
            yield from numbers(v[k], f"{path}.{k}")
    elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
        yield path, [float(x) for x in v]
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield path, [float(v)]


def main(fresh):
    failures, files = [], sorted(glob.glob(os.path.join(COMMITTED, "parity_*.json")))
    for f in files:
        name = os.path.basename(f)
        a = dict(numbers(json.load(open(os.path.join(fresh, name)))))
        b = dict(numbers(json.load(open(f))))
        if set(a) != set(b):
            failures.append(f"{name}: entries differ: {sorted(set(a) ^ set(b))[:5]}")
            continue
        for key, want in b.items():
            got = a[key]
            scale = max(1.0, max(abs(x) for x in want))
            worst = max((abs(x - y) for x, y in zip(got, want)), default=0.0)
            if len(got) != len(want) or worst > 1e-5 * scale:
                failures.append(f"{name}{key}: max |diff| {worst:.3g} (scale {scale:.3g})")
    for line in failures:
        print("FAIL ", line)
    if failures or not files:
        sys.exit(1)
    print(f"{len(files)} parity fixtures: the committed values are what vqmoe_torch computes")


if __name__ == "__main__":
    main(sys.argv[1])
