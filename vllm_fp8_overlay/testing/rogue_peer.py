"""Faulty weight-sync peers for the fault tests: a rank 0 that passed the real
handshake and then sends whatever a test tells it to, and the transfers of
well-formed messages for a test to break."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["sync_bucket_transfers", "sync_end_transfers", "sync_rogue_group", "sync_rogue_hello",
           "sync_send_raw", "sync_step_transfers"]


def sync_rogue_group(port: int, world_size: int, *, host: str = "127.0.0.1", bucket_bytes: int = 1 << 16,
                     timeout: float = 60.0) -> Any:
    """Rank 0 of a gloo weight-sync group (real handshake, real gloo)."""
    from ..sync.transport import BroadcastGroup

    return BroadcastGroup(host, port, world_size, 0, backend="gloo", timeout=timeout, bucket_bytes=bucket_bytes)


def sync_send_raw(group: Any, transfers: Sequence[bytes]) -> None:
    """Broadcast each byte string as one transfer, as it is."""
    for b in transfers:
        group.broadcast(torch.frombuffer(bytearray(b), dtype=torch.uint8))


def sync_bucket_transfers(tensors: Sequence[tuple[str, torch.Tensor]], step: int, *, index: int = 0,
                          last: bool = True, layout: dict | None = None, checksum: str = "crc32") -> list[bytes]:
    """The two transfers of a well-formed BUCKET message, ``[control,
    payload]`` (edit them to break it; :func:`sync_step_transfers` puts
    messages in wire order)."""
    from ..sync import wire

    hdr, man, payload = wire.encode_bucket(tensors, step=step, index=index, last=last, layout=layout,
                                           checksum=checksum)
    return wire.bucket_transfers(wire.decode_header(hdr), man, payload)


def sync_end_transfers(step: int, num_buckets: int, num_tensors: int, num_bytes: int) -> list[bytes]:
    from ..sync import wire

    return [wire.encode_control(*wire.encode_end(wire.EndOfStep(step, num_buckets, num_tensors, num_bytes)))]


def sync_step_transfers(*messages: Sequence[bytes]) -> list[bytes]:
    """Messages (``[control]`` or ``[control, payload]``) in wire order: a
    payload goes out after the next message's control."""
    from ..sync import wire

    return wire.step_transfers(*messages)


def sync_rogue_hello(port: int, world_size: int, *, host: str = "127.0.0.1", timeout: float = 30.0,
                     group_name: str = "weights", **fields: Any) -> list[Any]:
    """Play rank 0 of the handshake only, with HELLO fields overridden (e.g.
    ``header_size=65``, ``wire_version=3``); returns every receiver's ACK."""
    import datetime as dt
    import os as _os

    import torch.distributed as dist

    from ..sync import wire

    store = dist.PrefixStore(f"vfo8/{group_name}/", dist.TCPStore(
        host, port, world_size, is_master=True, timeout=dt.timedelta(seconds=timeout), wait_for_workers=False))
    hello = dict(world_size=world_size, group_id=_os.urandom(16), backend="gloo", bucket_bytes=1 << 16,
                 max_manifest_bytes=8 << 20, max_tensor_bytes=1 << 30, max_tensors_per_bucket=1024, max_dims=8)
    hello.update(fields)
    store.set("hello", wire.encode_hello(wire.Hello(**hello)))
    keys = [f"ack/{r}" for r in range(1, world_size)]
    store.wait(keys, dt.timedelta(seconds=timeout))
    acks = [wire.decode_ack(store.get(k)) for k in keys]
    store.set("go", wire.encode_go(False))
    return acks
