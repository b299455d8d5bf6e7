"""`accelerando medusa train` on a tiny local model and local text files."""

import json

import torch
from typer.testing import CliRunner


def _save_tiny_model(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(62)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def test_medusa_train_cli_on_local_files(tmp_path):
    from accelerando.cli import get_app
    from accelerando.llm.drafters import Medusa
    _save_tiny_model(tmp_path / "model")
    text = tmp_path / "a.txt"
    text.write_text(" ".join(f"w{(i * 7) % 13}" for i in range(3000)))   # a periodic, learnable stream
    res = CliRunner().invoke(get_app(), ["medusa", "train", "--target", str(tmp_path / "model"), "--data", str(text),
                                         "--out", str(tmp_path / "heads"), "--steps", "30", "--heads", "2",
                                         "--batch-tokens", "256", "--tree-nodes", "4"])
    assert res.exit_code == 0, res.output
    card = json.loads((tmp_path / "heads" / "card.json").read_text())
    assert card["role"] == "medusa" and len(card["heldout_top1_accuracy"]) == 2 and len(card["tree"]) == 4
    heads = Medusa.load(tmp_path / "heads")
    assert heads.config.n_heads == 2 and heads.config.hidden_size == 32


def test_self_generated_rows_hold_the_targets_own_continuations(tmp_path):
    """--self-generated data: rows whose tail is the target's greedy continuation of their head
    (checked against transformers' generate), mixed with as many corpus rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accelerando.llm.medusa_cli import self_generated_rows
    _save_tiny_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    rows, n_gen = self_generated_rows(model, tok, n_per_kind=2, prompt_len=4, new_tokens=6, sampled_every=0,
                                      batch=8, compile=False)
    assert rows.shape[1] == 10 and n_gen >= 4 and rows.shape[0] <= 2 * n_gen
    greedy = 0
    for r in rows:
        ref = model.generate(r[None, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        greedy += int(torch.equal(ref[0], r))
    assert greedy >= n_gen
