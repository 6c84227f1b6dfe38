"""Tied-weight aliases on the trainer side (``sync/aliases.py``) and the
receiver's hint (``sync/apply/validate.py``), without vLLM.

The end-to-end proof (``client.push(model.state_dict(), step)`` of a tied
Qwen2 into real vLLM) is in ``tests/test_sync_tied_moe.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_fp8_overlay.sync.aliases import TiedAliases, alias_hint, alias_target, tied_aliases
from vllm_fp8_overlay.sync.apply.validate import spec_problems
from vllm_fp8_overlay.testing import tiny_models as tm

TIED = {"model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"}
UNTIED = TIED | {"lm_head.weight"}


def _tied_state() -> dict[str, torch.Tensor]:
    emb = torch.randn(8, 4, dtype=torch.bfloat16)
    return {"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(4, dtype=torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.randn(4, 4, dtype=torch.bfloat16),
            "lm_head.weight": emb}  # as HF state_dict() of a tied model: the same tensor twice


def test_alias_target_rules():
    assert alias_target("lm_head.weight", TIED) == "model.embed_tokens.weight"
    assert alias_target("lm_head.weight", UNTIED) is None  # served untied: a real tensor
    assert alias_target("model.norm.weight", TIED) is None
    assert alias_target("xlm_head.weight", TIED) is None  # only whole name components
    mm = {"language_model.model.embed_tokens.weight"}
    assert alias_target("language_model.lm_head.weight", mm) == "language_model.model.embed_tokens.weight"
    assert alias_target("lm_head.weight", {"model.norm.weight"}) is None  # no embedding served: unknown


def test_filter_drops_tied_head_of_a_state_dict():
    sd = _tied_state()
    rule = TiedAliases(TIED, True, "test")
    got = dict(rule.filter(sd))
    assert set(got) == TIED and rule.dropped == ["lm_head.weight"]
    assert got["model.embed_tokens.weight"] is sd["model.embed_tokens.weight"]  # not copied


@pytest.mark.parametrize("head_first", [True, False])
def test_filter_streams_either_order_and_compares_values(head_first):
    sd = _tied_state()
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # equal values, other storage
    order = sorted(sd, key=lambda n: (n != "lm_head.weight") if head_first else (n == "lm_head.weight"))
    rule = TiedAliases(TIED, None, "test")  # config silent: the names decide
    got = list(rule.filter((n, sd[n]) for n in order))
    assert [n for n, _ in got] == [n for n in order if n != "lm_head.weight"]
    assert rule.dropped == ["lm_head.weight"]


@pytest.mark.parametrize("stream", [False, True])
def test_untied_head_into_tied_server_is_refused(stream):
    """A head that differs from the embedding cannot be served by a tied model:
    dropping it silently would serve the wrong logits."""
    sd = _tied_state()
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1
    rule = TiedAliases(TIED, True, "test")
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        list(rule.filter(iter(list(sd.items())) if stream else sd))


def test_nothing_dropped_without_knowledge_or_when_config_unties():
    sd = _tied_state()
    for rule in (TiedAliases(None), TiedAliases(TIED, False, "config says untied")):
        assert list(dict(rule.filter(sd))) == list(sd) and rule.dropped == []


def test_receiver_rejection_names_the_alias_and_says_what_to_do():
    got = {n: ("bfloat16", (4,)) for n in UNTIED}
    expected = {n: ("bfloat16", (4,)) for n in TIED}
    problems = spec_problems(got, expected, what="the served checkpoint")
    assert problems[0] == "1 unknown tensor(s) (not in the served checkpoint): lm_head.weight"
    assert problems[1] == alias_hint("lm_head.weight", expected)
    assert "tied to model.embed_tokens.weight" in problems[1] and "drop lm_head.weight" in problems[1]
    other = spec_problems({**got, "model.extra.weight": ("bfloat16", (4,))}, expected, what="x")
    assert sum("tied to" in p for p in other) == 1  # no hint for a name that is no alias


def test_client_rule_from_the_served_checkpoint_directory(tmp_path):
    """What a client builds from ``weight_sync_describe``: names read from the
    served checkpoint's safetensors headers, ``tie_word_embeddings`` from its
    config; or names listed by the worker itself."""
    sd = _tied_state()
    del sd["lm_head.weight"]
    d = tm.save_checkpoint(tmp_path / "served", sd, {"tie_word_embeddings": True, "model_type": "qwen2"})

    class Client:
        descriptions = [[{"checkpoint_dir": str(d), "layout": None}]]

    rule = tied_aliases(Client())
    assert rule.served == TIED and rule.tie is True and str(d) in rule.source
    c2 = Client()
    c2.descriptions = [[{"checkpoint_dir": "/nowhere", "tensor_names": sorted(TIED), "tie_word_embeddings": True}]]
    assert tied_aliases(c2).served == TIED
    c3 = Client()
    c3.descriptions = [[{"checkpoint_dir": str(tmp_path / "not-here")}]]
    assert not tied_aliases(c3).active
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    assert not tied_aliases(Client()).active  # a fresh client re-reads; False unties


def test_worker_lists_aliases_and_the_client_uses_them():
    """A remote trainer cannot read the served checkpoint: the worker's
    description carries the alias map (small), and the client's rule comes
    from it; the config's ``tie_word_embeddings: false`` yields no aliases."""
    from vllm_fp8_overlay.sync.aliases import served_aliases

    got = served_aliases(TIED, True)
    assert got["lm_head.weight"] == "model.embed_tokens.weight"
    assert all(a.endswith("lm_head.weight") for a in got)
    assert served_aliases(UNTIED, None).get("lm_head.weight") is None  # the served model has its own head
    assert served_aliases(TIED, False) == {}

    class Client:
        descriptions = [[{"checkpoint_dir": "/nowhere", "tied_aliases": got}]]

    rule = tied_aliases(Client())
    assert rule.source == "weight_sync_describe"
    assert list(dict(rule.filter(_tied_state()))) == sorted(TIED, key=list(_tied_state()).index)
    assert rule.dropped == ["lm_head.weight"]


def test_stream_with_the_alias_but_not_its_embedding_is_refused():
    """Dropping the head when its embedding is not in the update would lose
    the head's new values without a word."""
    sd = _tied_state()
    del sd["model.embed_tokens.weight"]
    rule = TiedAliases(TIED, True, "test")
    for weights in (sd, iter(list(sd.items()))):
        with pytest.raises(ValueError, match="lm_head.weight was sent without model.embed_tokens.weight"):
            list(rule.filter(weights))


def test_transformers5_moe_state_dict_split_into_the_checkpoint_tensors(tmp_path):
    """transformers 5 holds a MoE layer's experts as two 3-D tensors; the
    checkpoint (and vLLM's loader) has one 2-D weight per expert and
    projection. ``per_expert`` (what the client applies for a BF16 target)
    turns the first into exactly the second: same names, same bits."""
    transformers = pytest.importorskip("transformers")
    from packaging.version import Version

    if Version(transformers.__version__).major < 5:
        pytest.skip("transformers < 5 keeps per-expert modules")
    from vllm_fp8_overlay.sync.aliases import per_expert

    d = tm.make_qwen3_moe(tmp_path / "moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert any(n.endswith("experts.gate_up_proj") and t.ndim == 3 for n, t in sd.items())
    got = dict(per_expert(sd))
    want = tm.load_checkpoint(d)
    assert sorted(got) == sorted(want)
    for n, t in want.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n
