"""The selector: features, performance table, selectors and the held-out evaluation arithmetic."""

from __future__ import annotations

import math
import random

import pytest
import torch

from accelerando.select.evaluate import Case, cross_validate, evaluate, summarize
from accelerando.select.features import (FEATURES, feature_names, ngram_repetition, prompt_stats,
                                         workload_features)
from accelerando.select.models import MODELS, KNN, SingleBest, default_model, make_selector
from accelerando.select.table import LOSSLESS, Constraint, build_table, quality_loss, workload_id


# ----------------------------------------------------------------------------- helpers

def _row(wl, method, speedup, *, lossless=True, loss=None, base=False, run="r", knobs=None):
    m = {"speedup": speedup, "lossless": lossless, "is_baseline": base}
    if loss is not None:
        m["quality_loss"] = loss
    return {"workload": wl, "method": method, "knobs": knobs or {}, "metrics": m, "run_id": run}


def _hand_history():
    """3 workloads; A is lossless, B lossy (quality_loss given). See the test for the arithmetic."""
    rows = []
    spec = {"w1": (2.0, 3.0, 0.1), "w2": (1.5, 1.2, 0.0), "w3": (0.8, 2.5, 0.3)}
    for i, (name, (a, b, lb)) in enumerate(spec.items()):
        wl = {"family": "llm", "model": name, "temperature": 0.1 * i, "batch_size": 1 + i}
        rows += [_row(wl, "base", 1.0, base=True, run=name), _row(wl, "A", a, run=name),
                 _row(wl, "B", b, lossless=False, loss=lb, run=name)]
    return rows


def _wid(table, model):
    return next(w for w, d in table.workloads.items() if d["model"] == model)


# ----------------------------------------------------------------------------- features

def test_ngram_repetition_by_hand():
    toks = [1, 2, 1, 2, 1, 2]
    assert ngram_repetition(toks, 2) == pytest.approx(3 / 4)
    assert ngram_repetition(toks, 3) == pytest.approx(2 / 3)
    assert ngram_repetition([1, 2, 3, 4], 2) == 0.0
    assert ngram_repetition([1, 2], 2) == 0.0
    st = prompt_stats([[1, 1, 1, 1], [1, 2, 3, 4]])
    assert st["prompt_len"] == 4 and st["rep2"] == pytest.approx(0.5)
    assert st["unique_ratio"] == pytest.approx((1 / 4 + 1) / 2)


def test_every_feature_is_documented_and_settings_are_read():
    for fam in ("llm", "diffusion"):
        assert set(feature_names(fam)) <= set(FEATURES)
    f = workload_features({"family": "llm", "temperature": 0.7, "batch_size": 4, "max_new_tokens": 16,
                           "features": {"rep3": 0.25, "unknown": 3.0}})
    assert f["temperature"] == 0.7 and f["greedy"] == 0.0 and f["batch"] == 4
    assert f["log_new_tokens"] == 4.0 and f["rep3"] == 0.25 and "unknown" not in f
    assert f["draft_ratio"] == 0.0                 # no drafts in the workload
    assert math.isnan(f["log_params"])             # not measured -> NaN, imputed by the models
    d = workload_features({"family": "diffusion", "steps": 8, "spacing": "linspace", "batch": 2})
    assert d["log_steps"] == 3.0 and d["spacing_linspace"] == 1.0 and d["spacing_trailing"] == 0.0


def test_llm_facts_on_a_random_init_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    from accelerando.select.features import llm_facts
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    target = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, **cfg)).eval()
    draft = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=64, intermediate_size=32)).eval()
    ids = torch.tensor([[0, 5, 6, 5, 6, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    f = llm_facts(target=target, input_ids=ids, attention_mask=mask, drafts={"d": draft}, repeats=1)
    n_t = sum(p.numel() for p in target.parameters())
    n_d = sum(p.numel() for p in draft.parameters())
    assert f["log_params"] == pytest.approx(math.log10(n_t))
    assert f["draft_ratio"] == pytest.approx(n_d / n_t)
    assert (f["n_layers"], f["hidden"], f["vocab"]) == (2, 32, 64)
    # the padded position of row 0 is excluded: [5,6,5,6,5,6] -> bigram repetition 3/4
    assert f["rep2"] == pytest.approx((3 / 4 + 0) / 2)
    assert f["prompt_len"] == pytest.approx(6.5)
    assert f["draft_latency_ratio"] > 0
    for k in ("rep1", "rep4", "lookup_alpha", "lookup_alpha_min", "draft_alpha_min", "target_top1", "target_markov",
              "gen_lookup_alpha", "gen_draft_alpha", "gen_rep3"):
        assert 0.0 <= f[k] <= 1.0, k
    assert f["draft_alpha_min"] <= f["draft_alpha"] + 1e-9 and f["lookup_alpha_min"] <= f["lookup_alpha"] + 1e-9


def _tiny_llama(hidden, layers, seed):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=64, intermediate_size=2 * hidden,
                                        eos_token_id=None, bos_token_id=None, pad_token_id=0)).eval()


def test_continuation_probe_scores_the_targets_own_greedy_output():
    from accelerando.llm.drafters.prompt_lookup import lookup
    from accelerando.select.features import continuation_probe
    target, draft = _tiny_llama(32, 2, 0), _tiny_llama(16, 1, 1)
    ids = torch.tensor([[0, 5, 6, 5, 6, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    P = 20
    f = continuation_probe(target=target, input_ids=ids, attention_mask=mask, drafts={"d": draft}, new_tokens=P)
    # greedy: the continuation is the plain decode, and a lookup draft is accepted when it proposes
    # the very token the decode wrote next; count that directly on each row's own tokens
    with torch.no_grad():
        out = target.generate(ids, attention_mask=mask, max_new_tokens=P, min_new_tokens=P, do_sample=False,
                              pad_token_id=0)
    rates, reps = [], []
    for r in range(2):
        toks = out[r][int((mask[r] == 0).sum()):].tolist()
        start = int(mask[r].sum()) - 1
        hits = [int(len(p := lookup(toks[:i + 1], (3, 2, 1), 1)) > 0 and int(p[0]) == toks[i + 1])
                for i in range(start, len(toks) - 1)]
        rates.append(sum(hits) / len(hits))
        reps.append(ngram_repetition(toks[start + 1:], 3))
    assert f["gen_lookup_alpha"] == pytest.approx(sum(rates) / 2)
    assert f["gen_lookup_alpha_min"] == pytest.approx(min(rates))
    assert f["gen_rep3"] == pytest.approx(sum(reps) / 2)
    assert 0.0 <= f["gen_draft_alpha_min"] <= f["gen_draft_alpha"] <= 1.0
    # a draft equal to the target is always accepted, greedy or sampling (sum_x min(p, p) = 1)
    for temp in (0.0, 0.8):
        same = continuation_probe(target=target, input_ids=ids, attention_mask=mask, drafts={"d": target},
                                  temperature=temp, new_tokens=8, seed=1)
        assert same["gen_draft_alpha"] == pytest.approx(1.0, abs=1e-5)
    # sampling is seeded: the same seed gives the same probe
    a, b = (continuation_probe(target=target, input_ids=ids, attention_mask=mask, temperature=1.0, new_tokens=8,
                               seed=4) for _ in range(2))
    assert a == b and a["gen_draft_alpha"] == 0.0       # no draft: nothing drafted


def test_prompt_stats_repetition_at_several_n():
    st = prompt_stats([[1, 2, 3, 1, 2, 3, 1]])
    assert st["rep1"] == pytest.approx(4 / 6)            # tokens 4..7 were seen before
    assert st["rep4"] == pytest.approx(1 / 3)            # of the 4-grams after the first, only the last repeats
    assert prompt_stats([])["rep4"] == 0.0


def test_lookup_acceptance_and_target_markov_by_hand():
    from accelerando.select.features import lookup_acceptance, target_markov
    toks = [0, 1, 2, 0, 1, 2]
    # a target that predicts "the token after t is t + 1 mod 3": the lookup's copies are right
    cyc = torch.full((6, 4), -9.0)
    for i, t in enumerate(toks):
        cyc[i, (t + 1) % 3] = 9.0
    # positions 1..4: lookup finds no match at 1, 2 and proposes the right token at 3, 4
    assert lookup_acceptance(toks, cyc) == pytest.approx(2 / 4)
    assert lookup_acceptance(toks, cyc, temperature=1.0) == pytest.approx(2 / 4, abs=1e-6)
    # the prediction is a function of the current token: full agreement on same-token pairs
    assert target_markov(toks, cyc) == 1.0
    # a target whose prediction ignores the current token (depends on the position) disagrees
    pos = torch.full((6, 4), -9.0)
    for i in range(6):
        pos[i, i % 4] = 9.0
    assert target_markov(toks, pos) == 0.0
    assert math.isnan(target_markov([0, 1, 2], cyc[:3]))   # no token occurs twice


@pytest.mark.slow
def test_target_markov_feature_separates_winners():
    """Prompt lookup wins exactly when the target's outputs cycle (target_markov high), whatever
    the prompt's own repetition: a selector that sees target_markov learns it, the SBS cannot."""
    rng = random.Random(1)
    rows = []
    for i in range(24):
        markov = rng.random()
        wl = {"family": "llm", "model": f"m{i % 6}", "temperature": 0.0, "batch_size": 1, "max_new_tokens": 32,
              "prompts_digest": f"p{i}", "features": {"target_markov": markov, "rep3": rng.random()}}
        run = f"run{i}"
        rows += [_row(wl, "base", 1.0, base=True, run=run),
                 _row(wl, "lookup", (2.0 if markov > 0.5 else 0.7) * (1 + 0.02 * rng.random()), run=run)]
    t = build_table(rows)
    for model in ("gbm", "forest-arm", "ens"):
        summ, _ = evaluate(t, [model])
        by = {s.policy: s for s in summ}
        assert by[model].closed_gap > 0.7, model
        assert by[model].top1 > by["sbs"].top1


# ----------------------------------------------------------------------------- the table

def test_table_utilities_and_oracle_by_hand():
    t = build_table(_hand_history())
    assert len(t) == 3 and set(t.arms) == {"base", "A", "B"}
    w1, w3 = _wid(t, "w1"), _wid(t, "w3")
    assert t.vbs(w1, LOSSLESS) == ("A", 2.0)
    assert t.vbs(w1, Constraint(0.15)) == ("B", 3.0)
    assert t.vbs(w3, LOSSLESS) == ("base", 1.0)          # A is slower than doing nothing
    assert t.utility(w3, "B", Constraint(0.15)) == 0.0   # loss 0.3 breaks the budget
    assert t.utility(w3, "B", Constraint(0.3)) == 2.5


def test_quality_loss_rules():
    assert quality_loss("llm", {"token_agreement": 0.75}, None, greedy=True) == pytest.approx(0.25)
    assert quality_loss("llm", {"lossless": True, "perplexity": 9.0}, {"perplexity": 3.0}, greedy=False) == 0.0
    assert quality_loss("llm", {"perplexity": 3.3}, {"perplexity": 3.0}, greedy=False) == pytest.approx(0.1)
    assert quality_loss("diffusion", {"rmse_vs_reference": 0.3}, {"rmse_vs_reference": 0.2},
                        greedy=True) == pytest.approx(0.5)
    assert quality_loss("diffusion", {"rmse_vs_reference": 0.1}, {"rmse_vs_reference": 0.2}, greedy=True) == 0.0
    with pytest.raises(ValueError):
        Constraint(-1.0)


def test_workload_id_ignores_measured_features():
    a = {"family": "llm", "model": "m", "features": {"rep3": 0.1}}
    assert workload_id(a) == workload_id({"model": "m", "family": "llm"})
    assert workload_id(a) != workload_id({"model": "n", "family": "llm"})


# ----------------------------------------------------------------------------- evaluation arithmetic

def test_summarize_by_hand():
    cases = [Case("a", "llm", vbs=2.0, utility={"m": 2.0, "sbs": 1.0}, violated={"m": 0.0}),
             Case("b", "llm", vbs=3.0, utility={"m": 2.0, "sbs": 2.0}, violated={"m": 1.0})]
    s = summarize(cases, "m")
    assert s.n == 2 and s.top1 == 0.5 and s.within5 == 0.5      # 2.0 < 0.95 * 3.0
    assert s.mean_regret == pytest.approx(0.5) and s.rel_regret == pytest.approx(0.5 / 2.5)
    assert s.closed_gap == pytest.approx((2.0 - 1.5) / (2.5 - 1.5))
    assert s.violation_rate == 0.5
    assert summarize(cases, "sbs").closed_gap == pytest.approx(0.0)
    near = [Case("c", "llm", vbs=2.0, utility={"m": 1.95, "sbs": 1.0})]
    assert summarize(near, "m").top1 == 0.0 and summarize(near, "m").within5 == 1.0


def test_leave_one_out_sbs_and_random_by_hand_lossless():
    t = build_table(_hand_history())
    cases = cross_validate(t, {}, constraint=LOSSLESS)
    by = {t.workloads[c.wid]["model"]: c for c in cases}
    # training means of A's utility: w1 held out -> (1.5 + 0.8) / 2 > 1, etc.; A is always the SBS
    assert all(c.picks["sbs"] == "A" for c in cases)
    assert [by[w].vbs for w in ("w1", "w2", "w3")] == [2.0, 1.5, 1.0]
    assert [by[w].utility["random"] for w in ("w1", "w2", "w3")] == pytest.approx([1.5, 1.25, 0.9])
    s = summarize(cases, "sbs")
    assert s.top1 == pytest.approx(2 / 3)
    assert s.mean_regret == pytest.approx(0.2 / 3)
    assert s.violation_rate == 0.0


def test_leave_one_out_sbs_and_random_by_hand_lossy_budget():
    t = build_table(_hand_history())
    c = Constraint(0.15)
    cases = cross_validate(t, {}, constraint=c)
    by = {t.workloads[x.wid]["model"]: x for x in cases}
    # hold out w1: A (1.5+0.8)/2=1.15 beats B (1.2+0)/2=0.6; w2: B (3+0)/2=1.5 beats A 1.4; w3: B 2.1 > A 1.75
    assert [by[w].picks["sbs"] for w in ("w1", "w2", "w3")] == ["A", "B", "B"]
    assert [by[w].utility["sbs"] for w in ("w1", "w2", "w3")] == [2.0, 1.2, 0.0]
    assert [by[w].vbs for w in ("w1", "w2", "w3")] == [3.0, 1.5, 1.0]
    s = summarize(cases, "sbs")
    assert s.top1 == 0.0 and s.violation_rate == pytest.approx(1 / 3)
    assert s.mean_regret == pytest.approx((1.0 + 0.3 + 1.0) / 3)
    r = summarize(cases, "random")
    assert r.mean_utility == pytest.approx((2.0 + 3.7 / 3 + 0.6) / 3)
    assert r.violation_rate == pytest.approx(1 / 9)


# ----------------------------------------------------------------------------- learned selectors

def _synthetic_history(n: int = 30, seed: int = 0):
    """A history where the features decide the winner: repetitive prompts -> lookup wins,
    otherwise a cheap draft wins; a lossy arm is fast but breaks tight budgets at high temperature."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rep = rng.random()
        temp = rng.choice([0.0, 0.5, 1.0])
        ratio = rng.choice([0.05, 0.3, 0.8])
        wl = {"family": "llm", "model": f"m{i % 6}", "temperature": temp, "batch_size": 1, "max_new_tokens": 32,
              "drafts": ["d"], "prompts_digest": f"p{i}", "features": {"rep3": rep, "draft_ratio": ratio, "log_params": 6.0}}
        noise = lambda: 1.0 + 0.02 * rng.uniform(-1, 1)  # noqa: E731
        lookup = (2.2 if rep > 0.5 else 0.9) * noise()
        draft = (1.8 - 1.5 * ratio) * noise()
        run = f"run{i}"
        rows += [_row(wl, "base", 1.0, base=True, run=run), _row(wl, "lookup", lookup, run=run),
                 _row(wl, "draft", draft, run=run, knobs={"k": 4}),
                 _row(wl, "lossy", 2.5, lossless=False, loss=0.02 + 0.1 * temp, run=run)]
    return rows


@pytest.mark.parametrize("model", ["knn", "knn-w", "gbm", "pairwise", "gbm-arm", "forest-arm", "ens"])
def test_learned_selectors_beat_sbs_when_features_decide(model):
    t = build_table(_synthetic_history(30))
    summ, cases = evaluate(t, [model], constraint=LOSSLESS)
    by = {s.policy: s for s in summ}
    assert len(cases) == 30
    assert by[model].violation_rate == 0.0                 # lossless arms only
    assert by[model].mean_utility > by["sbs"].mean_utility
    assert by[model].closed_gap > 0.6
    assert by[model].mean_utility > by["random"].mean_utility


def test_lossy_budget_is_respected_by_knn():
    t = build_table(_synthetic_history())
    c = Constraint(0.05)           # the lossy arm is acceptable only at temperature 0
    summ, _ = evaluate(t, ["knn"], constraint=c)
    by = {s.policy: s for s in summ}
    assert by["knn"].violation_rate <= 0.1
    assert by["knn"].mean_utility >= by["sbs"].mean_utility


def test_selector_predictions_are_ranked_and_include_the_baseline():
    t = build_table(_synthetic_history(12))
    for name in MODELS:
        sel = make_selector(name).fit(t)
        ranked = sel.rank({"family": "llm", "temperature": 0.0, "drafts": ["d"],
                           "features": {"rep3": 0.9, "draft_ratio": 0.05}})
        assert [p.score for p in ranked] == sorted((p.score for p in ranked), reverse=True)
        assert "base" in {p.arm for p in ranked}
        assert "lossy" not in {p.arm for p in ranked}      # lossless by default
        assert all(p.std >= 0 and 0 <= p.p_ok <= 1 for p in ranked)
    assert KNN().fit(t).select({"family": "llm", "drafts": ["d"],
                                "features": {"rep3": 0.95, "draft_ratio": 0.8}}).arm == "lookup"
    with pytest.raises(KeyError):
        make_selector("nope")
    assert isinstance(make_selector("sbs"), SingleBest)


def test_arm_ids_survive_a_json_round_trip():
    import json
    from accelerando.select.table import arm_id
    knobs = {"ngram_sizes": (3, 2, 1), "k": 8, "draft": None}
    assert arm_id("m", knobs) == arm_id("m", json.loads(json.dumps(knobs))) == "m[draft=None,k=8,ngram_sizes=(3,2,1)]"
    assert arm_id("m", {}) == "m"


def test_acceptance_rate_is_the_overlap_of_the_distributions():
    from accelerando.select.features import acceptance_rate
    a = torch.log(torch.tensor([[[0.5, 0.5, 0.0 + 1e-30]], [[0.1, 0.2, 0.7]]]))
    b = torch.log(torch.tensor([[[0.5, 0.0 + 1e-30, 0.5]], [[0.1, 0.7, 0.2]]]))
    # sum min(p, q): 0.5 and 0.1 + 0.2 + 0.2 = 0.5; greedy: the argmaxes agree in neither row
    assert acceptance_rate(a, b, temperature=1.0) == pytest.approx(0.5)
    assert acceptance_rate(a, a, temperature=1.0) == pytest.approx(1.0)
    assert acceptance_rate(a[1:], b[1:], temperature=0.0) == 0.0
    assert acceptance_rate(a, b, temperature=1.0, mask=torch.tensor([[1], [0]])) == pytest.approx(0.5)


def test_early_exit_drafts_agree_more_with_smaller_later_layers():
    from accelerando.select.features import acceptance_rate
    from accelerando.select.sweep import rand_llm
    ids = torch.randint(2, 90, (2, 24), generator=torch.Generator().manual_seed(0))
    alpha = {}
    for d in (5, 100):
        t, q = rand_llm(f"rand-llama-h64-l3-v100-s0-d{d}"), rand_llm(f"rand-llama-h64-l3-v100-s0-d{d}@l1")
        assert q.config.num_hidden_layers == 1 and torch.equal(q.lm_head.weight, t.lm_head.weight)
        with torch.no_grad():
            alpha[d] = acceptance_rate(t(ids).logits, q(ids).logits, temperature=1.0)
    assert alpha[5] > alpha[100] + 0.2


def test_spec_gain_formula():
    from accelerando.select.features import spec_gain
    # a = 0.5, c = 0.1: k = 1 -> 1.5 / 1.1; k = 2 -> 1.75 / 1.2 (the max); k = 3 -> 1.875 / 1.3
    assert spec_gain(0.5, 0.1) == pytest.approx(1.75 / 1.2)
    assert spec_gain(0.0, 0.1) == 1.0 and math.isnan(spec_gain(math.nan, 0.1))
    f = workload_features({"family": "llm", "drafts": ["d"], "features": {"draft_alpha": 0.5, "draft_latency_ratio": 0.1}})
    assert f["spec_gain"] == pytest.approx(1.75 / 1.2)


# ----------------------------------------------------------------------------- quality-margin selector

def _diffusion_history(n: int = 16, *, coin: bool = False, seed: int = 0, fast_from: int = 0):
    """Diffusion workloads with a fast arm (half the NFE, speed-up 2) and a full-budget arm (1.1x,
    error 0.95x the baseline's). The fast arm's error is 0.9x the baseline's at trailing spacing and
    1.5x at leading (``coin=False``: the features decide), or 0.98x / 1.02x by a coin flip that no
    feature shows (``coin=True``: nothing to learn, a borderline arm). The fast arm is missing (it
    "could not run") on budgets below ``fast_from``."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        spacing = ("trailing", "leading")[i % 2]
        wl = {"family": "diffusion", "model": f"u{i % 4}", "steps": (8, 16)[(i // 2) % 2], "spacing": spacing,
              "batch": 2, "seed": i}
        fast = (0.98 if rng.random() < 0.5 else 1.02) if coin else (0.9 if spacing == "trailing" else 1.5)
        run = f"d{i}"

        def row(method, speedup, ratio, frac=None, base=False):
            knobs = {} if frac is None else {"steps_frac": frac}
            m = {"speedup": speedup, "lossless": False, "is_baseline": base, "rmse_vs_reference": 0.2 * ratio}
            return {"workload": wl, "method": method, "knobs": knobs, "metrics": m, "run_id": run, "family": "diffusion"}
        rows += [row("ddim", 1.0, 1.0, base=True), row("full", 1.1, 0.95, 1.0)]
        speed = (1.5 if coin else 2.0) * (1 + 0.02 * rng.random())
        if wl["steps"] >= fast_from:
            rows.append(row("fast", speed, fast, 0.5))
    return rows


def test_table_keeps_the_unclipped_error_ratio():
    t = build_table(_diffusion_history(4))
    w = next(iter(t.workloads))
    assert t.err_ratio[(w, "full[steps_frac=1.0]")] == pytest.approx(0.95)
    assert t.loss[(w, "full[steps_frac=1.0]")] == 0.0           # the loss is clipped, the ratio is not
    assert t.err_ratio[(w, "ddim")] == 1.0
    assert t.subset([w]).err_ratio.keys() == {k for k in t.err_ratio if k[0] == w}


def test_quality_margin_picks_the_fast_arm_only_where_it_keeps_the_budget():
    t = build_table(_diffusion_history(16))
    c = Constraint(0.0)
    summ, cases = evaluate(t, ["qmargin"], constraint=c)
    by = {s.policy: s for s in summ}
    assert by["qmargin"].violation_rate == 0.0
    assert by["sbs"].mean_utility == pytest.approx(1.1)      # the SBS plays safe: the full arm everywhere
    assert by["qmargin"].closed_gap > 0.9
    for case in cases:
        fast = case.picks["qmargin"] == "fast[steps_frac=0.5]"
        assert fast == (t.workloads[case.wid]["spacing"] == "trailing")


def test_quality_margin_never_admits_an_arm_predicted_outside_the_budget():
    from accelerando.select.models import QualityMargin
    t = build_table(_diffusion_history(16))
    sel = QualityMargin(constraint=Constraint(0.0)).fit(t)
    st = sel._fam["diffusion"]
    assert st.fit.delta in QualityMargin.MARGINS
    for w, wl in t.workloads.items():
        x = sel.vector(wl)
        q = sel.predict_quality("diffusion", x, ["fast[steps_frac=0.5]", "full[steps_frac=1.0]"])
        pick = sel.select(wl)
        if pick.arm != "ddim":
            assert q[pick.arm] + st.fit.delta * st.fit.res_sd[pick.arm] <= sel.threshold()
        for p in sel.rank(wl):
            assert 0.0 <= p.p_ok <= 1.0
            if p.arm != "ddim" and q[p.arm] + st.fit.delta * st.fit.res_sd[p.arm] > sel.threshold():
                assert p.score == 0.0                          # rejected: below the baseline's 1
    # a huge fixed margin admits nothing: the baseline; a wider margin never admits more arms
    wl = next(iter(t.workloads.values()))
    assert QualityMargin(constraint=Constraint(0.0), margin=1e3).fit(t).select(wl).arm == "ddim"
    fixed = [QualityMargin(constraint=Constraint(0.0), margin=m).fit(t) for m in (0.0, 1.0, 3.0)]
    for wl in t.workloads.values():
        sets = [{a for a, ok in f.admitted("diffusion", sel.vector(wl), ["fast[steps_frac=0.5]",
                                                                      "full[steps_frac=1.0]"]).items() if ok}
                for f in fixed]
        assert sets[0] >= sets[1] >= sets[2]
    with pytest.raises(ValueError):
        QualityMargin(margin=-0.1)


def test_quality_margin_learns_a_safety_margin_for_a_borderline_arm():
    """The fast arm's error straddles the threshold by a coin flip no feature shows: with no
    margin it would be admitted about half the time (and violate half of those); the inner CV
    learns a margin that rejects it, so held out the selector never violates."""
    from accelerando.select.models import QualityMargin
    t = build_table(_diffusion_history(20, coin=True))
    c = Constraint(0.0)
    assert QualityMargin(constraint=c).fit(t)._fam["diffusion"].fit.delta > 0.0
    summ, cases = evaluate(t, ["qmargin"], constraint=c)
    by = {s.policy: s for s in summ}
    assert by["qmargin"].violation_rate == 0.0
    assert by["qmargin"].mean_utility >= by["sbs"].mean_utility - 1e-9


def test_recommend_offers_no_diffusion_arm_where_the_history_shows_it_cannot_run():
    from accelerando.select.recommend import _applicable, recommend
    rows = _diffusion_history(16, fast_from=16)   # the half-budget arm ran with 8 steps, never with 4
    t = build_table(rows)
    fast = "fast[steps_frac=0.5]"
    app = {s: _applicable(t, fast, {"family": "diffusion", "steps": s}, {}) for s in (6, 8, 12, 16)}
    assert app == {6: False, 8: False, 12: True, 16: True}      # 12 -> 6 steps: not refused, not measured
    # an arm never skipped is offered even below every budget in the history
    assert _applicable(t, "full[steps_frac=1.0]", {"family": "diffusion", "steps": 6}, {})
    key = {"family": "diffusion", "model": "u0", "steps": 8, "spacing": "trailing", "batch": 2}
    rec = recommend(key, rows, constraint=Constraint(0.25), hardware={})
    assert rec.selector == default_model("diffusion") == "qkernel-cv" and fast not in {p.arm for p in rec.ranked}


def test_structural_speed_model_is_the_step_ratio_times_a_learned_per_sampler_factor():
    """Speed-ups that are exactly (budget / arm steps) x a per-sampler factor: qmargin-nfe learns the
    factor and predicts any budget's step ratio exactly; the median model predicts one number."""
    rows = []
    factor = {"fast": 0.9, "slow": 1.2}
    for i, steps in enumerate((5, 8, 9, 10, 15, 16)):
        wl = {"family": "diffusion", "model": "u", "steps": steps, "spacing": "trailing", "batch": 1, "seed": i}
        rows.append({"workload": wl, "method": "ddim", "knobs": {}, "run_id": f"r{i}", "family": "diffusion",
                     "metrics": {"speedup": 1.0, "is_baseline": True, "lossless": False, "rmse_vs_reference": 1.0}})
        for m, f in factor.items():
            for frac in (0.5, 0.25):
                s = steps / max(1, round(steps * frac)) * f
                rows.append({"workload": wl, "method": m, "knobs": {"steps_frac": frac}, "run_id": f"r{i}",
                             "family": "diffusion", "metrics": {"speedup": s, "is_baseline": False, "lossless": False,
                                                                "rmse_vs_reference": 0.5}})
    t = build_table(rows)
    nfe = make_selector("qmargin-nfe", constraint=Constraint(0.0)).fit(t)
    med = make_selector("qmargin", constraint=Constraint(0.0)).fit(t)
    new = {"family": "diffusion", "model": "u", "steps": 25, "spacing": "trailing", "batch": 1, "seed": 99}
    got = {p.arm: p.speedup for p in nfe.rank(new)}
    assert got["fast[steps_frac=0.25]"] == pytest.approx(25 / 6 * 0.9)        # round(6.25) = 6 steps
    assert got["slow[steps_frac=0.5]"] == pytest.approx(25 / 12 * 1.2)
    assert got["ddim"] == 1.0
    ratios = sorted(s / max(1, round(s * 0.25)) for s in (5, 8, 9, 10, 15, 16))
    want_med = math.sqrt(ratios[2] * ratios[3]) * 0.9                     # the median of the logs
    assert {p.arm: p.speedup for p in med.rank(new)}["fast[steps_frac=0.25]"] == pytest.approx(want_med)
    with pytest.raises(ValueError):
        make_selector("qmargin", speed="flops")


# ----------------------------------------------------------------------------- kernel quality model

def test_arm_kernel_is_a_local_line_in_log_budget_per_arm_and_grid():
    from accelerando.select.models import ArmKernel
    # rows: [arm, trailing, linspace, log2 budget, log10 params, transformer]
    X = [[0, 1, 0, 3.0, 5.0, 0], [0, 1, 0, 4.0, 5.0, 0],          # arm 0 on trailing: 0.1 at 8 steps, 0.3 at 16
         [0, 0, 0, 3.0, 5.0, 0],                               # arm 0 on leading: far off, weighted 0 here
         [1, 1, 0, 3.0, 5.0, 0]]                               # arm 1: one cell
    y = [0.1, 0.3, 9.0, -0.5]
    k = ArmKernel(other_grid=0.0, ridge=0.0).fit(X, y)
    got = k.predict([[0, 1, 0, 4.0, 5.0, 0], [0, 1, 0, 5.0, 5.0, 0], [0, 1, 0, 3.5, 7.0, 0], [1, 1, 0, 4.0, 5.0, 0],
                     [7, 1, 0, 3.0, 5.0, 0]])
    # two budgets, no ridge: the line through both, wherever the weights put the query; one cell: that
    # cell; an arm never seen: the mean of every cell
    assert got == pytest.approx([0.3, 0.5, 0.2, -0.5, (0.1 + 0.3 + 9.0 - 0.5) / 4])
    # with a ridge on the slope and the other grid weighted in: by hand
    k = ArmKernel(h_steps=0.5, other_grid=0.02, ridge=0.01).fit(X, y)      # all cells one architecture
    w = [math.exp(-2.0), 1.0, 0.02 * math.exp(-2.0)]        # query: trailing, 16 steps, same model
    d, v = [-1.0, 0.0, -1.0], [0.1, 0.3, 9.0]
    sw = sum(w)
    md, my = sum(a * b for a, b in zip(w, d)) / sw, sum(a * b for a, b in zip(w, v)) / sw
    slope = sum(a * (b - md) * (c - my) for a, b, c in zip(w, d, v)) / (
        sum(a * (b - md) ** 2 for a, b in zip(w, d)) + 0.01 * sw)
    assert k.predict([[0, 1, 0, 4.0, 5.0, 0]])[0] == pytest.approx(my - slope * md, rel=1e-6)
    # a cell of the other architecture (a DiT's, transformer = 1) counts only with weight other_arch
    Xd = X + [[0, 1, 0, 4.0, 5.0, 1]]
    k = ArmKernel(other_grid=0.0, other_arch=0.0, ridge=0.0).fit(Xd, y + [5.0])
    assert k.predict([[0, 1, 0, 4.0, 5.0, 0], [0, 1, 0, 4.0, 5.0, 1]]) == pytest.approx([0.3, 5.0])
    k = ArmKernel(other_grid=0.0, other_arch=0.5, ridge=0.0, h_steps=1e-3).fit(Xd, y + [5.0])
    assert k.predict([[0, 1, 0, 4.0, 5.0, 0]])[0] == pytest.approx((0.3 + 0.5 * 5.0) / 1.5)
    with pytest.raises(ValueError):
        ArmKernel(h_steps=0.0)
    with pytest.raises(ValueError):
        ArmKernel(other_arch=1.5)


def _kernel_history():
    """4 workloads (2 spacings x budgets 8, 16; error ratio of each arm given by hand below) with a
    half-budget arm and a full-budget arm; speed-ups exactly the step ratio (x 1.1 for the full arm)."""
    ratio = {("trailing", 8): (0.9, 0.95), ("trailing", 16): (0.8, 0.95),
             ("leading", 8): (1.5, 0.95), ("leading", 16): (1.2, 0.95)}        # (half, full)
    rows = []
    for i, ((spacing, steps), (half, full)) in enumerate(ratio.items()):
        wl = {"family": "diffusion", "model": "u", "steps": steps, "spacing": spacing, "batch": 1, "seed": i}

        def row(method, speedup, r, frac=None, base=False):
            m = {"speedup": speedup, "lossless": False, "is_baseline": base, "rmse_vs_reference": 0.2 * r}
            return {"workload": wl, "method": method, "knobs": {} if frac is None else {"steps_frac": frac},
                    "metrics": m, "run_id": f"r{i}", "family": "diffusion"}
        rows += [row("ddim", 1.0, 1.0, base=True), row("half", 2.0, half, 0.5), row("full", 1.1, full, 1.0)]
    return rows


def test_qkernel_predicts_quality_from_the_same_grid_and_picks_by_hand():
    """qkernel without a ridge or cross-grid weight, margin fixed at 0: the predicted log error ratio of
    a workload is the line through the same arm's cells on its grid, so the choices follow by hand."""
    t = build_table(_kernel_history())
    sel = make_selector("qkernel", constraint=Constraint(0.0), margin=0.0,
                        kernel={"ridge": 0.0, "other_grid": 0.0}).fit(t)
    half, full = "half[steps_frac=0.5]", "full[steps_frac=1.0]"
    cases = {("trailing", 8): math.log(0.9), ("trailing", 16): math.log(0.8), ("trailing", 32): math.log(0.8 ** 2 / 0.9),
             ("leading", 8): math.log(1.5), ("leading", 12): math.log(1.5) + math.log2(1.5) * math.log(1.2 / 1.5)}
    for (spacing, steps), q in cases.items():
        wl = {"family": "diffusion", "model": "u", "steps": steps, "spacing": spacing, "batch": 1, "seed": 9}
        got = sel.predict_quality("diffusion", sel.vector(wl), [half, full])
        assert got[half] == pytest.approx(q) and got[full] == pytest.approx(math.log(0.95))
        pick = sel.select(wl)
        # loss <= 0: the half arm where its predicted ratio is <= 1 (trailing), else the full arm (1.1x)
        assert pick.arm == (half if spacing == "trailing" else full)
        assert pick.speedup == pytest.approx(2.0 if spacing == "trailing" else 1.1)
    # loss <= 0.25 admits the half arm at leading 16 (ratio 1.2) but not at leading 8 (1.5)
    sel25 = make_selector("qkernel", constraint=Constraint(0.25), margin=0.0,
                          kernel={"ridge": 0.0, "other_grid": 0.0}).fit(t)
    picks = {s: sel25.select({"family": "diffusion", "model": "u", "steps": s, "spacing": "leading",
                              "batch": 1, "seed": 9}).arm for s in (8, 16)}
    assert picks == {8: full, 16: half}
    with pytest.raises(ValueError):
        make_selector("qmargin", quality="forest")


def test_qkernel_held_out_keeps_the_budget_where_the_features_decide():
    t = build_table(_diffusion_history(16))
    summ, cases = evaluate(t, ["qkernel"], constraint=Constraint(0.0))
    by = {s.policy: s for s in summ}
    assert by["qkernel"].violation_rate == 0.0 and by["qkernel"].closed_gap > 0.9


def _tie_history(slow_speed: float, fast_ratio: float = 0.99):
    """6 trailing workloads: arm ``a`` at half the budget runs 2.0x with an error ratio ``fast_ratio``
    (0.99: barely inside loss <= 0), arm ``b`` at half the budget runs ``slow_speed`` with ratio 0.7
    (ample slack)."""
    rows = []
    for i, steps in enumerate((8, 10, 12, 16, 20, 24)):
        wl = {"family": "diffusion", "model": "u", "steps": steps, "spacing": "trailing", "batch": 1, "seed": i}

        def row(method, speedup, r, frac=None, base=False):
            m = {"speedup": speedup, "lossless": False, "is_baseline": base, "rmse_vs_reference": 0.2 * r}
            return {"workload": wl, "method": method, "knobs": {} if frac is None else {"steps_frac": frac},
                    "metrics": m, "run_id": f"t{i}", "family": "diffusion"}
        rows += [row("ddim", 1.0, 1.0, base=True), row("a", 2.0, fast_ratio, 0.5), row("b", slow_speed, 0.7, 0.5)]
    return rows


def test_tie_tolerance_prefers_quality_slack_among_arms_within_timing_noise():
    """Arms whose predicted speed-ups are within ``tie`` of the fastest admitted one are equal up to
    timing noise: they share its score and the one with more quality slack ranks first. Outside the
    band, or with tie = 0, the fastest wins."""
    wl = {"family": "diffusion", "model": "u", "steps": 16, "spacing": "trailing", "batch": 1, "seed": 99}
    kw = dict(constraint=Constraint(0.0), margin=0.0, kernel={"ridge": 0.0, "other_grid": 0.0})
    a, b = "a[steps_frac=0.5]", "b[steps_frac=0.5]"
    near = build_table(_tie_history(1.94))                       # b 3% slower than a
    picks = {tie: make_selector("qkernel", tie=tie, **kw).fit(near).select(wl) for tie in (0.0, 0.05)}
    assert picks[0.0].arm == a and picks[0.05].arm == b
    assert picks[0.05].speedup == pytest.approx(1.94)           # its own predicted speed-up, reported
    ranked = make_selector("qkernel", tie=0.05, **kw).fit(near).rank(wl)
    assert [p.arm for p in ranked][:2] == [b, a] and ranked[0].score == ranked[1].score == pytest.approx(2.0)
    assert ranked[0].p_ok >= ranked[1].p_ok
    far = build_table(_tie_history(1.8))                         # b 10% slower: outside the band
    assert make_selector("qkernel", tie=0.05, **kw).fit(far).select(wl).arm == a
    with pytest.raises(ValueError):
        make_selector("qkernel", tie=1.0)


def test_kernel_bandwidth_is_chosen_by_inner_cross_validation():
    """Given candidate settings, the fit keeps the one whose out-of-fold rule has the best utility
    over the training workloads: here the fast arm's error depends on the spacing alone, so mixing
    spacings (other_grid = 1, listed first) predicts it badly and ignoring the other spacing wins."""
    from accelerando.select.models import QualityMargin
    t = build_table(_diffusion_history(16))
    grid = [{"other_grid": 1.0}, {"other_grid": 0.0}]
    sel = QualityMargin(constraint=Constraint(0.0), speed="nfe", quality="kernel", kernel_grid=grid).fit(t)
    st = sel._fam["diffusion"]
    single = [QualityMargin(constraint=Constraint(0.0), speed="nfe", quality="kernel", kernel=g).fit(t)
              ._fam["diffusion"].fit.inner_utility for g in grid]
    assert single[1] > single[0]
    assert st.fit.bandwidth == grid[1] and st.fit.inner_utility == pytest.approx(max(single))
    for w, wl in t.workloads.items():       # and the fitted model is that setting's, refitted on all
        fast = sel.select(wl).arm == "fast[steps_frac=0.5]"
        assert fast == (wl["spacing"] == "trailing")
    with pytest.raises(ValueError):
        QualityMargin(quality="trees", kernel_grid=grid)
    with pytest.raises(ValueError):
        QualityMargin(quality="kernel", kernel_grid=[{"h_steps": 0.0}])


def test_qkernel_cv_held_out_keeps_the_budget_where_the_features_decide():
    t = build_table(_diffusion_history(16))
    summ, _ = evaluate(t, ["qkernel-cv"], constraint=Constraint(0.0))
    by = {s.policy: s for s in summ}
    assert by["qkernel-cv"].violation_rate == 0.0 and by["qkernel-cv"].closed_gap > 0.9


def test_recommend_offers_long_context_methods_only_on_long_prompts():
    """A method registered with ``min_prompt_tokens`` (the KV-cache arms: n/a under 256 tokens) is
    not a candidate for a shorter prompt, whatever the history says of it elsewhere."""
    from accelerando.bench.methods import all_methods
    from accelerando.select.recommend import _applicable, _registered
    reg = _registered()
    assert reg["kv-snapkv"].min_prompt_tokens == 256 and reg["spec-prompt-lookup"].min_prompt_tokens == 0
    assert {e.name for e in all_methods("llm") if e.min_prompt_tokens} >= {"kv-streaming", "kv-snapkv", "kv-h2o",
                                                                          "kv-triforce", "kv-tokenselect"}
    rows = []
    for i, n in enumerate((100, 2000)):
        wl = {"family": "llm", "model": f"m{i}", "features": {"prompt_len": float(n)}}
        rows += [_row(wl, "generate", 1.0, base=True, run=str(i)),
                 _row(wl, "kv-snapkv", 1.6, lossless=False, loss=0.05, run=str(i), knobs={"ratio": 0.25})]
    t = build_table(rows)
    arm = next(a for a in t.arms if t.arms[a].method == "kv-snapkv")
    assert not _applicable(t, arm, {"family": "llm", "features": {"prompt_len": 120.0}}, reg)
    assert _applicable(t, arm, {"family": "llm", "features": {"prompt_len": 2048.0}}, reg)


def test_diffusion_model_facts_tell_a_dit_from_a_unet_and_refresh_fills_old_rows(monkeypatch):
    from diffusers import DiTTransformer2DModel
    from accelerando.bench.models import rand_unet
    from accelerando.select import sweep
    from accelerando.select.features import diffusion_model_facts
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=1)
    unet = rand_unet("rand-unet-c8x16-i8-s0")
    fd, fu = diffusion_model_facts(dit), diffusion_model_facts(unet)
    assert fd["transformer"] == 1.0 and fu["transformer"] == 0.0
    assert fd["hidden"] == 16.0 and fd["n_layers"] == 2.0 and fu["hidden"] == 16.0
    feats = workload_features({"family": "diffusion", "steps": 8, "features": fd})
    assert feats["transformer"] == 1.0

    class FakeCache:                                     # the refresh loads each model once
        loads: list = []

        def __init__(self, device):
            pass

        def unet(self, name):
            FakeCache.loads.append(name)
            return type("L", (), {"unet": {"d": dit, "u": unet}[name]})()

    rows = [{"workload": {"family": "diffusion", "model": m, "features": {"hidden": "nan", "n_layers": 9.0}}}
            for m in ("d", "u", "d")] + [{"workload": {"family": "llm", "model": "x"}}]
    monkeypatch.setattr(sweep, "ModelCache", FakeCache)
    n_models, changed = sweep.refresh_diffusion_facts(rows, names=["transformer", "hidden", "n_layers"])
    assert (n_models, changed, sorted(FakeCache.loads)) == (2, 3, ["d", "u"])
    assert [r["workload"]["features"]["transformer"] for r in rows[:3]] == [1.0, 0.0, 1.0]
    assert rows[0]["workload"]["features"]["hidden"] == 16.0       # a stored NaN is filled
    assert rows[0]["workload"]["features"]["n_layers"] == 9.0      # a stored fact is kept
    assert "features" not in rows[3]["workload"]                   # LLM rows untouched
