import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import itertools
import logging

import pytest
import torch
from safetensors import safe_open

from kedit.arch import get_adapter
from kedit.core.stats import SecondMoment, StatsCache, collect_second_moments
from kedit.testing import TINY_TEXT, tiny_model, tiny_tokenizer

FAMILIES = ["gpt2", "llama"]
SENTENCES = [s.strip() + "." for s in TINY_TEXT.split(".") if s.strip()]
# texts of varied lengths (so batches need padding), plus an empty one (contributes no tokens)
TEXTS = [" ".join(SENTENCES[i : i + 1 + i % 3]) for i in range(len(SENTENCES))] + [""] + SENTENCES


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bases():
    cache = {}

    def get(family, seed=0):
        if (family, seed) not in cache:
            cache[family, seed] = tiny_model(family, seed=seed).double()
        return copy.deepcopy(cache[family, seed])

    return get


def n_corpus_tokens(tok, texts, max_length=128):
    return sum(len(tok(t, truncation=True, max_length=max_length)["input_ids"]) for t in texts)


def reference(model, tok, layer, texts, n_tokens, max_length=128):
    """Straightforward: one text at a time (no padding), one layer at a time, plain hooks."""
    module = get_adapter(model).module(model, "mlp_out", layer)
    keys = []
    handle = module.register_forward_pre_hook(lambda m, args: keys.append(args[0][0].detach().double()))
    try:
        with torch.no_grad():
            for t in texts:
                ids = tok(t, truncation=True, max_length=max_length)["input_ids"]
                if sum(k.shape[0] for k in keys) >= n_tokens:
                    break
                if ids:
                    model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    k = torch.cat(keys)[:n_tokens]
    return k.T @ k / k.shape[0], k.shape[0]


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_per_layer_reference(bases, tok, family):
    model = bases(family)
    n_tokens = 150  # cuts a text in the middle
    assert n_corpus_tokens(tok, TEXTS) > n_tokens
    got = collect_second_moments(model, tok, [3, 0, 2], TEXTS, n_tokens=n_tokens, batch_size=3)
    assert list(got) == [0, 2, 3]
    for layer, sm in got.items():
        ref, count = reference(model, tok, layer, TEXTS, n_tokens)
        assert isinstance(sm, SecondMoment) and sm.count == count == n_tokens
        assert sm.mean.dtype == torch.float64 and sm.mean.device.type == "cpu"
        assert sm.mean.shape == (get_adapter(model).key_size(model, layer),) * 2
        torch.testing.assert_close(sm.mean, ref, atol=1e-10, rtol=0)
    # layers really differ (hooks not mixed up)
    assert not torch.allclose(got[0].mean, got[3].mean)


def test_one_forward_per_batch_and_early_stop(bases, tok):
    model = bases("llama")
    seen_blocks = []
    adapter = get_adapter(model)
    handles = [
        adapter.module(model, "block", i).register_forward_pre_hook(lambda m, a, i=i: seen_blocks.append(i))
        for i in range(4)
    ]
    head_calls = []
    handles.append(model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    counter = ForwardCounter(model)
    try:
        lengths = [len(tok(t)["input_ids"]) for t in SENTENCES[:6]]
        collect_second_moments(model, tok, [0, 1], SENTENCES[:6], n_tokens=sum(lengths), batch_size=2)
    finally:
        counter.remove()
        for h in handles:
            h.remove()
    assert counter.calls == 3  # 6 texts / batch 2, not 3 × 2 layers
    assert set(seen_blocks) == {0, 1}  # blocks 2 and 3 never started: stopped inside block 1
    assert head_calls == []


def test_exact_truncation_progress_and_exhaustion(bases, tok, caplog):
    model = bases("gpt2")
    calls = []
    got = collect_second_moments(
        model, tok, [1], TEXTS, n_tokens=37, batch_size=4, progress=lambda d, t: calls.append((d, t))
    )
    assert got[1].count == 37
    assert calls[-1] == (37, 37) and all(b[0] >= a[0] for a, b in itertools.pairwise(calls))
    total = n_corpus_tokens(tok, TEXTS)
    with caplog.at_level(logging.WARNING, logger="kedit.core.stats"):
        got = collect_second_moments(model, tok, [1], iter(TEXTS), n_tokens=10 * total, batch_size=8)
    assert got[1].count == total
    assert any("exhausted" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no tokens"):
        collect_second_moments(model, tok, [1], ["", ""], n_tokens=5)
    with pytest.raises(ValueError, match="n_tokens"):
        collect_second_moments(model, tok, [1], TEXTS, n_tokens=0)


def test_texts_consumed_lazily(bases, tok):
    model = bases("gpt2")
    consumed = []

    def stream():
        for t in SENTENCES * 100:
            consumed.append(t)
            yield t

    first = len(tok(SENTENCES[0])["input_ids"])
    collect_second_moments(model, tok, [0], stream(), n_tokens=first + 1, batch_size=8)
    assert len(consumed) <= 3  # not the whole (large) iterable, not even a full batch of 8


@pytest.mark.parametrize("family", FAMILIES)
def test_pad_tokens_excluded(bases, family):
    model = bases(family)
    right = tiny_tokenizer()
    left = tiny_tokenizer()
    left.padding_side = "left"
    nopad = tiny_tokenizer()
    nopad.pad_token = None
    n = 120
    ref = collect_second_moments(model, right, [0, 3], TEXTS, n_tokens=n, batch_size=1)  # no padding at all
    for tok_, bs in ((right, 5), (left, 5), (nopad, 4)):
        got = collect_second_moments(model, tok_, [0, 3], TEXTS, n_tokens=n, batch_size=bs)
        for layer in (0, 3):
            torch.testing.assert_close(got[layer].mean, ref[layer].mean, atol=1e-12, rtol=0)


def test_negative_layers_and_fp32_option(bases, tok):
    model = bases("llama")
    got64 = collect_second_moments(model, tok, [-1], TEXTS, n_tokens=60)
    got32 = collect_second_moments(model, tok, [3], TEXTS, n_tokens=60, dtype=torch.float32)
    assert list(got64) == [3] and got32[3].mean.dtype == torch.float32
    torch.testing.assert_close(got32[3].mean.double(), got64[3].mean, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="out of range"):
        collect_second_moments(model, tok, [4], TEXTS, n_tokens=10)


def test_model_unchanged_and_mode_preserved(bases, tok):
    model = bases("gpt2")
    model.train()
    model.transformer.h[0].eval()  # mixed modes must survive too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    collect_second_moments(model, tok, [0, 2], TEXTS, n_tokens=50)
    StatsCache().get(model, tok, [1], TEXTS, n_tokens=50)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- cache -------------------------------------------------------------------------------------------------------
def test_disk_cache_round_trip(bases, tok, tmp_path):
    model = bases("gpt2")
    cache = StatsCache(tmp_path)
    first = cache.get(model, tok, [0, 2], TEXTS, n_tokens=80)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.glob("*.tmp"))
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
    assert meta["n_tokens"] == "80" and meta["count"] == "80" and meta["dtype"] == "float64"
    assert meta["layer"] in {"0", "2"} and meta["corpus"].startswith("sha256:")

    fresh = StatsCache(tmp_path)  # new object: nothing in memory, must read the disk
    counter = ForwardCounter(model)
    try:
        again = fresh.get(model, tok, [0, 2], TEXTS, n_tokens=80)
        assert counter.calls == 0
        for layer in (0, 2):
            assert torch.equal(again[layer].mean, first[layer].mean) and again[layer].count == 80
        # same prefix, longer iterable: same statistics, still a hit
        fresh.get(model, tok, [0], TEXTS + ["an extra text that is never reached"] * 5, n_tokens=80)
        assert counter.calls == 0
        # a different corpus is recomputed
        other = fresh.get(model, tok, [0], list(reversed(TEXTS)), n_tokens=80)
        assert counter.calls > 0
        assert not torch.allclose(other[0].mean, first[0].mean)
        calls = counter.calls
        # different n_tokens / dtype / model are different keys
        fresh.get(model, tok, [0], TEXTS, n_tokens=81)
        assert counter.calls > calls
    finally:
        counter.remove()
    model2 = bases("gpt2", seed=1)
    counter = ForwardCounter(model2)
    try:
        fresh.get(model2, tok, [0], TEXTS, n_tokens=80)
        assert counter.calls > 0
    finally:
        counter.remove()


def test_only_missing_layers_computed(bases, tok):
    model = bases("llama")
    adapter = get_adapter(model)
    cache = StatsCache()
    cache.get(model, tok, [0], TEXTS, n_tokens=60)
    traced = []

    def spy(module, args):
        traced.append({i for i in range(4) if adapter.module(model, "mlp_out", i)._forward_pre_hooks})

    h = model.register_forward_pre_hook(spy)
    try:
        got = cache.get(model, tok, [0, 2], TEXTS, n_tokens=60)
        assert traced and all(s == {2} for s in traced)  # layer 0 came from the cache
        traced.clear()
        cache.get(model, tok, [2, 0], TEXTS, n_tokens=60)
        assert traced == []  # memory hit: no forward at all
    finally:
        h.remove()
    direct = collect_second_moments(model, tok, [2], TEXTS, n_tokens=60)
    torch.testing.assert_close(got[2].mean, direct[2].mean, atol=1e-12, rtol=0)


def test_corpus_id_skips_hashing_and_reading(bases, tok, tmp_path):
    model = bases("gpt2")
    cache = StatsCache(tmp_path)
    a = cache.get(model, tok, [1], iter(TEXTS), n_tokens=50, corpus_id="tiny@v1")

    def poisoned():
        raise AssertionError("texts must not be read on a cache hit with corpus_id")
        yield ""

    b = StatsCache(tmp_path).get(model, tok, [1], poisoned(), n_tokens=50, corpus_id="tiny@v1")
    assert torch.equal(a[1].mean, b[1].mean)


def test_corrupt_or_mismatched_cache_file_recomputed(bases, tok, tmp_path, caplog):
    model = bases("gpt2")
    first = StatsCache(tmp_path).get(model, tok, [1], TEXTS, n_tokens=40)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(b"corrupt")
    counter = ForwardCounter(model)
    try:
        with caplog.at_level(logging.WARNING, logger="kedit.core.stats"):
            again = StatsCache(tmp_path).get(model, tok, [1], TEXTS, n_tokens=40)
    finally:
        counter.remove()
    assert counter.calls > 0 and any("unreadable" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again[1].mean, first[1].mean, atol=0, rtol=0)
    # a file whose metadata does not match its key is ignored as well
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(2, 2, dtype=torch.float64)}, str(path), metadata={"format": "x"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kedit.core.stats"):
        third = StatsCache(tmp_path).get(model, tok, [1], TEXTS, n_tokens=40)
    assert third[1].mean.shape == first[1].mean.shape
    assert any("does not match" in r.getMessage() for r in caplog.records)


# -- the cache key ignores how the tokenizer was last called (issue #11 item 8b) -----------------------------------
def test_tokenizer_key_ignores_truncation_and_padding_state():
    from kedit.core.stats import _tokenizer_key

    tok = tiny_tokenizer()
    before = _tokenizer_key(tok)
    tok("word " * 40, truncation=True, max_length=8)
    assert tok.backend_tokenizer.truncation is not None  # the call did change the backend's serialised state
    assert _tokenizer_key(tok) == before
    tok(["a", "a b c"], padding=True)
    assert _tokenizer_key(tok) == before
    # ... but what decides the ids still counts
    tok.add_tokens(["zzqq_new_token"])
    assert _tokenizer_key(tok) != before


def test_lookup_after_a_statistics_pass_hits(bases, tmp_path, monkeypatch):
    import kedit.core.stats as S

    calls = []
    orig = S._collect_encoded
    monkeypatch.setattr(S, "_collect_encoded", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    model, tok = bases("gpt2"), tiny_tokenizer()  # a fresh tokenizer: truncation off, as in a new process
    first = StatsCache(tmp_path).get(model, tok, [0], TEXTS, n_tokens=40, corpus_id="tiny")
    assert calls == [1]
    # the pass switched truncation on in `tok`; a new process (fresh tokenizer) and this one must both hit the file
    for t in (tok, tiny_tokenizer()):
        again = StatsCache(tmp_path).get(model, t, [0], TEXTS, n_tokens=40, corpus_id="tiny")
        assert torch.equal(again[0].mean, first[0].mean)
    assert calls == [1]
    assert len(StatsCache(tmp_path).entries()) == 1


def test_entries_and_remove(bases, tmp_path):
    model, tok = bases("gpt2"), tiny_tokenizer()
    cache = StatsCache(tmp_path)
    cache.get(model, tok, [0, 1], TEXTS, n_tokens=30, corpus_id="tiny")
    entries = cache.entries()
    assert sorted(int(e["layer"]) for e in entries) == [0, 1]
    assert all(e["bytes"] == (tmp_path / f"{e['key']}.safetensors").stat().st_size > 0 for e in entries)
    assert all(e["n_tokens"] == "30" and e["corpus"] == "id:tiny" for e in entries)
    with pytest.raises(KeyError):
        cache.remove([""])  # an ambiguous prefix removes nothing
    assert len(cache.entries()) == 2
    (gone,) = cache.remove([entries[0]["key"][:10]])
    assert gone["key"] == entries[0]["key"] and [e["key"] for e in cache.entries()] == [entries[1]["key"]]
    assert len(cache.remove()) == 1 and cache.entries() == []


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    from kedit.core.context import EditContext
    from kedit.core.stats import default_cache_dir, default_stats_dir

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "k"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "k" and default_stats_dir() == tmp_path / "k" / "stats"
    assert EditContext.with_default_cache().stats.directory == tmp_path / "k" / "stats"
    monkeypatch.delenv("KEDIT_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "kedit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "kedit"
    assert not (tmp_path / "k").exists()  # nothing is created until something is written
