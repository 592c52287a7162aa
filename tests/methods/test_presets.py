"""Preset selection from transformers configs (no weights): Llama-2-7B and Llama-3-8B (both 32 layers of width
4096) get their own entries, GPT-2 XL and GPT-J theirs, in every method file; paper presets of covariance methods
carry the papers' statistics size (100,000 Wikipedia texts, ~1e8 tokens)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from transformers import GPT2Config, GPTJConfig, LlamaConfig

from kedit.methods.blue import preset_overrides
from kedit.methods.presets import load_presets, preset_entry_for, preset_for, preset_name_for
from kedit.methods.registry import get_method

METHODS = ("rome", "memit", "pmet", "alphaedit", "emmet", "ft", "kn", "lora")
COVARIANCE_METHODS = ("rome", "memit", "pmet", "alphaedit", "emmet")

LLAMA2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        vocab_size=32000)
LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256)
GPT2_XL = GPT2Config(n_layer=48, n_embd=1600, n_head=25)
GPT_J = GPTJConfig(n_layer=28, n_embd=4096, n_head=16, rotary_dim=64)
# same layer count, another width: must match no paper preset
GPT2_48_NARROW = GPT2Config(n_layer=48, n_embd=64, n_head=4)
LLAMA_32_OTHER = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=16,
                             vocab_size=32000)

CASES = {"llama-2-7b": LLAMA2_7B, "llama-3-8b": LLAMA3_8B, "gpt2-xl": GPT2_XL, "gpt-j-6b": GPT_J}


def _names(method: str) -> list[str]:
    return [e["name"] for e in load_presets(method)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", sorted(CASES))
def test_configs_select_their_own_preset(method, arch):
    for strategy in ("spread", "blue"):
        entries = [e for e in load_presets(method) if e["config"].get("strategy", "spread") == strategy]
        have = [e["name"] for e in entries if e["name"].split(" ")[0] == arch]
        name = preset_name_for(method, CASES[arch], strategy=strategy)
        if have:
            assert name == have[0], (method, arch, strategy, name)
        else:  # no preset for this architecture: nothing else may claim it
            assert name is None, (method, arch, strategy, name)


@pytest.mark.parametrize("method", METHODS)
def test_llama3_never_gets_a_llama2_preset_and_vice_versa(method):
    n3 = preset_name_for(method, LLAMA3_8B) or ""
    n2 = preset_name_for(method, LLAMA2_7B) or ""
    assert not n3.startswith("llama-2"), n3
    assert not n2.startswith("llama-3"), n2
    assert preset_name_for(method, LLAMA_32_OTHER) is None
    assert preset_name_for(method, GPT2_48_NARROW) is None


def test_memit_llama_presets_differ():
    """memit.json has both: Llama-3-8B used to be matched first; now each model gets its own numbers."""
    assert preset_name_for("memit", LLAMA3_8B).startswith("llama-3-8b")
    assert preset_name_for("memit", LLAMA2_7B).startswith("llama-2-7b")
    assert preset_for("memit", LLAMA3_8B) != preset_for("memit", LLAMA2_7B)


def test_one_lookup_behind_registered_presets():
    """The registered presets (``spec.presets``) are the look-up's entries, for plain and BLUE methods."""
    for name, method, strategy in (("rome", "rome", "spread"), ("memit", "memit", "spread"),
                                   ("memit-blue", "memit", "blue"), ("alphaedit-blue", "alphaedit", "blue"),
                                   ("pmet", "pmet", "spread"), ("ft-l", "ft", "spread"), ("kn", "kn", "spread")):
        spec = get_method(name)
        got = dict(spec.presets(GPT2_XL))
        want = preset_for(method, GPT2_XL, strategy=strategy)
        assert got == want or got == {**want, "strategy": strategy}, name
    # a model with no BLUE entry falls back to its plain preset plus the strategy
    assert preset_entry_for("emmet", GPT2_XL, strategy="blue") is None
    assert preset_overrides("memit", LLAMA2_7B, strategy="blue") == {**preset_for("memit", LLAMA2_7B),
                                                                      "strategy": "blue"}


def _uses_covariance(method: str, cfg: dict) -> bool:
    return method != "rome" or cfg.get("mom2_adjustment", True)


#: paper presets whose reference uses fewer statistics texts than the usual 100,000 (documented in the entry)
FEWER_TEXTS = {("pmet", "gpt-neox-20b (PMET repo; it uses 50k statistics texts)"): 50_000_000}


@pytest.mark.parametrize("method", COVARIANCE_METHODS)
def test_paper_presets_carry_paper_statistics(method):
    paper = [e for e in load_presets(method) if not e["name"].startswith("kedit testbed")]
    assert paper
    for e in paper:
        cfg = e["config"]
        if not _uses_covariance(method, cfg):
            continue
        want = FEWER_TEXTS.get((method, e["name"]), 100_000_000)
        assert cfg.get("mom2_n_tokens") == want, (method, e["name"])
        assert cfg["mom2_n_tokens"] >= 5e7
        if want >= 1e8:
            assert cfg["mom2_n_tokens"] >= 1e8
        assert "Wikipedia texts" in e.get("statistics", ""), (method, e["name"])
        # and the config the method builds from it carries the number
        built = get_method(method).make_config(preset_for(method, _cfg_for(e["match"]), strategy=cfg.get(
            "strategy", "spread")))
        assert built.mom2_n_tokens == want, (method, e["name"])


def _cfg_for(match: dict):
    class _C:
        pass

    c = _C()
    for k, v in match.items():
        setattr(c, k, v)
    return c


def test_testbed_efficacy_blocks_still_load():
    for method in METHODS:
        data = json.loads(resources.files("kedit.methods.presets").joinpath(f"{method}.json").read_text("utf-8"))
        assert "testbed_efficacy" in data and data["testbed_efficacy"]["methods"]
