"""Peak-RSS rise of one sla.MultiheadAttention forward (no_grad, causal, RoPE) at sequence length N:
shows the layer adds no N×N tensor on the causal / key-padding path.

    PYTHONPATH=. python3 benchmarks/layer_memory.py 16384 full
"""

import resource
import sys

import torch

import sparse_linear_attn as sla

torch.set_num_threads(1)
N = int(sys.argv[1])
variant = sys.argv[2]
layer = sla.MultiheadAttention(64, 4, batch_first=True, attention=variant, positional="rope")
x = torch.randn(1, N, 64)


def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])


base = rss()
with torch.no_grad():
    out = layer(x, x, x, need_weights=False, is_causal=True)[0]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(
    f"N={N} {variant}: peak RSS rise {(peak - base) / 1024:.1f} MiB; "
    f"one N×N fp32 head would be {N * N * 4 / 2**20:.0f} MiB"
)
