"""Peak host memory of one SelfAttention2d(64) forward + backward on a 128×128 map (16384 tokens),
measured in a fresh subprocess: the `auto` backend (SDPA's flash path on CPU, the fused kernel on
CUDA) never materialises the 16384² score matrix; `naive` (the document's bmm + softmax) does."""

import json
import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import json, resource, sys
import torch
import attnsr

def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024

torch.manual_seed(0)
layer = attnsr.SelfAttention2d(64, backend=sys.argv[1])
x = torch.randn(1, 64, 128, 128, requires_grad=True)
layer(torch.randn(1, 64, 8, 8)).sum().backward()  # warm-up: lazy initialisation off the books
layer.zero_grad()
base = rss_kib()
layer(x).square().mean().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (peak - base) / 1024, "finite": bool(torch.isfinite(x.grad).all())}))
"""


def _peak_growth_mib(backend: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, backend], capture_output=True, text=True, env=env,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a host-memory check of the CPU backends")
def test_auto_backend_keeps_peak_memory_low_where_naive_needs_gibibytes():
    auto = _peak_growth_mib("auto")
    naive = _peak_growth_mib("naive")
    print(f"peak RSS growth, SelfAttention2d(64) fwd+bwd at 128x128: auto {auto['growth_mib']:.0f} MiB, "
          f"naive {naive['growth_mib']:.0f} MiB")
    assert auto["finite"] and naive["finite"]
    assert auto["growth_mib"] < 600, f"auto backend grew peak RSS by {auto['growth_mib']:.0f} MiB"
    assert naive["growth_mib"] > 2048, f"naive grew peak RSS by only {naive['growth_mib']:.0f} MiB"
