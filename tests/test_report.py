"""Reports: content read from the runs, escaping of hostile names, and a real click in headless Chromium."""

import json
import re
import shutil

import markupsafe
import numpy as np
import pytest
from PIL import Image

from vaeprobe.jobs.latents import run_latents
from vaeprobe.jobs.mechanism import run_mechanism
from vaeprobe.reports import report as report_module
from vaeprobe.reports.report import (ReportError, build_comparison_report, build_report, md_code, md_escape,
                                     md_table)
from vaeprobe.jobs.scan import run_scan

from conftest import REPO, run_cli

HOSTILE = ["<img src=x onerror=alert(1)>", "<img src=x onerror=document.title='pwned'>", 'a&b "quoted"']
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    """latents + two-stage scan + mechanism on images with hostile names, and the report over the three runs."""
    root = tmp_path_factory.mktemp("report")
    src = root / "imgs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in HOSTILE + ["plain"]:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src / f"{name}.png")
    spec = "builtin:planted-direct-fixed"
    runs = [run_latents(spec, str(src), root / "latents", progress=False).path,
            run_scan(spec, str(src), root / "scan", mode="two-stage", progress=False).path,
            run_mechanism(spec, str(src), root / "mechanism", positions="top:2", figures=False, progress=False).path]
    return build_report(runs, out=root / "report", title="report <b>test</b>"), runs


def test_report_is_self_contained_and_escapes_every_user_string(hostile_report):
    rep, runs = hostile_report
    page = rep["html"].read_text()
    for name in HOSTILE:
        assert name not in page                                     # never raw
        assert str(markupsafe.escape(name)) in page                  # shown, escaped
    assert "<b>test</b>" not in page and "report &lt;b&gt;test&lt;/b&gt;" in page
    # data blobs inside <script> carry no markup characters at all
    for blob in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', page, re.S):
        assert "<" not in blob and ">" not in blob
        json.loads(blob)
    # nothing is fetched: no URL other than data: URIs and the SVG namespace-free markup
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "http://" not in page and "https://" not in page
    md = rep["markdown"].read_text()
    for name in HOSTILE:
        assert name not in md
    assert "<img" not in md


def test_report_figures_come_from_the_runs(hostile_report):
    rep, runs = hostile_report
    heads = {(h["job"], h["what"]): h for h in rep["headlines"]}
    latents = json.loads((runs[0] / "summary.json").read_text())
    spot = heads[("latents", "spot rate (images with a detected spot)")]
    assert spot["value"].endswith(f"({latents['n_spot_images']}/{latents['n_images']})") and spot["run"] == str(runs[0])
    scan = json.loads((runs[1] / "summary.json").read_text())
    glob = [h for (job, what), h in heads.items() if job == "scan" and what.startswith("images with")][0]
    assert glob["value"].startswith(f"{round(scan['global_rate'] * scan['n_images'])}/{scan['n_images']}")
    mech = json.loads((runs[2] / "summary.json").read_text())
    dom = heads[("mechanism", "dominant pathway at the attributed positions")]["value"]
    for k, v in mech["dominant"].items():
        assert f"{k} {v}" in dom
    md = rep["markdown"].read_text()
    for h in rep["headlines"]:
        assert md_escape(h["value"]) in md and h["run"] in md      # every headline with the run it came from
    assert len(rep["tables"]) == 7 and all(p.exists() for p in rep["tables"])
    run_info = json.loads((runs[1] / "run.json").read_text())
    assert run_info["versions"]["torch"] and run_info["seconds"] > 0


HOSTILE_MD = "x|y <script>alert(1)</script> *b* [l](u)"


def _write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def synthetic_runs(tmp_path):
    """A finished pipeline run (its headline says ``>=``) and a mechanism run over an image with a hostile name,
    written by hand: the report reads only the files, so no model runs."""
    import pandas as pd

    pipe = tmp_path / "pipeline"
    _write_json(pipe / "config.json", {"job": "pipeline", "model": {"spec": "builtin:tiny-sd", "class": "Tiny"},
                                       "vaes": ["builtin:mini-kl-f8"]})
    _write_json(pipe / "summary.json", {"n_samples": 2, "final_spot_rate": 0.5, "emerged": "1/2", "steps": 4,
                                        "n_prompts": 1, "seeds": [0, 1], "vaes": []})
    mech = tmp_path / "mechanism"
    _write_json(mech / "config.json", {"job": "mechanism", "vae": {"spec": "builtin:planted-direct"}, "op": "zero"})
    _write_json(mech / "summary.json", {"dominant": {"groupnorm": 1}, "median_shares": {"groupnorm": 0.9},
                                        "positions": "top:1", "op": "zero", "decodes": 4, "seconds": 1.0})
    _write_json(mech / "parts" / "00000.json", {"image": HOSTILE_MD})
    pd.DataFrame({"image": [HOSTILE_MD], "row": [1], "col": [2], "far_l2_live": [0.5], "share_groupnorm": [0.9],
                  "share_attention": [0.05], "share_residual": [0.05], "interaction": [0.0],
                  "dominant": ["groupnorm"]}).to_parquet(mech / "mechanism.parquet")
    return [pipe, mech]


def test_markdown_has_no_html_entities_for_report_text_and_escapes_user_strings(synthetic_runs, tmp_path):
    rep = build_report(synthetic_runs, out=tmp_path / "report", title="t <i>x</i> | y")
    md = rep["markdown"].read_text()
    assert "median >= threshold" in md and "&gt;" not in md      # the report's own ">=" is written as is
    assert HOSTILE_MD not in md and "<script>" not in md and "[l](u)" not in md
    assert md_escape(HOSTILE_MD) in md                             # shown, Markdown-escaped
    row = next(line for line in md.splitlines() if "alert(1)" in line)
    assert len(re.split(r"(?<!\\)\|", row)) == 8                  # still one cell: 6 columns, the pipe escaped
    assert md.startswith("# t &lt;i>x&lt;/i> \\| y\n")
    page = rep["html"].read_text()
    assert HOSTILE_MD not in page and "<script>alert(1)" not in page
    assert str(markupsafe.escape(HOSTILE_MD)) in page               # HTML escaping in the HTML report
    assert "median &gt;= threshold" in page


def test_markdown_helpers():
    assert md_escape("spot rate >= 2") == "spot rate >= 2"
    assert md_escape("# x") == "\\# x" and md_escape("> q") == "\\> q" and md_escape("-0.5") == "-0.5"
    assert md_escape("a\nb") == "a b" and md_escape("a&b") == "a&amp;b"
    assert md_code("a``b") == "```a``b```" and md_code("`x`") == "`` `x` ``"
    table = md_table([("a|b", "c|d")], ("name", "spec"), code=("spec",)).splitlines()
    assert table[2] == "| a\\|b   | `c\\|d` |"


def test_one_jinja_environment_autoescaping_by_template_name():
    env = report_module._environment()
    assert env is report_module._environment()
    assert env.autoescape("report.html.j2") and env.autoescape("compare.html.j2") and env.autoescape(None)
    assert not env.autoescape("report.md.j2")
    assert env.from_string("{{ s }}").render(s="<b>") == "&lt;b&gt;"


def test_comparison_markdown_tables(tmp_path):
    model = {"model": "ref|<b>", "role": "reference", "rfid": None, "spot_rate": 0.5, "median_norm_ratio": 2.0,
             "max_norm_ratio": 3.0, "clamp_hits_per_image": 0, "global_rate": 0.25, "median_top_global_ratio": 4.0,
             "dominant": "groupnorm", "latent_mean": 0.1, "latent_std": 1.0, "suggested_shift_factor": 0.0,
             "suggested_scaling_factor": 0.2, "configured_scaling_factor": 0.18215,
             **{f"{k}_{s}": 0.5 for k in ("psnr", "ssim", "lpips") for s in ("mean", "std")}}
    cand = {"model": "cand*", "verdict": "drop-in >= reference", "same_latent_shape": True, "shape_note": "",
            "encoder_identical": True, "encoder_weights_identical": None, "max_latent_diff": 0.0,
            "decoder_psnr_on_shared_latents": 30.0, "decoder_lpips_on_shared_latents": 0.01}
    summary = {"n_images": 3, "images": "imgs", "size": 64, "reference": "ref|<b>", "rfid": "too few images",
               "models": [model], "candidates": [cand]}
    rep = build_comparison_report(tmp_path, summary, title="cmp")
    md = rep["markdown"].read_text()
    assert "- `cand*`: drop-in >= reference" in md and "&gt;" not in md and "<b>" in md  # <b> only in code
    assert "| `ref\\|<b>` |" in md.replace("  ", " ").replace("  ", " ")
    assert "ref|&lt;b&gt;" in rep["html"].read_text()


def test_report_bad_input_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="not a vaeprobe run directory"):
        build_report([tmp_path])
    r = run_cli("report", tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "config.json" in r.stderr


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, ("Debian's chromium and chromium-driver are missing: run the README's test "
                                 "command, which installs them")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_click_in_headless_chromium_shows_the_cells_result_and_nothing_executes(hostile_report):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    rep, _ = hostile_report
    browser = _browser()
    try:
        browser.get(rep["html"].as_uri())
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text                             # the alert(1) payload did not run
        assert browser.title == "report <b>test</b>"                 # nor did the document.title one
        assert browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") == 0
        svgs = browser.find_elements(By.CSS_SELECTOR, "svg.heat")
        assert len(svgs) == len(HOSTILE) + 1
        svg = svgs[0]
        card = svg.get_attribute("data-card")
        data = json.loads(browser.find_element(By.ID, f"data-{card}").get_attribute("textContent"))
        kept = [k for k, v in data["cells"].items() if v.get("after")]
        other = [k for k, v in data["cells"].items() if k != kept[0]]
        after = browser.find_element(By.ID, f"after-{card}")
        blank = after.get_attribute("src")
        browser.execute_script("arguments[0].scrollIntoView()", svg)
        svg.find_element(By.CSS_SELECTOR, f'rect[data-cell="{kept[0]}"]').click()
        first = after.get_attribute("src")
        assert first != blank and first.startswith("data:image/")
        assert first == data["cells"][kept[0]]["after"]
        label = browser.find_element(By.ID, f"cell-{card}").text
        assert label == f"Cell ({kept[0]})"
        rows = browser.find_elements(By.CSS_SELECTOR, f"#measures-{card} tr")
        assert {r.find_element(By.TAG_NAME, "th").text for r in rows} >= {"global_ratio", "far_l2"}
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "report-click.png"))
        # another cell changes the panel again
        second_cell = kept[1] if len(kept) > 1 else other[0]
        svg.find_element(By.CSS_SELECTOR, f'rect[data-cell="{second_cell}"]').click()
        assert browser.find_element(By.ID, f"cell-{card}").text == f"Cell ({second_cell})"
        assert after.get_attribute("src") != first or not data["cells"][second_cell].get("after")
    finally:
        browser.quit()
    with Image.open(ARTIFACTS / "report-click.png") as shot:
        assert shot.size[0] >= 1000


def test_demo_runs_the_main_job_and_reports(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--out", out, "--size", "64", "--quiet")
    assert r.returncode == 0, r.stderr
    report = out / "report" / "report.html"
    assert f"report: {report}" in r.stdout
    heads = json.loads((out / "report" / "report.json").read_text())["headlines"]
    rate = {h["model"]: h["value"] for h in heads if h["what"].startswith("spot rate")}
    # the demo runs on the first 4 held-out photos by default (DEMO_LIMIT)
    assert rate["builtin:planted-groupnorm"] == "1 (4/4)" and rate["builtin:mini-kl-f8"].endswith("(0/4)")
    assert rate["builtin:taef2"].endswith("(0/4)")  # the real model trained elsewhere is in the demo too
    glob = {h["model"]: h["value"] for h in heads if h["job"] == "scan" and h["what"].startswith("images with")}
    assert glob["builtin:planted-groupnorm"].startswith("4/4")
    dom = {h["model"]: h["value"] for h in heads if h["job"] == "mechanism"}
    assert dom["builtin:planted-groupnorm"] == "groupnorm 4"
    page = report.read_text()
    assert page.count('class="card"') == 12 and "rocket" in page and "builtin:taef2" in page
    assert "camera" not in page and "brick" not in page  # the 5th and 6th held-out photos are past the limit


def test_writing_figures_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    """A notebook's inline backend survives a run that writes figures (vaeprobe used to switch it to Agg, after
    which the notebook's own plt.show() showed nothing)."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        from vaeprobe.jobs.latents import run_latents

        run = run_latents("builtin:planted-direct", "builtin:photos-heldout", tmp_path / "lat", size=64, progress=False)
        assert any((run.path / "maps").rglob("*.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
