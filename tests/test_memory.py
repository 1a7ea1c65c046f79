"""Peak RSS while loading stays close to the weights' size (no fp32 detour, no second copy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from looplm.default_model import write_random_checkpoint

# VmHWM is the high-water mark of this process's own memory (ru_maxrss would include the
# parent's peak, inherited across fork + exec).
CHILD = """
import json, sys, torch
import looplm
def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = hwm_kib()
model = looplm.load(sys.argv[1], dtype=sys.argv[2])
after = hwm_kib()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before_kib": before, "peak_kib": after, "weight_bytes": weights}))
"""

# The Ouro-1.4B layer shapes with fewer layers, so the check runs in seconds (about 0.6 GB bf16).
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4, "vocab_size": 49152,
         "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_load_peak_rss_is_at_most_1_2x_weights(tmp_path: Path, dtype: str) -> None:
    from conftest import small_config

    write_random_checkpoint(tmp_path, small_config(**SHAPE), with_tokenizer=False)
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), dtype], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    growth = (stats["peak_kib"] - stats["before_kib"]) * 1024
    ratio = growth / stats["weight_bytes"]
    assert ratio <= 1.2, f"peak RSS grew by {growth / 2**20:.0f} MiB for {stats['weight_bytes'] / 2**20:.0f} MiB of weights"
