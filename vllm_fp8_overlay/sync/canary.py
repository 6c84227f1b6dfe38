"""Runtime canary: after a push, every engine answers fixed prompts and its
per-token logprobs are held against a reference.

Why: every check of the sync path (seals, checksums, names, dtypes, shapes,
values, warm == cold digests) looks at *tensors*. Some failures leave every
tensor right and the outputs wrong: derived state a reload does not rebuild
(a tied head's prepacked GEMM copy on CPU, see ``sync/apply/derived.py``), a
kernel that reads something else than the parameter, a bad value planted
after validation. Only the outputs show them, and an RL run that trains on
rollouts of a wrong model wastes every step after it. The canary is cheap
enough to leave on: a few prompts of token ids, greedy, a few tokens.

The reference (``Canary.reference``) is one of

* a callable ``fn(prompt_ids, completion_ids)`` -- the trainer's own forward
  pass, teacher-forced on the tokens the engine chose -- returning the
  logits that predict each completion token (``[len(completion), vocab]``;
  :func:`hf_reference` builds one from a transformers model), or their
  log-probabilities (a 1-D sequence; then ``bound`` must be given);
* a :class:`Reference` per prompt computed beforehand (tokens plus logits or
  logprobs);
* ``"previous"``: each engine's own answer at the previous canary run, with
  ``bound`` the drift the user accepts between two steps.

With reference logits the bound is derived per position from the FP8
rounding error (:func:`logprob_sigma`, docs/sync.md "Canary"); ``bound``
overrides it with one number of nats. A deviation beyond the bound raises
:class:`CanaryFailed` naming the engine, prompt, position, token, expected
and got. The canary never changes the engines' weights: a failed canary
means the step *was loaded* and serves wrong outputs.
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["Canary", "CanaryFailed", "Reference", "Sample", "engine_samples", "hf_reference",
           "hidden_error", "logprob_sigma", "parse_completions", "rounding_rms"]


class CanaryFailed(RuntimeError):
    """An engine's logprobs left the bound after a push (the step is loaded)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ---------------------------------------------------------------- the bound
def rounding_rms(mantissa_bits: int) -> float:
    """RMS relative error of round-to-nearest to a float format with
    ``mantissa_bits`` explicit mantissa bits, for values spread evenly in
    log scale: the absolute error is uniform in +-2^-(m+1) * 2^e, the value
    is M * 2^e with M log-uniform in [1, 2), so
    E[(err/value)^2] = 2^-2(m+1) / 3 * E[1/M^2] and E[1/M^2] = 3 / (8 ln 2).
    e4m3 (m=3): 0.0265 (max 2^-4 = 0.0625); bf16 (m=7): 0.00166."""
    return 2.0 ** -(mantissa_bits + 1) * math.sqrt(3 / (8 * math.log(2)) / 3)


U_FP8 = rounding_rms(3)
U_BF16 = rounding_rms(7)
U_FP32 = rounding_rms(23)
FP32_OPS = 4
#: quantized GEMMs a token's hidden state passes through per decoder layer
#: (qkv, o, gate_up, down)
GEMMS_PER_LAYER = 4
#: bf16 roundings on the residual path per decoder layer (norm out, qkv out,
#: attention out, o out, residual add, norm out, gate_up out, act out, down
#: out, residual add), on each side that computes in bf16
BF16_ROUNDINGS_PER_LAYER = 10


def hidden_error(num_layers: int, fp8: bool, *, head_fp8: bool = False) -> float:
    """Relative RMS error of the final hidden state (and, for a quantized
    head, of the logits) between engine and reference.

    Each quantized GEMM adds independent relative errors from its FP8 weight
    (``U_FP8``) and its per-token FP8 activations (another ``U_FP8``): the
    output element is a sum of products each off by that relative error, so
    the sum is off by it in RMS. Errors of successive stages add in
    quadrature (independent roundings; a linear map, a norm or the residual
    add carry a relative error through without growing it). bf16 roundings
    of activations, on the engine and on a bf16 reference, add
    ``U_BF16`` each. So rho^2 = G * 2 * U_FP8^2 + R * U_BF16^2 with
    G = 4 L (+1 for an FP8 head) and R = 2 (10 L + 1)."""
    g = (GEMMS_PER_LAYER * num_layers + (1 if head_fp8 else 0)) if fp8 else 0
    r = 2 * (BF16_ROUNDINGS_PER_LAYER * num_layers + 1)
    return math.sqrt(g * 2 * U_FP8 ** 2 + r * U_BF16 ** 2)


def logprob_sigma(logits: torch.Tensor, token: int, rho: float) -> float:
    """Predicted RMS deviation of ``log p(token)`` for one position, from
    the reference ``logits`` (1-D) and the hidden-state error ``rho``.

    The logits move by dz_j: the hidden error gives each a spread of
    rho * std(z) (dz = W dh with dh of relative size rho and z = W h), the
    engine's bf16 logits a rounding of U_BF16 * |z_j|. A logprob moves by
    d lp_t = sum_j (1[j=t] - p_j) dz_j, so its variance is
    sum_j (1[j=t] - p_j)^2 var(dz_j): a confident position (p_t near 1)
    hardly moves, a flat one moves with the logits."""
    z = logits.detach().to(torch.float64).reshape(-1)
    p = torch.softmax(z, 0)
    e = -p
    e[token] += 1.0
    spread = float(z.std(unbiased=False))
    var = (rho * spread) ** 2 * float((e * e).sum()) + U_BF16 ** 2 * float(((e * z) ** 2).sum())
    # the engine's float32 log-softmax (max, exp, sum, log) rounds at the
    # scale of the largest logit: what a near-certain token is left with
    var += FP32_OPS * (U_FP32 * float(z.abs().max())) ** 2
    return math.sqrt(var)


# -------------------------------------------------------------- references
@dataclass
class Sample:
    """One answer: chosen tokens, their logprobs, and the top-k per position."""

    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]] = field(default_factory=list)


@dataclass
class Reference:
    """What the trainer expects for one prompt: a continuation (``tokens``)
    and either the logits predicting each of its tokens (``[T, vocab]``; the
    bound is then derived) or the tokens' logprobs (``bound`` needed)."""

    tokens: list[int]
    logits: torch.Tensor | None = None
    logprobs: list[float] | None = None
    top: list[dict[int, float]] | None = None  # top-k logprobs per position, where known


def hf_reference(model: Any, device: Any = None) -> Callable[[list[int], list[int]], torch.Tensor]:
    """Reference callable from a transformers causal LM (the trainer's
    model): one forward over prompt + completion, float32 logits of the
    positions that predict the completion."""

    def fn(prompt: list[int], completion: list[int]) -> torch.Tensor:
        dev = device if device is not None else next(model.parameters()).device
        ids = torch.tensor([list(prompt) + list(completion)], device=dev)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        n = len(prompt)
        return logits[n - 1: n - 1 + len(completion)].float().cpu()

    return fn


# ------------------------------------------------------------ engine side
def engine_samples(target: Any, prompts: Sequence[Sequence[int]], max_tokens: int, k: int,
                   timeout: float = 120.0) -> list[Sample]:
    """Greedy answers of one engine: an in-process ``vllm.LLM`` (``.llm``)
    through ``generate``, a ``vllm serve`` URL through ``/v1/completions``."""
    if hasattr(target, "llm"):
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=k, ignore_eos=True,
                            detokenize=False)
        outs = target.llm.generate([{"prompt_token_ids": [int(t) for t in p]} for p in prompts], sp,
                                   use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            steps = c.logprobs or []
            top = [{int(t): float(lp.logprob) for t, lp in s.items()} for s in steps]
            toks = [int(t) for t in c.token_ids]
            res.append(Sample(toks, [top[j].get(t, math.nan) for j, t in enumerate(toks)], top))
        return res
    return _http_samples(target, prompts, max_tokens, k, timeout)


class _NotFinite(Exception):
    """The server could not write its answer: a logprob was NaN or inf."""


#: what vLLM's OpenAI server answers (HTTP 400) when a logprob is NaN or inf
_NOT_JSON = "Out of range float values are not JSON compliant"


def _http_samples(target: Any, prompts: Sequence[Sequence[int]], max_tokens: int, k: int,
                  timeout: float) -> list[Sample]:
    model = getattr(target, "_canary_model", None)
    if model is None:
        req = urllib.request.Request(target.base_url + "/v1/models")
        if getattr(target, "api_key", None):
            req.add_header("Authorization", f"Bearer {target.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            model = json.loads(r.read())["data"][0]["id"]
        target._canary_model = model
    try:
        return _http_request(target, model, prompts, max_tokens, k, timeout)
    except _NotFinite:
        return [_http_locate(target, model, p, max_tokens, k, timeout) for p in prompts]


def _http_request(target: Any, model: str, prompts: Sequence[Sequence[int]], max_tokens: int, k: int | None,
                  timeout: float) -> list[Sample]:
    body = {"model": model, "prompt": [[int(t) for t in p] for p in prompts], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_tokens_as_token_ids": True, "return_token_ids": True}
    if k is not None:
        body["logprobs"] = k
    try:
        out = target._post("/v1/completions", body, timeout)
    except RuntimeError as e:
        if _NOT_JSON in str(e):
            raise _NotFinite(str(e)) from e
        raise
    return parse_completions(out, len(prompts), getattr(target, "name", "server"))


def parse_completions(out: dict, n: int, name: str = "server") -> list[Sample]:
    """:class:`Sample` per prompt from a ``/v1/completions`` answer (vLLM's
    ``return_token_ids`` and ``return_tokens_as_token_ids`` fields)."""
    res: list[Sample | None] = [None] * n
    for ch in out["choices"]:
        lp = ch.get("logprobs") or {}
        toks = [int(t) for t in ch["token_ids"]]
        top = [{_token_id(s): _num(v) for s, v in (d or {}).items()} for d in lp.get("top_logprobs") or []]
        res[int(ch["index"])] = Sample(toks, [_num(v) for v in lp.get("token_logprobs") or []], top)
    if any(s is None for s in res):
        raise RuntimeError(f"{name}: /v1/completions answered {len(out['choices'])} of {n} prompts")
    return res  # type: ignore[return-value]


def _http_locate(target: Any, model: str, prompt: Sequence[int], max_tokens: int, k: int,
                 timeout: float) -> Sample:
    """One prompt of an answer the server could not write: its tokens (asked
    without logprobs) and its logprobs up to the first position whose value
    is not finite (NaN from there on), so the failure names a position."""
    try:
        return _http_request(target, model, [prompt], max_tokens, k, timeout)[0]
    except _NotFinite:
        pass
    tokens = _http_request(target, model, [prompt], max_tokens, None, timeout)[0].tokens
    good = Sample([], [], [])
    for n in range(1, max_tokens):
        try:
            good = _http_request(target, model, [prompt], n, k, timeout)[0]
        except _NotFinite:
            break
    m = len(good.logprobs)
    return Sample(tokens, good.logprobs + [math.nan] * (len(tokens) - m), good.top + [{}] * (len(tokens) - m))


def _token_id(s: str) -> int:
    return int(s.rpartition(":")[2])  # "token_id:123" (return_tokens_as_token_ids)


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


# ------------------------------------------------------------- the canary
@dataclass
class Canary:
    """Canary prompts and how to judge the answers (see module docstring).

    ``prompts``: token-id lists. ``max_tokens``: greedy tokens per prompt.
    ``logprobs``: top-k asked of the engine (used where the engine's and the
    reference's tokens part). ``reference``: callable, list of
    :class:`Reference` (one per prompt) or ``"previous"``. ``bound``: fixed
    bound in nats (required without reference logits); ``None`` derives
    ``n_sigma`` standard deviations of the FP8 error per position
    (:func:`logprob_sigma`), which needs ``num_layers`` or a served
    ``config.json`` the trainer can read. ``every``: run on every n-th push.
    """

    prompts: Sequence[Sequence[int]]
    reference: Any
    max_tokens: int = 4
    logprobs: int = 5
    bound: float | None = None
    n_sigma: float = 5.0
    num_layers: int | None = None
    every: int = 1
    timeout: float = 120.0
    _previous: dict = field(default_factory=dict, repr=False)
    _pushes: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise ValueError("canary prompts must be non-empty token-id lists")
        if self.max_tokens < 1 or self.logprobs < 1 or self.every < 1 or self.n_sigma <= 0:
            raise ValueError("max_tokens, logprobs, every must be >= 1 and n_sigma > 0")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"bound must be > 0 nats, got {self.bound!r}")
        if isinstance(self.reference, str) and self.reference != "previous":
            raise ValueError(f"reference {self.reference!r}: a callable, a list of Reference or 'previous'")
        if self.reference == "previous" and self.bound is None:
            raise ValueError("reference='previous' needs bound= (the drift accepted between two steps)")
        if not callable(self.reference) and self.reference != "previous":
            if len(self.reference) != len(self.prompts):
                raise ValueError(f"{len(self.reference)} references for {len(self.prompts)} prompts")
            for r in self.reference:
                if r.logits is None and self.bound is None:
                    raise ValueError("a Reference without logits needs bound=")

    def run(self, client: Any, step: int) -> dict:
        """Ask every engine of ``client``, compare, report; raises
        :class:`CanaryFailed` on a deviation beyond the bound."""
        self._pushes += 1
        if (self._pushes - 1) % self.every:
            return {"skipped": True}
        t0 = time.perf_counter()
        rho = self._rho(client)
        engine_s = ref_s = 0.0
        cache: dict[tuple, Sample] = {}
        rows: list[dict] = []
        failures: list[dict] = []
        for t in client.targets:
            te = time.perf_counter()
            try:
                got = engine_samples(t, self.prompts, self.max_tokens, self.logprobs, self.timeout)
            except Exception as e:  # an engine that cannot answer after a push fails the canary
                failures.append({"engine": t.name, "why": f"could not answer the canary: {type(e).__name__}: {e}"})
                continue
            finally:
                engine_s += time.perf_counter() - te
            for i, (p, s) in enumerate(zip(self.prompts, got)):
                tr = time.perf_counter()
                ref = self._reference(t.name, i, p, s, cache)
                ref_s += time.perf_counter() - tr
                if ref is not None:
                    for r in _compare(s, ref, rho, self.bound, self.n_sigma):
                        r.update(engine=t.name, prompt=i)
                        rows.append(r)
                        if not r["ok"]:
                            failures.append(r)
                if self.reference == "previous":
                    self._previous[(t.name, i)] = s
        worst = max(rows, key=lambda r: r["ratio"], default=None)
        report = {"step": int(step), "cost_ms": 1e3 * (time.perf_counter() - t0), "engine_ms": 1e3 * engine_s,
                  "reference_ms": 1e3 * ref_s, "comparisons": len(rows),
                  "positions": len({(r["engine"], r["prompt"], r["position"]) for r in rows}),
                  "ratios": sorted(round(r["ratio"], 4) for r in rows),
                  "max_deviation": max((r["deviation"] for r in rows), default=0.0),
                  "max_ratio": worst["ratio"] if worst else 0.0, "worst": worst, "rho": rho,
                  "bound": self.bound if self.bound is not None else f"{self.n_sigma} sigma",
                  "num_failures": len(failures), "failures": failures[:20]}
        if failures:
            raise CanaryFailed(f"canary failed after step {step} (the step is loaded): {len(failures)} "
                               f"failure(s) in {len(rows)} comparisons:\n  "
                               + "\n  ".join(self._describe(f) for f in failures[:10]), report)
        return report

    def _describe(self, f: dict) -> str:
        if "position" not in f:
            return f"{f['engine']}: {f['why']}"
        return (f"{f['engine']} prompt {f['prompt']} {list(self.prompts[f['prompt']])[:8]} position "
                f"{f['position']} token {f['token']}: expected logprob {f['expected']:.4f}, got {f['got']:.4f} "
                f"(|diff| {f['deviation']:.4f} > bound {f['bound']:.4f}){f.get('why', '')}")

    # ---------------------------------------------------------- internals
    def _rho(self, client: Any) -> float | None:
        """Hidden-state error for the derived bound (``None`` when a fixed
        bound is used)."""
        if self.bound is not None:
            return None
        layers = self.num_layers or _served_layers(client)
        if layers is None:
            raise ValueError("the derived canary bound needs num_layers= (no readable config.json on the "
                             "servers' checkpoint_dir) or a fixed bound=")
        layout = getattr(client, "layout", None)
        head = False
        if layout is not None:
            try:
                head = layout.is_quantized("lm_head.weight")
            except ValueError:
                head = True
        return hidden_error(layers, layout is not None, head_fp8=head)

    def _reference(self, engine: str, i: int, prompt: Sequence[int], s: Sample, cache: dict) -> Reference | None:
        if self.reference == "previous":
            prev = self._previous.get((engine, i))
            return None if prev is None else Reference(prev.tokens, logprobs=prev.logprobs, top=prev.top)
        if not callable(self.reference):
            return self.reference[i]
        key = (tuple(prompt), tuple(s.tokens))
        if key not in cache:
            out = self.reference(list(prompt), list(s.tokens))
            if isinstance(out, torch.Tensor) and out.ndim == 2:
                cache[key] = Reference(list(s.tokens), logits=out)
            else:
                if self.bound is None:
                    raise ValueError("the reference callable returned logprobs, not logits: set bound=")
                cache[key] = Reference(list(s.tokens), logprobs=[float(x) for x in out])
        return cache[key]


def _served_layers(client: Any) -> int | None:
    for d in getattr(client, "descriptions", None) or []:
        path = d and d[0].get("checkpoint_dir")
        try:
            cfg = json.loads((Path(path) / "config.json").read_text())
        except (TypeError, OSError, ValueError):
            continue
        for c in (cfg, cfg.get("text_config") or {}):
            if isinstance(c.get("num_hidden_layers"), int):
                return c["num_hidden_layers"]
    return None


def _row(j: int, tok: int, got: float, exp: float, b: float, why: str = "") -> dict:
    dev = abs(got - exp) if math.isfinite(got) and math.isfinite(exp) else math.inf
    if not math.isfinite(got):
        why = " (engine logprob not finite)"
    elif not math.isfinite(exp):
        why = why or " (reference not finite)"
    return {"position": j, "token": int(tok), "expected": exp, "got": got, "deviation": dev, "bound": b,
            "ratio": dev / b if b > 0 else math.inf, "ok": dev <= b, **({"why": why} if why else {})}


def _compare(s: Sample, ref: Reference, rho: float | None, bound: float | None, n_sigma: float) -> list[dict]:
    """Position by position while the contexts agree: the engine's chosen
    token, and every other token of its top-k, against the reference's
    logprob of that same token. A confident model's chosen token hardly
    moves (log p ~ 0 whatever the weights); its runners-up carry what
    changed."""
    rows = []
    top_ref = ref.top or []
    logp = torch.log_softmax(ref.logits.to(torch.float64), -1) if ref.logits is not None else None
    for j, tok in enumerate(s.tokens):
        got = s.logprobs[j] if j < len(s.logprobs) else math.nan
        top = s.top[j] if j < len(s.top) else {}
        rt = ref.tokens[j] if j < len(ref.tokens) else None
        if logp is not None and j < logp.shape[0]:
            for t, g in [(tok, got)] + [(t, g) for t, g in top.items() if t != tok]:
                b = bound if bound is not None else n_sigma * logprob_sigma(ref.logits[j], t, rho or 0.0)
                rows.append(_row(j, t, g, float(logp[j, t]), b))
        elif rt is None:
            break
        elif rt == tok:
            rows.append(_row(j, tok, got, ref.logprobs[j], bound))
            if j < len(top_ref):
                rows.extend(_row(j, t, g, top_ref[j][t], bound) for t, g in top.items() if t != tok and t in top_ref[j])
        elif j < len(top_ref) and tok in top_ref[j]:
            rows.append(_row(j, tok, got, top_ref[j][tok], bound))
        elif rt in top:
            rows.append(_row(j, rt, top[rt], ref.logprobs[j], bound))
        else:
            rows.append(_row(j, tok, got, math.nan, bound,
                             f" (the tokens part: reference {rt}, engine {tok}, neither in the other's top-k)"))
        if rt is not None and rt != tok:
            break  # the contexts differ from here on
    return rows
