"""`accelerando report`: the page and its plots from a history, checked in a real headless
Chromium (Debian's `chromium`, driven by Playwright): the page loads with no console error, every
image is decoded and drawn (its screenshot is not blank), and each section is there."""

from __future__ import annotations

import io
import json
import os

import pytest
from typer.testing import CliRunner

from accelerando import cli
from accelerando.bench.history import Measurement, open_history
from accelerando.bench.html_report import pareto_front, write_report
from accelerando.select.recommend import load_bundled


def _history(path, per_family=7):
    """A history holding the first swept workloads of each family of the bundled history."""
    rows, keep = [], {"llm": [], "diffusion": []}
    for r in load_bundled():
        key, fam = r["workload"].get("sweep_key"), r["family"]
        if key not in keep[fam] and len(keep[fam]) < per_family:
            keep[fam].append(key)
        if key in keep[fam]:
            rows.append(Measurement(r["workload"], r["method"], r["knobs"], r["metrics"], family=fam,
                                    run_id=r.get("run_id"), timestamp=r.get("timestamp"),
                                    hardware=r.get("hardware") or {}, versions={"torch": "2.13.0"}, git_revision="abc"))
    with open_history(path) as h:
        h.record_many(rows)
    return len(rows)


def test_pareto_front():
    pts = [(1.0, 0.0), (2.0, 0.5), (1.5, 0.6), (3.0, 0.5), (0.9, -0.1)]
    assert pareto_front(pts) == [(0.9, -0.1), (1.0, 0.0), (3.0, 0.5)]


def test_report_sections_and_skips(tmp_path):
    rep = write_report([], tmp_path / "empty", selector=False)
    assert rep.path.exists() and not rep.images
    assert set(rep.skipped) == {"pareto-llm", "pareto-diffusion", "diffusion-error", "llm-throughput", "selector"}
    text = rep.path.read_text()
    assert "<script" not in text and "http" not in text          # self-contained


@pytest.fixture
def report_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ACCELERANDO_HISTORY", raising=False)
    n = _history(tmp_path / "h.sqlite")
    res = CliRunner().invoke(cli.get_app(), ["report", "--history", str(tmp_path / "h.sqlite"), "--out",
                                             str(tmp_path / "report"), "--no-bundled", "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    out = json.loads(res.stdout)
    assert out["skipped"] == {}, out["skipped"]                   # every section has data
    assert len(out["images"]) == 4 and all(os.path.getsize(p) > 10_000 for p in out["images"])
    html = open(out["report"]).read()
    assert f"{n} rows from" in html and "closed gap" in html and "2.13.0" in html
    return out


def _chromium():
    path = os.environ.get("ACCELERANDO_TEST_CHROMIUM")
    if not path:
        why = "no Chromium: set ACCELERANDO_TEST_CHROMIUM (./run test installs Debian's chromium)"
        if os.environ.get("ACCELERANDO_TEST_SERVICES") == "required":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return path


@pytest.mark.slow
def test_report_renders_in_chromium(report_dir):
    chromium = _chromium()
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from PIL import Image
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
            page.goto("file://" + report_dir["report"], wait_until="load")
            imgs = page.locator("img")
            assert imgs.count() == 4
            state = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert all(c and w > 100 and h > 100 for c, w, h in state), state
            assert page.locator("h2").count() == 6 and page.locator("table").count() == 2
            for i in range(imgs.count()):          # each image as drawn on the page: not blank
                hist = Image.open(io.BytesIO(imgs.nth(i).screenshot())).convert("L").histogram()
                assert sum(c > 0 for c in hist) > 20 and max(hist) < 0.98 * sum(hist)
            full = Image.open(io.BytesIO(page.screenshot(full_page=True)))
            assert full.height > 1500
        finally:
            browser.close()
    assert errors == []


def test_demo_ends_with_the_report(tmp_path, monkeypatch):
    import bench_fakes as F
    from accelerando.bench import runner as R
    from accelerando.cli import demo as D
    F.fresh_registry(monkeypatch)
    F.register_fake_diffusion()
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    unet = F.make_unet_dir(tmp_path / "unet")
    monkeypatch.setattr(R, "resolve_model_dir", lambda n: unet)
    monkeypatch.setattr(D, "_zoo_has", lambda n: n == "digits-unet")
    res = CliRunner().invoke(cli.get_app(), ["demo", "--family", "diffusion", "--history", str(tmp_path / "h.sqlite"),
                                             "--steps", "2,3", "--samples", "2", "--reference-steps", "4", "--repeats", "1"])
    assert res.exit_code == 0, res.output + str(res.exception)
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith("report: ") and str(tmp_path / "report" / "index.html") in last
    html = (tmp_path / "report" / "index.html").read_text()
    assert "diffusion-error.png" in html and (tmp_path / "report" / "diffusion-error.png").exists()
