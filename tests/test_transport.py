"""Stand-alone broadcast group (gloo on loopback) and transport helpers."""

import socket
import threading

import pytest
import torch
import torch.multiprocessing as mp

from vllm_fp8_overlay.sync.transport import (
    BroadcastGroup,
    RecordingTransport,
    ReplayTransport,
    TransportError,
    assign_rank_offsets,
    resolve_backend,
)

TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_assign_rank_offsets():
    assert assign_rank_offsets([1]) == ([1], 2)
    assert assign_rank_offsets([2, 4, 1]) == ([1, 3, 7], 8)
    with pytest.raises(ValueError):
        assign_rank_offsets([2, 0])


def test_resolve_backend_cpu():
    assert resolve_backend("auto", "cpu") == ("gloo", torch.device("cpu"))
    assert resolve_backend("gloo", None) == ("gloo", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_backend("nccl", "cpu")
    with pytest.raises(ValueError):
        resolve_backend("mpi", "cpu")


def test_recording_and_replay():
    rec = RecordingTransport()
    rec.broadcast(torch.arange(5, dtype=torch.uint8))
    rec.broadcast(torch.zeros(0, dtype=torch.uint8))  # empty broadcasts are no-ops
    rep = ReplayTransport(rec.messages)
    out = torch.zeros(5, dtype=torch.uint8)
    rep.broadcast(out)
    assert out.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TransportError):
        rep.broadcast(out)  # exhausted
    short = ReplayTransport([b"abc"])
    short.broadcast(out)  # fewer bytes than posted: the rest keeps its old bytes (as gloo does)
    assert out.tolist() == [97, 98, 99, 3, 4] and not short.aborted
    long = ReplayTransport([b"abcdefgh"])
    with pytest.raises(TransportError):
        long.broadcast(out)  # more bytes than posted: gloo would abort the process
    assert long.aborted


def test_invalid_arguments():
    with pytest.raises(ValueError):
        BroadcastGroup("127.0.0.1", 1, 1, 0, backend="gloo")
    with pytest.raises(ValueError):
        BroadcastGroup("127.0.0.1", 1, 3, 3, backend="gloo")


def _receiver(port, world_size, rank, q):
    try:
        with BroadcastGroup("127.0.0.1", port, world_size, rank, backend="gloo", timeout=30) as g:
            buf = torch.zeros(16, dtype=torch.uint8)
            g.broadcast(buf[4:12])  # slice of a larger buffer
            big = torch.empty(3 << 20, dtype=torch.uint8)
            g.broadcast(big)
            q.put((rank, buf.tolist(), int(big.sum())))
    except Exception as e:  # pragma: no cover - reported to the parent
        q.put((rank, repr(e), None))


def test_gloo_broadcast_two_receivers():
    port = _free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(port, 3, r, q), daemon=True) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        with BroadcastGroup("127.0.0.1", port, 3, 0, backend="gloo", timeout=TIMEOUT_S) as g:
            assert g.rank == 0 and g.world_size == 3 and g.backend == "gloo"
            h = g.broadcast(torch.arange(1, 9, dtype=torch.uint8), async_op=True)
            big = torch.ones(3 << 20, dtype=torch.uint8)
            g.broadcast(big)
            h.wait()
            results = sorted(q.get(timeout=TIMEOUT_S) for _ in procs)
        for rank, buf, total in results:
            assert buf == [0] * 4 + list(range(1, 9)) + [0] * 4, (rank, buf)
            assert total == 3 << 20
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT_S)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)


def test_handshake_mismatch_fails_loudly():
    """A receiver that disagrees with rank 0 about the group refuses it at the
    handshake, with a reason on both sides (rank 0 does not wait for a timeout)."""
    port = _free_port()
    errors = {}

    def rank0():
        try:
            BroadcastGroup("127.0.0.1", port, 2, 0, backend="gloo", timeout=3)
        except TransportError as e:
            errors[0] = e

    t = threading.Thread(target=rank0, daemon=True)
    t.start()
    with pytest.raises(TransportError, match="world size"):
        BroadcastGroup("127.0.0.1", port, 3, 1, backend="gloo", timeout=3)
    t.join(timeout=30)
    assert isinstance(errors.get(0), TransportError) and "world size" in str(errors[0])


def test_broadcast_after_close_raises():
    g = RecordingTransport()
    g.close()
    port = _free_port()
    errors = []

    def peer():
        try:
            BroadcastGroup("127.0.0.1", port, 2, 1, backend="gloo", timeout=20).close()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    grp = BroadcastGroup("127.0.0.1", port, 2, 0, backend="gloo", timeout=20)
    t.join(timeout=30)
    grp.close()
    grp.close()  # idempotent
    with pytest.raises(TransportError):
        grp.broadcast(torch.zeros(1, dtype=torch.uint8))
    assert not errors
