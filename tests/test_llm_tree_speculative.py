"""The tree speculative loop end to end on tiny random Llamas: greedy == model.generate, sampling lossless."""

import pytest
import torch

from accelerando.llm.drafters import DraftTree, Medusa
from tree_checks import end_to_end_pair_pvalue, tiny_llama, tree_generate


IDS = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
TARGET = DRAFT = REF = None      # the models and greedy reference, built once per module by _models


@pytest.fixture(scope="module", autouse=True)
def _models(llama_pair):
    """Build the models when the module's tests run, not at import (collection stays cheap);
    the tests below read them as module globals."""
    global TARGET, DRAFT, REF
    TARGET, DRAFT = llama_pair
    REF = TARGET.generate(IDS, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(autouse=True)
def _eager_engine(monkeypatch):
    """No torch.compile in tests (seconds per graph on 2 cores): the same engine code, eager."""
    from accelerando.llm import engine
    monkeypatch.setattr(engine, "DEFAULT_ENGINE", "engine-eager")


@pytest.mark.parametrize("make", [
    lambda: Medusa.for_target(TARGET, n_heads=3).use_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]]),
    lambda: DraftTree(DRAFT, width=2, depth=3),
    lambda: DraftTree(DRAFT, width=2, depth=3, shape="beam", engine="hf"),
    lambda: DraftTree(DRAFT, width=2, depth=3, shape="beam"),
    lambda: DraftTree(TARGET, width=2, depth=2, shape="full", replacement=True),
    lambda: DraftTree(TARGET, width=1, depth=4, engine="hf"),      # a chain, drafted by the target itself
])
@pytest.mark.parametrize("backend", ["hf", "engine-eager"])
def test_greedy_equals_generate(make, backend):
    st = {}
    out = tree_generate(TARGET, IDS, drafter=make(), max_new_tokens=24, stats=st, backend=backend)
    assert torch.equal(out, REF)
    assert st["target_calls"] == st["steps"] + 1


@pytest.mark.parametrize("backend", ["hf", "engine-eager"])
@pytest.mark.parametrize("draft_backend", ["hf", "engine-eager"])
def test_self_draft_accepts_everything(backend, draft_backend):
    """Greedy output alone cannot see a target cache that keeps the wrong path or miscounts
    positions (the root's logits stay right); full acceptance of a self-draft does."""
    st = {}
    tree_generate(TARGET, IDS, drafter=DraftTree(TARGET, width=2, depth=3, engine=draft_backend),
                  max_new_tokens=24, stats=st, backend=backend)
    assert st["accept_hist"] == {3: st["steps"]}


def test_eos_stops_and_context_too_small_errors():
    eos = int(REF[0, IDS.shape[1] + 3])
    out = tree_generate(TARGET, IDS, drafter=DraftTree(DRAFT, width=2, depth=2), max_new_tokens=24,
                        eos_token_id=eos, backend="hf")
    assert out[0, -1] == eos and torch.equal(out, REF[:, : out.shape[1]])
    small = tiny_llama(0)
    small.config.max_position_embeddings = 12
    with pytest.raises(ValueError, match="positions"):
        tree_generate(small, IDS, drafter=DraftTree(DRAFT, width=3, depth=3), max_new_tokens=10,
                      backend="engine-eager")


@pytest.mark.parametrize("kind,backend", [("medusa", "engine-eager"), ("rsd-beam", "hf")])
def test_sampling_is_lossless_end_to_end(kind, backend):
    """First two sampled tokens follow the target's joint distribution (chi-square, vocab 6, T=1)."""
    make = ((lambda t, d: Medusa.for_target(t, n_heads=2, projection="own").use_tree([[0], [1], [0, 0]]))
            if kind == "medusa" else (lambda t, d: DraftTree(d, width=2, depth=2, shape="beam")))
    assert end_to_end_pair_pvalue(make, backend) > 1e-3


@pytest.mark.parametrize("engine", [None, "hf", "engine-eager"])
def test_public_api_dispatches_tree_drafters_batch_with_left_padding(engine):
    from accelerando.llm import speculative_generate
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = TARGET.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    heads = Medusa.for_target(TARGET, n_heads=2)
    for draft in (heads, DraftTree(DRAFT, width=2, depth=2)):
        out = speculative_generate(TARGET, ids, attention_mask=mask, draft=draft, max_new_tokens=12, eos_token_id=[],
                                   engine=engine)
        assert torch.equal(out.sequences, ref) and out.stats["lossless"]
        assert out.stats["target_calls"] == out.stats["steps"] + 2        # one prefill per row
    out = speculative_generate(TARGET, ids[:1], draft=heads.use_acceptance("typical"), max_new_tokens=6,
                               temperature=0.7, seed=0, eos_token_id=[])
    assert out.sequences.shape == (1, 14) and not out.stats["lossless"]


def test_registry_entries(tmp_path):
    from accelerando.bench.methods import LLMSetup, get_method
    assert get_method("medusa").lossless and not get_method("medusa-typical").lossless
    assert all(get_method(n).lossless for n in ("specinfer", "rsd-c", "rsd-s"))
    Medusa.for_target(TARGET, n_heads=2).save(tmp_path / "heads")
    s = LLMSetup(target=TARGET, tokenizer=None, input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=24,
                 drafts={"d": DRAFT})
    for name, knobs in (("medusa", {"heads": str(tmp_path / "heads"), "nodes": 3}), ("rsd-s", {"width": 2, "depth": 2})):
        out = get_method(name).build(s, **knobs)()
        assert torch.equal(out.sequences, REF) and out.stats["target_calls"] >= 1


def _root_only():
    """A bare drafter on the protocol's defaults (like the tree benchmark's plain baseline): every
    step verifies the root only, i.e. plain decoding through the same loop."""
    from accelerando.llm.drafters.base import Drafter, Proposal

    class RootOnly(Drafter):
        max_nodes = 1
        begin = accept = lambda self, *a: None

        def propose(self, x):
            return Proposal.chain_of(x.root, x.root.new_zeros(x.root.shape[0], 0))
    return RootOnly()


def test_root_only_drafter_is_plain_decoding():
    st = {}
    out = tree_generate(TARGET, IDS, drafter=_root_only(), max_new_tokens=24, stats=st, backend="hf")
    assert torch.equal(out, REF) and st["target_calls"] == 24
    out = tree_generate(TARGET, IDS, drafter=_root_only(), max_new_tokens=5, temperature=0.7, seed=0)
    assert out.shape == (1, IDS.shape[1] + 5)


@pytest.mark.slow
def test_tree_steps_padded_to_a_compiled_width(monkeypatch):
    """The compiled engine pads a tree step to a bucket width (padding nodes masked); run that
    padding eagerly: still == generate, and a self-draft is still fully accepted."""
    from accelerando.llm import engine as E
    init = E.Engine.__init__

    def padded_init(self, *a, **kw):
        init(self, *a, **kw)
        self.compiled = True               # pad like the compiled engine; the step itself stays eager
    monkeypatch.setattr(E.Engine, "__init__", padded_init)
    monkeypatch.setattr(E.Engine, "_compiled", lambda self, hook: self.decoder.forward)
    monkeypatch.setattr(E, "_POOL", type(E._POOL)())
    st = {}
    out = tree_generate(TARGET, IDS, drafter=DraftTree(TARGET, width=2, depth=3),
                        max_new_tokens=24, backend="engine-eager", stats=st)
    assert torch.equal(out, REF) and st["accept_hist"] == {3: st["steps"]}
    heads = Medusa.for_target(TARGET, n_heads=3).use_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
    assert torch.equal(tree_generate(TARGET, IDS, drafter=heads, max_new_tokens=24,
                                     backend="engine-eager"), REF)


@pytest.mark.parametrize("backend", ["engine-eager", "hf"])
def test_non_finite_logits_in_a_medusa_step_raise(backend):
    """NaN only where drafted tokens enter the step (the prompt alone is finite): on the engine the
    in-step verdict's flag (Medusa's StepHook), on transformers the loop's verify, raise the same error."""
    from accelerando.llm import NonFiniteLogitsError
    t = tiny_llama(4)
    ids = torch.tensor([[1, 2, 3, 1, 2, 3]])
    with torch.no_grad():
        emb = t.get_input_embeddings().weight
        keep = emb[[1, 2, 3]].clone()
        emb.fill_(float("nan"))
        emb[[1, 2, 3]] = keep
        assert torch.isfinite(t(ids).logits).all()
    heads = Medusa.for_target(t, n_heads=2).use_tree([[0], [1], [0, 0]])
    with pytest.raises(NonFiniteLogitsError, match="non-finite"):
        tree_generate(t, ids, drafter=heads, max_new_tokens=8, backend=backend)
