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


def test_report_html_matches_report_json(evaluated):
    report, out = evaluated
    assert report.files["html"] == str(out / "report.html")
    page = open(out / "report.html").read()
    saved = json.load(open(out / "report.json"))
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    for key, value in saved["metrics"].items():
        shown = re.search(rf"data-metric='{key}'>([0-9.]+)<", page).group(1)
        assert float(shown) == pytest.approx(value, abs=5e-5)
    rows = re.findall(r"<tr data-class='(\w)'>((?:<td>[^<]*</td>)+)</tr>", page)
    assert [name for name, _ in rows] == list("abcd")
    for name, cells in rows:
        values = [float(v) for v in re.findall(r"<td>([^<]*)</td>", cells)[1:]]
        expected = saved["per_class"][name]
        assert values == pytest.approx(
            [expected[k] for k in ("precision", "recall", "f1", "support")], abs=5e-5)
    confusion = page.split("id='confusion'")[1].split("</table>")[0]
    counts = [int(v) for v in re.findall(r"<td>(\d+)</td>", confusion)]
    assert counts == [v for row in saved["confusion_matrix"] for v in row]
    assert len(saved["mistakes"]) == 6
    for mistake in saved["mistakes"]:  # each mistake is shown, with its image and Grad-CAM
        assert f"#{mistake['index']} true <b>{mistake['true']}</b>" in page
        assert f"alt='Grad-CAM of sample {mistake['index']}'" in page
    assert "Training curves" in page and "Correct examples per class" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh "
                    "installs it where apt-get is available)")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    _, out = evaluated
    url = "file://" + str(out / "report.html")
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    images = re.search(r'<body data-images="(\d+)/(\d+)"', dom.stdout)
    assert images, dom.stdout[:500]
    assert images.group(1) == images.group(2) and int(images.group(2)) > 10  # none missing
    assert "data-error" not in dom.stdout and "Uncaught" not in dom.stderr
    shot = tmp_path / "report.png"
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120, check=True)
    picture = keras.utils.load_img(shot)
    assert picture.size == (1200, 2400)
    assert np.asarray(picture).std() > 10  # something was drawn
    assert os.path.getsize(shot) > 10_000
