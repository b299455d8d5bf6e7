"""The bundled zoo: names/paths/cards, loading with the libraries' own from_pretrained, held-out
metrics recomputed on the card's fixed slice, tokenizer round trip, deterministic retraining."""
from __future__ import annotations

import json
import math

import pytest
import torch

from accelerando import zoo
from accelerando.zoo import data as zoo_data
from accelerando.zoo import train as zoo_train

LMS = ("code-target", "code-draft-small", "code-draft-tiny", "code-long-target")
REL = 1e-3


def _need(name: str) -> None:
    if not zoo.is_trained(name):
        pytest.skip(f"zoo model {name} is not trained in this checkout")


# ----------------------------------------------------------------------------- API

def test_names_and_paths():
    assert set(zoo.names()) == {"code-target", "code-draft-small", "code-draft-tiny", "code-target-medusa",
                                "code-long-target",
                                "digits-unet", "digits-classifier", "digits-dit", "digits-dit-32"}
    for n in zoo.names():
        assert zoo.path(n).endswith(f"zoo/models/{n}")


def test_unknown_name_lists_valid_names():
    with pytest.raises(KeyError) as e:
        zoo.path("nope")
    assert "code-target" in str(e.value) and "digits-unet" in str(e.value)
    with pytest.raises(KeyError):
        zoo.card("nope")
    with pytest.raises(KeyError):
        zoo_train.train("nope")


@pytest.mark.parametrize("name", [n for n in zoo.names() if n != "code-target-medusa"])
def test_card_fields(name):
    _need(name)
    c = zoo.card(name)
    for key in ("role", "family", "parameters", "data", "steps", "seed", "metrics", "train_seconds",
                "eval_slice"):
        assert key in c, key
    assert c["role"] in {"target", "draft", "unet", "classifier", "dit"}
    assert c["role"] == {"code-target": "target", "code-draft-small": "draft", "code-draft-tiny": "draft",
                         "code-long-target": "target",
                         "digits-unet": "unet", "digits-classifier": "classifier", "digits-dit": "dit",
                         "digits-dit-32": "dit"}[name]
    assert (zoo.MODELS_DIR / name / "README.md").exists()
    # the parameter count on the card is the loaded model's
    assert c["parameters"] == sum(p.numel() for p in zoo.load(name).parameters())


def test_medusa_heads_are_a_zoo_entry():
    """code-target-medusa is in the README's zoo table: names(), path(), is_trained(), card(), load()."""
    _need("code-target-medusa")
    c = zoo.card("code-target-medusa")
    assert c["role"] == "medusa" and c["for_model"] == "code-target"
    heads = zoo.load("code-target-medusa")
    assert c["parameters"] == sum(p.numel() for p in heads.parameters())
    assert "code-target-medusa" in zoo.markdown_table()


def test_zoo_pipeline_runs_and_saves_a_pipeline_folder(tmp_path):
    """`DDPMPipeline.from_pretrained(zoo.path("digits-unet"))` cannot work on a model folder;
    zoo.pipeline gives the pipeline, and its save_pretrained folder loads with from_pretrained."""
    _need("digits-unet")
    from diffusers import DDPMPipeline
    pipe = zoo.pipeline("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_train_timesteps == zoo.load_scheduler().config.num_train_timesteps
    img = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 1)
    pipe.save_pretrained(tmp_path / "p")
    again = DDPMPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    img2 = again(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert (img == img2).all()
    with pytest.raises(ValueError, match="not a diffusion model"):
        zoo.pipeline("code-target")


def test_saved_weights_are_not_private(tmp_path):
    """safetensors creates files 0600; what accelerando saves gets the umask's usual mode."""
    import os
    from accelerando._io import readable_modes, save_safetensors
    old = os.umask(0o022)
    try:
        f = save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        assert f.stat().st_mode & 0o777 == 0o644
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "x").write_text("x")
        os.chmod(tmp_path / "m" / "x", 0o600)
        readable_modes(tmp_path / "m")
        assert (tmp_path / "m" / "x").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_total_size_under_30mb():
    total = sum(f.stat().st_size for f in zoo.MODELS_DIR.rglob("*") if f.is_file())
    assert total <= 30 * 2 ** 20


# ----------------------------------------------------------------------------- data

def test_split_is_stable_and_disjoint():
    assert zoo_data.split_of("asyncio/threads.py") == zoo_data.split_of("asyncio/threads.py")
    for kind in zoo_data.KINDS:
        tr = {n for n, _ in zoo_data.documents(kind, "train")}
        ho = {n for n, _ in zoo_data.documents(kind, "heldout")}
        assert tr and ho and not (tr & ho)
        assert all(zoo_data.split_of(n) == "heldout" for n in ho)
        assert len(ho) < len(tr) / 5
    assert not any("/test/" in n or n.startswith("test/") or "site-packages" in n
                   for n, _ in zoo_data.documents("code", "all"))


def test_heldout_prompts_come_from_heldout_docs():
    prompts = zoo_data.heldout_prompts("code", n=2)
    held = [t.lstrip() for t in zoo_data.texts("code", "heldout")]
    assert len(prompts) == 2 and all(any(h.startswith(p) for h in held) for p in prompts)


def test_shift_augment_moves_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 5:10, 5:10] = 1.0
    y = zoo_data.shift_augment(x, g)
    assert y.shape == x.shape
    assert torch.equal((y == 1).sum((1, 2, 3)), (x == 1).sum((1, 2, 3)))   # a shift, not a blur
    assert not torch.equal(y, x)


# ----------------------------------------------------------------------------- tokenizer

TRICKY = ["def f(x):\n\treturn x  # ünïcödé 日本語 🎉\n\n\n   ",
          "  leading and trailing  \r\n\x0b spaces ",
          "", " ", "a<|endoftext|>b", "\u00a0non-breaking\u2009thin\u200bzero-width"]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trip(text):
    _need("code-target")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(zoo.path("code-target"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_shared_and_special_tokens():
    _need("code-target")
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(zoo.path("code-target"))
    assert t.eos_token == t.bos_token == t.pad_token == "<|endoftext|>"
    for d in ("code-draft-small", "code-draft-tiny"):
        if zoo.is_trained(d):
            td = AutoTokenizer.from_pretrained(zoo.path(d))
            assert td.get_vocab() == t.get_vocab()


# ----------------------------------------------------------------------------- held-out metrics

def test_tokenizer_fit_round_trip_small():
    tok = zoo_train.fit_tokenizer(["def foo(bar):\n    return bar + 1\n" * 20], vocab_size=300)
    for text in TRICKY:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("name", LMS)
def test_lm_slice_metric_matches_card(name):
    _need(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    card = zoo.card(name)
    sl = card["eval_slice"]
    model = AutoModelForCausalLM.from_pretrained(zoo.path(name)).float().eval()
    tok = AutoTokenizer.from_pretrained(zoo.path(name))
    x, y, nb = zoo_train.heldout_windows(tok, sl["kind"], seq_len=sl["seq_len"], max_windows=sl["windows"])
    ref = None
    if card["role"] == "draft":
        _need("code-target")
        ref = AutoModelForCausalLM.from_pretrained(zoo.path("code-target")).float().eval()
    m = zoo_train.lm_eval(model, x, y, nb, reference=ref)
    assert m["loss_nats_per_token"] == pytest.approx(sl["loss_nats_per_token"], rel=REL)
    assert m["bits_per_byte"] == pytest.approx(sl["bits_per_byte"], rel=REL)
    if ref is not None:
        assert m["agreement"] == pytest.approx(sl["agreement"], abs=2.0 / m["tokens"])
    # bits/byte and nats/token describe the same total
    assert m["bits_per_byte"] * nb == pytest.approx(m["loss_nats_per_token"] * m["tokens"] / math.log(2), rel=1e-9)


def test_lm_eval_uniform_model_gives_log_vocab():
    """A model with constant logits has exactly ln(V) nats/token: checks the metric arithmetic."""
    V = 50

    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("O", (), {"logits": torch.zeros(*input_ids.shape, V)})()

    x = torch.randint(0, V, (3, 10))
    y = x.clone()
    y[2, 5:] = -100
    m = zoo_train.lm_eval(Uniform(), x, y, 100, reference=Uniform())
    assert m["tokens"] == 25
    assert m["loss_nats_per_token"] == pytest.approx(math.log(V))
    assert m["bits_per_byte"] == pytest.approx(25 * math.log2(V) / 100)
    assert m["agreement"] == 1.0


def test_unet_slice_metric_matches_card():
    _need("digits-unet")
    from diffusers import DDPMScheduler, UNet2DModel
    card = zoo.card("digits-unet")
    unet = UNet2DModel.from_pretrained(zoo.path("digits-unet")).float().eval()
    sched = DDPMScheduler.from_pretrained(zoo.path("digits-unet"), subfolder="scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"
    assert sched.config.prediction_type == "epsilon"
    assert unet.config.sample_size == 16 and unet.config.in_channels == 1
    x_ho = zoo.reference_digits("heldout")
    sl = card["eval_slice"]
    mse = zoo_train.unet_eval(unet, x_ho[: sl["images"]], seed=sl["seed"])
    assert mse == pytest.approx(sl["eps_mse"], rel=REL)


@pytest.mark.parametrize("name", ["digits-dit", "digits-dit-32"])
def test_dit_slice_metric_matches_card(name):
    _need(name)
    card = zoo.card(name)
    model = zoo.load(name)
    assert type(model).__name__ == "DiTTransformer2DModel" and model.config.patch_size == 2
    assert model.config.sample_size == card["sample_size"] and model.config.num_embeds_ada_norm == 10
    _, _, x_ho, y_ho = zoo_data.digits_arrays(card["sample_size"])
    sl = card["eval_slice"]
    mse = zoo_train.unet_eval(model, x_ho[: sl["images"]], seed=sl["seed"], labels=y_ho[: sl["images"]])
    assert mse == pytest.approx(sl["eps_mse"], rel=REL)
    assert zoo.load_scheduler(name).config.num_train_timesteps == 1000


def test_classifier_slice_and_features():
    _need("digits-classifier")
    card = zoo.card("digits-classifier")
    clf = zoo.load_classifier(zoo.path("digits-classifier"))
    x_tr, y_tr, x_ho, y_ho = zoo_data.digits_arrays()
    n = card["eval_slice"]["images"]
    with torch.no_grad():
        logits = clf(x_ho[:n])
        ll = float(logits.log_softmax(-1).gather(1, y_ho[:n, None]).sum())
        acc = float((logits.argmax(-1) == y_ho[:n]).float().mean())
    assert acc == pytest.approx(card["eval_slice"]["accuracy"], abs=1e-9)
    assert ll == pytest.approx(card["eval_slice"]["log_likelihood_sum"], rel=REL)
    f = zoo.fid_features(x_ho[:10], classifier=clf)
    assert f.shape == (10, card["feature_dim"])
    # same real data -> ~0; real vs noise -> clearly larger
    fa = zoo.fid_features(x_tr[:300], classifier=clf)
    fb = zoo.fid_features(x_tr[300:600], classifier=clf)
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fn = zoo.fid_features(noise, classifier=clf)
    assert zoo.frechet_distance(fa, fb) < zoo.frechet_distance(fa, fn) / 5


# ----------------------------------------------------------------------------- retraining

def _weights(d):
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_classifier_deterministic(tmp_path):
    c1 = zoo_train.train("digits-classifier", seed=3, steps=2, out_dir=tmp_path / "a")
    zoo_train.train("digits-classifier", seed=3, steps=2, out_dir=tmp_path / "b")
    zoo_train.train("digits-classifier", seed=4, steps=2, out_dir=tmp_path / "c")
    assert c1["steps"] == 2 and c1["seed"] == 3
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))
    clf = zoo.load_classifier(tmp_path / "a")
    assert clf.features(torch.zeros(2, 1, 16, 16)).shape == (2, c1["feature_dim"])


def test_train_lm_deterministic_and_draft_from_target(tmp_path):
    kw = dict(seed=0, steps=2, max_train_bytes=20_000, eval_windows=1)
    zoo_train.train("code-target", out_dir=tmp_path / "a" / "code-target", **kw)
    zoo_train.train("code-target", out_dir=tmp_path / "b" / "code-target", **kw)
    a, b = tmp_path / "a" / "code-target", tmp_path / "b" / "code-target"
    assert _same(_weights(a), _weights(b))
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(str(a))
    AutoTokenizer.from_pretrained(str(a))
    # a draft is distilled from the sibling target in the same folder, with its tokenizer
    card = zoo_train.train("code-draft-tiny", out_dir=tmp_path / "a" / "code-draft-tiny", steps=1,
                           max_train_bytes=5_000, eval_windows=1)
    assert card["role"] == "draft" and "heldout_code_agreement_with_target" in card["metrics"]
    assert json.loads((tmp_path / "a" / "code-draft-tiny" / "tokenizer.json").read_text()) == \
        json.loads((a / "tokenizer.json").read_text())


def test_draft_without_target_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_train, "_default_dir", lambda name: tmp_path / "missing" / name)
    with pytest.raises(FileNotFoundError, match="code-target"):
        zoo_train.train("code-draft-small", out_dir=tmp_path / "x" / "code-draft-small", steps=1)


def test_lm_restart_cycles_resume_equals_fresh_run(tmp_path, monkeypatch):
    """A recipe with a warm-restart cycle gives the same weights whether run in one go or resumed
    from its saved first cycle (fresh optimizer and own RNG per cycle)."""
    tiny = zoo_train.LMSpec("target", 32, 1, 2, 64, steps=2, lr=1e-3, batch_size=2, seq_len=32,
                            vocab_size=300, restarts=(3,))
    monkeypatch.setitem(zoo_train.SPECS, "code-target", tiny)
    kw = dict(seed=1, max_train_bytes=8_000, eval_windows=1)
    full = zoo_train.train("code-target", out_dir=tmp_path / "full", **kw)
    zoo_train.train("code-target", out_dir=tmp_path / "c1", steps=2, **kw)          # cycle 1 only
    zoo_train.train("code-target", out_dir=tmp_path / "resumed", resume_from=tmp_path / "c1", **kw)
    assert full["steps"] == 5
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "resumed"))
    assert not _same(_weights(tmp_path / "full"), _weights(tmp_path / "c1"))


def test_project_embedding_keeps_geometry():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(100, 4, generator=g)
    emb = low @ torch.randn(4, 16, generator=g)              # rank 4 in 16 dims
    p = zoo_train.project_embedding(emb, 8)
    assert p.shape == (100, 8)
    # inner products are preserved up to the common RMS rescaling
    gram, gram_p = emb @ emb.T, p @ p.T
    scale = (gram_p.diagonal() / gram.diagonal()).mean()
    assert torch.allclose(gram_p, gram * scale, rtol=1e-3, atol=1e-3 * float(gram.abs().max()))


def test_distillation_extra_code_is_disjoint_from_the_foreign_evaluation_set():
    """The drafts' refinement may read other packages' code (labelled by the target's logits);
    the out-of-corpus evaluation packages must never be among them."""
    from accelerando.zoo import data
    foreign = {n.split("/")[0] for n, _ in data.foreign_code()}
    extra = {n.split("/")[0] for n, _ in data.extra_code()}
    assert not foreign & extra and not set(data.FOREIGN_PACKAGES) & set(data.EXTRA_CODE_PACKAGES)
    assert sum(len(t) for _, t in data.extra_code()) <= data.EXTRA_CODE_CAP_BYTES
    spec = zoo_train.LMSpec("draft", 32, 1, 2, 64, steps=2, lr=1e-3, batch_size=8, seq_len=4, restarts=(3,),
                            teacher_text=0.5, refine_extra_code=(0.25,))
    stream, extra = torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)
    pool = torch.full((5, 5), 2, dtype=torch.long)
    batch = zoo_train._mixed_batches(stream, pool, spec, extra, 0.25)(torch.Generator().manual_seed(0))
    assert [int((batch[:, 0] == v).sum()) for v in (0, 2, 1)] == [2, 4, 2]     # corpus, teacher, extra rows
    with pytest.raises(ValueError, match="refine_extra_code"):
        zoo_train.LMSpec("draft", 32, 1, 2, 64, steps=2, lr=1e-3, restarts=(3,), teacher_text=0.5,
                         refine_extra_code=(0.75,))
