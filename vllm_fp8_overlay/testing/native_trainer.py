"""A trainer process written against vLLM's weight-transfer API, ``fp8`` named.

What a team's trainer runs when it keeps vLLM's own API and only switches
the backend: vLLM's ``HTTPVLLMWeightSyncClient`` (the dev-mode routes of a
``vllm serve`` engine), ``ModuleSource`` over its HF model and
``WeightTransferTrainerFactory.trainer_init(Fp8TrainerInitInfo(...))``, then
``send_weights()`` per step. ``tests/test_native_backend.py`` drives it as a
separate process, so the trainer can run another vLLM release's trainer side
than the engine's (that release's Python first on ``PYTHONPATH``: see
``TRAINER_SOURCES`` in ``tools/vllm_env.py``).

    python -m vllm_fp8_overlay.testing.native_trainer --url URL --model HF_DIR --port PORT

It prints ``native_trainer: ready <vLLM release>`` once the group is up,
then reads lines ``<step> <checkpoint dir>`` from stdin: loads that
checkpoint into its model in place (a training step), sends it, and prints
``native_trainer: ok <step>`` (the prefix tells these lines from any log
line a library writes to stdout). End of
input shuts the engine down. Any error goes to stderr with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys

#: starts every line of this process's answers on stdout
PREFIX = "native_trainer:"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the vllm serve engine (started with VLLM_SERVER_DEV_MODE=1)")
    ap.add_argument("--model", required=True, help="the trainer's HF model directory")
    ap.add_argument("--port", type=int, required=True, help="the weight-transfer group's port on 127.0.0.1")
    ap.add_argument("--world-size", type=int, default=2, help="1 + the engine's workers")
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--takeover", action="store_true",
                    help="replace the trainer the workers belong to (one that ended without shutting them down)")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import vllm_fp8_overlay  # noqa: F401 - registers ``fp8`` in vLLM's trainer-side factory
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm_fp8_overlay.sync.native.trainer import Fp8TrainerInitInfo
    from vllm_fp8_overlay.testing.tiny_models import load_checkpoint
    from vllm_fp8_overlay.vllm_version import installed_vllm_version

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16)
    info = Fp8TrainerInitInfo(master_address="127.0.0.1", master_port=a.port, world_size=a.world_size, rank=0,
                              timeout=a.timeout, takeover=a.takeover)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=HTTPVLLMWeightSyncClient(a.url),
                                                       source=ModuleSource(model))
    print(PREFIX, "ready", installed_vllm_version(), flush=True)
    try:
        for line in sys.stdin:
            step, ckpt = line.split(maxsplit=1)
            model.load_state_dict(load_checkpoint(ckpt.strip()), strict=True)
            engine.send_weights(step=int(step))
            print(PREFIX, "ok", step, flush=True)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
