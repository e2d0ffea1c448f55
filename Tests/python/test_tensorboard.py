#!/usr/bin/env python3
"""A vqmoe run's TensorBoard event files read with TensorBoard's own reader (EventAccumulator,
which also applies the SessionLog START a resumed run writes): every scalar of metrics.jsonl is
there under its tag, at its step, once, with its value (float32), and nothing else is.

usage: python Tests/python/test_tensorboard.py RUN_DIR [--resumed]
  --resumed: the run was resumed after dying past its last checkpoint, so its first event file
  holds steps that TensorBoard must drop (checked: more than one event file)
"""
import glob
import json
import math
import os
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

NOT_SCALARS = {"step", "split", "expert_load", "code_counts", "router_top1", "discrete_top1"}


def expected(run):
    """{tag: [(step, value)]} from metrics.jsonl, by the documented naming."""
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        rec = json.loads(line)
        split, step = rec["split"], rec["step"]
        for key, value in sorted(rec.items()):
            if key in NOT_SCALARS:
                continue
            tag = f"{split}/{key}"
            if isinstance(value, list):
                for i, layer in enumerate(value):
                    if isinstance(layer, list):
                        for j, level in enumerate(layer):
                            name = f"{tag}/layer_{i}" if len(layer) == 1 else f"{tag}/layer_{i}/level_{j}"
                            out.setdefault(name, []).append((step, level))
                    else:
                        out.setdefault(f"{tag}/layer_{i}", []).append((step, layer))
            else:
                out.setdefault(tag, []).append((step, value))
    return out


def main():
    run = sys.argv[1]
    files = sorted(glob.glob(os.path.join(run, "events.out.tfevents.*")))
    assert files, f"{run}: no event file"
    if "--resumed" in sys.argv:
        assert len(files) >= 2, f"{run}: a resumed run has one event file per process, found {files}"
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    want = expected(run)
    got = acc.Tags()["scalars"]
    assert sorted(got) == sorted(want), f"tags differ: only in events {set(got) - set(want)}, only in metrics {set(want) - set(got)}"
    for tag, points in want.items():
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == [s for s, _ in points], f"{tag}: steps {steps} != metrics.jsonl's {[s for s, _ in points]}"
        for e, (step, value) in zip(events, points):
            v = math.nan if value is None else float(np.float32(value))
            assert (math.isnan(v) and math.isnan(e.value)) or e.value == v, f"{tag} step {step}: {e.value} != {v}"
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert tag in want, f"{tag} missing"
    n = sum(len(p) for p in want.values())
    print(f"ok: {len(files)} event file(s), {len(want)} tags, {n} scalars equal to metrics.jsonl")


if __name__ == "__main__":
    main()
