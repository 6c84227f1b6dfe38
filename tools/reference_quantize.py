"""Quantize a BF16 checkpoint with llm-compressor: the independent FP8 reference.

Runs in the environment of ``locks/reference-llmcompressor.txt`` (built by
``tools/vllm_env.py``), never in the project's own; the tests compare what it
writes with what ``vllm_fp8_overlay.formats`` produces from the same weights::

    python tools/reference_quantize.py JOBS.json

where JOBS.json is a list of ``{"src": DIR, "dst": DIR, "scheme": "FP8_DYNAMIC"
| "FP8_BLOCK", "ignore": [...], "targets": [...]}`` (llm-compressor is
imported once for all of them; each job takes well under a second).

Data-free ``oneshot`` with a ``QuantizationModifier``, as llm-compressor's own
FP8 examples do; the result is saved compressed (``float-quantized``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("jobs", help="JSON file: a list of jobs")
    a = ap.parse_args()
    jobs = json.loads(open(a.jobs).read())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["src"], dtype=torch.bfloat16)
        recipe = QuantizationModifier(targets=job.get("targets") or ["Linear"], scheme=job["scheme"],
                                      ignore=job.get("ignore", ["lm_head"]))
        oneshot(model=model, recipe=recipe)
        model.save_pretrained(job["dst"], save_compressed=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
