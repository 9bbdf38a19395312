"""evaluate(..., output_dir) writes a self-contained report.html that a real browser renders."""

import json
import os
import re
import shutil
import subprocess

import keras
import numpy as np
import pytest

import tlkeras
from tests.conftest import digits_rgb
from tests.test_explain import _user_base

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A user-base model trained briefly on real digits (0-3), evaluated into a folder."""
    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("run")
    x, y = digits_rgb(32, classes=[0, 1, 2, 3])
    model = tlkeras.build_transfer_model(_user_base(), num_classes=4, dropout=0.0)
    tlkeras.unfreeze(model)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x[:300], y[:300], validation_data=(x[300:], y[300:]), epochs=3, verbose=0,
              callbacks=[keras.callbacks.CSVLogger(str(out / "history.csv"))])
    report = tlkeras.evaluate(model, (x[300:], y[300:]), class_names=list("abcd"),
                              output_dir=str(out), top_k=2, num_mistakes=6)
    return report, out


def assert_page_matches_json(out, class_names):
    """report.html in `out` shows report.json's metrics, per-class rows, confusion matrix and
    mistakes; returns `(page, saved report)`."""
    page = open(out / "report.html").read()
    saved = json.load(open(out / "report.json"))
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    for key, value in saved["metrics"].items():
        shown = re.search(rf"data-metric='{key}'>([0-9.]+)<", page).group(1)
        assert float(shown) == pytest.approx(value, abs=5e-5)
    rows = re.findall(r"<tr data-class='(\w+)'>((?:<td>[^<]*</td>)+)</tr>", page)
    assert [name for name, _ in rows] == class_names
    for name, cells in rows:
        values = [float(v) for v in re.findall(r"<td>([^<]*)</td>", cells)[1:]]
        expected = saved["per_class"][name]
        assert values == pytest.approx(
            [expected[k] for k in ("precision", "recall", "f1", "support")], abs=5e-5)
    confusion = page.split("id='confusion'")[1].split("</table>")[0]
    counts = [int(v) for v in re.findall(r"<td>(\d+)</td>", confusion)]
    assert counts == [v for row in saved["confusion_matrix"] for v in row]
    for mistake in saved["mistakes"]:
        assert f"#{mistake['index']} true <b>{mistake['true']}</b>" in page
    assert "Correct examples per class" in page
    return page, saved


def test_report_html_matches_report_json(evaluated):
    report, out = evaluated
    assert report.files["html"] == str(out / "report.html")
    page, saved = assert_page_matches_json(out, list("abcd"))
    assert len(saved["mistakes"]) == 6
    for mistake in saved["mistakes"]:  # each mistake is shown with its Grad-CAM
        assert f"alt='Grad-CAM of sample {mistake['index']}'" in page
    assert "Training curves" in page


def render_in_chromium(page, folder, min_images=1):
    """Opens `page` in headless Chromium: no missing image, no script error, a screenshot in
    `folder`. Returns the rendered DOM."""
    url = "file://" + str(page)
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--enable-logging=stderr", "--v=0", f"--user-data-dir={folder / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.search(r'<body data-images="(\d+)/(\d+)"', dom.stdout)
    assert images, dom.stdout[:500]
    assert images.group(1) == images.group(2) and int(images.group(2)) >= min_images
    assert "data-error" not in dom.stdout and "Uncaught" not in dom.stderr
    shot = folder / "report.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120, check=True)
    picture = keras.utils.load_img(shot)
    assert picture.size == (1200, 2400)
    assert np.asarray(picture).std() > 10  # something was drawn
    assert os.path.getsize(shot) > 10_000
    return dom.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh "
                    "installs it where apt-get is available)")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    _, out = evaluated
    render_in_chromium(out / "report.html", tmp_path, min_images=11)
