"""The README is the assembly of docs/readme/ and the zoo cards (docs/build_readme.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _builder():
    spec = importlib.util.spec_from_file_location("build_readme", ROOT / "docs" / "build_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_is_up_to_date():
    assert (ROOT / "README.md").read_text() == _builder().build(), "run: python docs/build_readme.py"


def test_zoo_table_lists_every_bundled_model_with_its_card_numbers():
    import json
    b = _builder()
    table = b.zoo_table()
    assert "ZOO_TABLE" not in b.build()
    for card in (ROOT / "src" / "accelerando" / "zoo" / "models").glob("*/card.json"):
        c = json.loads(card.read_text())
        assert f"`{card.parent.name}`" in table
        assert f"{c['parameters']:,}" in table
