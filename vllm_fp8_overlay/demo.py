"""End-to-end demo: a trainer pushes new weights into a running vLLM every step.

``python -m vllm_fp8_overlay demo --steps 3`` builds a tiny Llama and its FP8
serving checkpoint (compressed-tensors, per-channel FP8 weights, dynamic
per-token activations, written by this package's quantizer), starts real vLLM
on it with :class:`~vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension`,
and then, per step, perturbs the BF16 weights like an optimizer step would,
quantizes and broadcasts them (gloo on CPU, NCCL on GPUs), lets vLLM validate
and load them, and checks **warm == cold**: every vLLM parameter after the
update equals, bit for bit, what vLLM builds at a cold start from an offline
FP8 checkpoint of the same weights.

The cold reference (``--cold reload``, default) is built inside the served
worker by ``WeightSyncExtension.weight_sync_cold_digest``: vLLM's own
``get_model()`` -- what a cold start runs: construct the model, read the
offline checkpoint of W_k with the default loader,
``process_weights_after_loading`` -- into a second model object that is
hashed and dropped. That this equals a fresh engine is checked first: on the
W0 checkpoint it must reproduce the digest of the freshly started engine.
``--cold fresh`` instead starts a whole new engine per step (slow on small
machines); ``--cold none`` skips the check.

Console: the demo's own lines, a table whose columns add up to each push's
wall time, and where the run's time went (engine start-up and the warm == cold
checks dwarf the updates on a small machine). vLLM's own output goes to
``vllm.log`` in the run directory (``--verbose``: the console), redirected at
the file descriptors that vLLM's engine core and worker processes inherit:
several of their lines (Triton's import-time warning, printed before vLLM
configures logging; torch's C++ warnings; progress bars; Python warnings)
bypass vLLM's logger, so ``VLLM_LOGGING_LEVEL`` cannot keep them off the
console. The run directory also takes the temporary files vLLM would leave in
``/tmp``, and is removed at exit unless ``--keep``, ``--workdir`` or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from .demo_report import legend, mib, push_row, round_to_sum, step_table

__all__ = [
    "CT_FP8_CHANNEL_DYNAMIC",
    "write_serving_checkpoint",
    "free_port",
    "main",
]

#: compressed-tensors FP8-dynamic (per-channel weights, per-token dynamic
#: activations), as llm-compressor writes it
CT_FP8_CHANNEL_DYNAMIC: dict[str, Any] = {
    "config_groups": {
        "group_0": {
            "input_activations": {
                "actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                "num_bits": 8, "observer": None, "observer_kwargs": {}, "strategy": "token",
                "symmetric": True, "type": "float",
            },
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None, "block_structure": None, "dynamic": False, "group_size": None,
                "num_bits": 8, "observer": "minmax", "observer_kwargs": {}, "strategy": "channel",
                "symmetric": True, "type": "float",
            },
        }
    },
    "format": "float-quantized",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}

EXTENSION = "vllm_fp8_overlay.sync.worker_extension.WeightSyncExtension"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11]]


def write_serving_checkpoint(
    directory: str | os.PathLike[str],
    bf16_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    quantization_config: Mapping[str, Any] | None,
) -> Path:
    """Offline serving checkpoint of ``bf16_state``: FP8 via this package's
    quantizer when ``quantization_config`` is given, else the BF16 tensors."""
    from .formats import detect_layout, quantize_weights
    from .testing.tiny_models import save_checkpoint

    cfg = dict(config)
    cfg.pop("quantization_config", None)
    if quantization_config is None:
        return save_checkpoint(directory, dict(bf16_state), cfg)
    cfg["quantization_config"] = dict(quantization_config)
    layout = detect_layout(cfg)
    return save_checkpoint(directory, dict(quantize_weights(bf16_state.items(), layout)), cfg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_fp8_overlay demo",
        description="Push N weight updates from a BF16 trainer into a running vLLM serving an FP8 "
                    "(or BF16) copy, and prove after each that vLLM's parameters equal a cold start.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=3, help="number of weight updates")
    p.add_argument("--format", choices=["fp8", "bf16"], default="fp8",
                   help="serving format: fp8 = compressed-tensors channel FP8-dynamic, bf16 = no quantization")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny Llama")
    p.add_argument("--hidden", type=int, default=256, help="hidden size")
    p.add_argument("--intermediate", type=int, default=512, help="MLP size")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="transport: auto = NCCL when CUDA is available, else gloo")
    p.add_argument("--bucket-mb", type=float, default=64.0, help="size of each of the two send buckets (MiB)")
    p.add_argument("--stream", action="store_true",
                   help="workers load buckets as they arrive (receive_weights(stream=True)) instead of "
                        "receiving and validating the whole step first")
    p.add_argument("--cold", choices=["reload", "fresh", "none"], default="reload",
                   help="warm==cold reference: 'reload' = the served worker cold-loads each offline "
                        "checkpoint with vLLM's get_model(); 'fresh' = a new engine per step; 'none' = skip")
    p.add_argument("--workdir", default=None,
                   help="directory for the checkpoints and vllm.log, kept at exit (default: a temporary "
                        "directory, removed at exit unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    p.add_argument("--verbose", action="store_true",
                   help="show vLLM's own output (log, progress bars, warnings) on the console instead of "
                        "writing it to vllm.log in the run directory")
    p.add_argument("--port", type=int, default=0, help="sync-group port (0 = pick a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the per-step results to this JSON file")
    return p


#: where the demo's own lines go; the terminal even while vLLM's output is
#: redirected (see :func:`_vllm_output_to`)
_console: Any = None


def _say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=_console or sys.stdout, flush=True)


@contextlib.contextmanager
def _vllm_output_to(log: Path | None):
    """Point file descriptors 1 and 2 of this process -- and so of every
    process vLLM spawns from here -- at ``log`` (why: the module docstring);
    :func:`_say` keeps writing to the terminal. ``None``: change nothing."""
    global _console
    if log is None:
        yield
        return
    sys.stdout.flush(), sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    console = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _console = console
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, s in ((1, saved[0]), (2, saved[1])):
            os.dup2(s, fd)
            os.close(s)
        _console = None
        console.close()


@contextlib.contextmanager
def _private_tmp(run: Path):
    """A temporary directory for this process and vLLM's children (through
    ``TMPDIR``), removed on exit: vLLM leaves its ZMQ IPC sockets and the
    ``file://`` rendezvous files of ``torch.distributed`` behind in ``/tmp``."""
    tmp = run / "tmp"
    if len(str(tmp)) > 60:  # tmp + "/<uuid4>" must fit a unix-socket path (107 bytes)
        tmp = Path(tempfile.mkdtemp(prefix="vllm_fp8_overlay_tmp_"))
    tmp.mkdir(exist_ok=True)
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    try:
        yield tmp
    finally:
        tempfile.tempdir = old_dir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(tmp, ignore_errors=True)


class _NoTokenizerWarmup(logging.Filter):
    """Turn vLLM's "Chat template warmup failed" traceback into one INFO line
    when the only cause is that the engine has no tokenizer.

    ``LLM()`` (vLLM 0.32) warms up chat-template rendering unconditionally, and
    with ``skip_tokenizer_init=True`` (the demo sends token ids; its model has
    no tokenizer) logs "Tokenizer not available" as a warning with traceback.
    No engine argument skips the warmup, and nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg == "Chat template warmup failed" and "skip_tokenizer_init" in str(exc):
            record.msg, record.args = "Chat template warmup skipped: no tokenizer (skip_tokenizer_init=True)", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_NO_TOKENIZER_WARMUP = _NoTokenizerWarmup()


class _Clock:
    """Wall time per phase; :meth:`report` accounts for all of the run, so
    that engine start-up and the warm == cold checks, which dwarf the updates
    on a small machine, are not mistaken for update time."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t

    def report(self) -> list[str]:
        total = time.perf_counter() - self.t0
        names = [*self.phases, "other (imports, bookkeeping)"]
        shown = round_to_sum([*self.phases.values(), total - sum(self.phases.values())])
        width = max(map(len, names))
        return ([f"  {k:<{width}}  {v:6.1f} s" for k, v in zip(names, shown)]
                + [f"  {'total':<{width}}  {sum(shown):6.1f} s"])


def _llm(model_dir: Path, dtype: str = "bfloat16"):
    from vllm import LLM

    logging.getLogger("vllm.renderers.base").addFilter(_NO_TOKENIZER_WARMUP)  # added once per logger
    return LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=dtype, enforce_eager=True,
               max_model_len=128, max_num_seqs=4, seed=0, worker_extension_cls=EXTENSION)


def _greedy(llm: Any, n: int = 8) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _cold_digest(args, llm, ckpt: Path) -> str:
    if args.cold == "fresh":
        ref = _llm(ckpt)
        try:
            return ref.collective_rpc("weight_sync_digest")[0]["digest"]
        finally:
            with contextlib.suppress(Exception):
                ref.llm_engine.engine_core.shutdown()
            del ref
    return llm.collective_rpc("weight_sync_cold_digest", kwargs={"model_dir": str(ckpt)})[0]["digest"]


def run_demo(args: argparse.Namespace, work: Path, clock: _Clock | None = None) -> list[dict]:
    """Build the model, start vLLM, push ``args.steps`` updates into it and
    check each against a cold start; one result row per step."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from .sync.client import attach_llm
    from .testing import tiny_models as tm

    clock = clock or _Clock()
    qcfg = CT_FP8_CHANNEL_DYNAMIC if args.format == "fp8" else None
    _say(f"building a tiny Llama ({args.layers} layers, hidden {args.hidden}) and its "
         f"{'FP8 (compressed-tensors channel)' if qcfg else 'BF16'} serving checkpoint")
    with clock("build the tiny Llama and its serving checkpoint"):
        bf16_dir = tm.make_llama(work / "trainer_w0", layers=args.layers, hidden=args.hidden,
                                 intermediate=args.intermediate, vocab=args.vocab, seed=args.seed)
        config = tm.load_config(bf16_dir)
        w = tm.load_checkpoint(bf16_dir)
        serve_dir = write_serving_checkpoint(work / "serving_w0", w, config, qcfg)

    _say("starting vLLM on it with the worker extension WeightSyncExtension"
         + ("" if args.verbose else f"; vLLM's own output goes to {work / 'vllm.log'}") + " ...")
    with clock("vLLM engine start-up"):
        t = time.perf_counter()
        llm = _llm(serve_dir)
    _say(f"engine up in {time.perf_counter() - t:.1f}s")
    rows: list[dict] = []
    try:
        if args.cold == "reload":
            with clock("warm == cold checks (W0 check, offline checkpoints, cold loads)"):
                t = time.perf_counter()
                ok = llm.collective_rpc("weight_sync_digest")[0]["digest"] == _cold_digest(args, llm, serve_dir)
            _say(f"check: cold load via vLLM's get_model() == this fresh engine start on W0: "
                 f"{'yes' if ok else 'NO'} ({time.perf_counter() - t:.1f}s)")
            if not ok:
                raise SystemExit("the in-worker cold load does not reproduce a fresh engine; use --cold fresh")
        port = args.port or free_port()
        with clock("join the sync group"):
            client = attach_llm(llm, host="127.0.0.1", port=port, backend=args.backend,
                                bucket_bytes=int(args.bucket_mb * (1 << 20)), stream=args.stream)
        lay = client.layout
        _say(f"trainer: joined the sync group on 127.0.0.1:{port}; sending "
             f"{'FP8 ' + lay.method + '/' + lay.strategy if lay else 'BF16'}, world size {client.world_size}, "
             f"backend {client.sender.transport.backend}")
        try:
            for step in range(1, args.steps + 1):
                w = tm.perturb_state_dict(w, seed=args.seed * 1000 + step, scale=0.05)  # "optimizer step"
                with clock(f"weight updates ({args.steps} x push)"):
                    rep = client.push(w, step)
                row = push_row(rep)
                row["backend"] = client.sender.transport.backend
                _say(f"step {step}: {len(w)} BF16 tensors -> {row['tensors']} sent, {row['bytes'] / 2**20:.2f} MiB in "
                     f"{row['buckets']} bucket(s); push {row['push_s'] * 1e3:.1f} ms; vLLM peak extra memory "
                     f"{mib(row['peak_extra_bytes'])} MiB")
                with clock("greedy decoding after each update"):
                    row["tokens"] = _greedy(llm)
                if args.cold != "none":
                    with clock("warm == cold checks (W0 check, offline checkpoints, cold loads)"):
                        t = time.perf_counter()
                        ckpt = write_serving_checkpoint(work / f"serving_w{step}", w, config, qcfg)
                        cold = _cold_digest(args, llm, ckpt)
                        warm = llm.collective_rpc("weight_sync_digest")[0]
                    row["warm_eq_cold"] = warm["digest"] == cold
                    row["params"] = warm["num_tensors"]
                    _say(f"step {step}: warm == cold over {warm['num_tensors']} vLLM tensors: "
                         f"{'YES (bitwise)' if row['warm_eq_cold'] else 'NO'} ({time.perf_counter() - t:.1f}s)")
                rows.append(row)
        finally:
            client.close()
    finally:
        with clock("engine shutdown"), contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
    return rows


def _cleanup(run: Path, remove: bool, why_kept: str) -> None:
    """Remove the run directory, or say where it is and why it stays: a
    directory left behind silently is clutter nobody knows the origin of."""
    if remove:
        shutil.rmtree(run, ignore_errors=True)
        _say(f"removed {run} (--keep keeps it)")
    else:
        _say(f"kept {run} ({why_kept}): checkpoints" + ("" if not (run / "vllm.log").exists() else ", vllm.log"))


def _tail(log: Path, n: int = 25) -> None:
    """After a failure: the end of vLLM's log, where the cause usually is."""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()[-n:]
        print(f"\n--- last {len(lines)} lines of {log} ---", *lines, "---", sep="\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    clock = _Clock()
    own = args.workdir is None
    run = Path(tempfile.mkdtemp(prefix="vllm_fp8_overlay_demo_") if own else args.workdir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    log = None if args.verbose else run / "vllm.log"
    _say(f"run directory {run}")
    failed = True
    try:
        with _private_tmp(run), _vllm_output_to(log):
            rows = run_demo(args, run, clock)
        bad = [r["step"] for r in rows if r.get("warm_eq_cold") is False]
        failed = bool(bad)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        print("\nper push, in ms (the stage columns add up to '= push', the wall time of one client.push() call):")
        print(step_table(rows))
        print("\n".join(legend(rows, args.format)))
        print("\nwhere the run's time went:")
        print("\n".join(clock.report()))
        print("\n" + ("warm == cold at every step" if not bad and args.cold != "none" else
                      f"warm != cold at steps {bad}" if bad else "warm == cold not checked (--cold none)"))
    except BaseException:
        if log is not None:
            _tail(log)
        raise
    finally:
        _cleanup(run, own and not args.keep and not failed,
                 "the run did not succeed" if failed else "--keep" if own else "--workdir")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
