"""tlkeras.data: robust folders, CSV, arrays, TFDS and text pipelines (real TF, tiny data)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tlkeras import data

SIZE = (16, 16)


def _value(i):
    """Red value that encodes image id i (ids are spaced far apart for lossy formats)."""
    return 12 * i + 10


def _solid(i, mode="RGB"):
    v = _value(i)
    return Image.fromarray(np.full((20, 24, 3), (v, 255 - v, 40), np.uint8)).convert(mode)


def make_messy_folder(root):
    """Writes the issue's messy folder. Returns (good {relpath: (id, class)}, bad {relpath: reason
    substring}, ignored relpaths)."""
    good, bad = {}, {}
    for c in ("cats", "dogs", "empty"):
        os.makedirs(root / c)
    i = iter(range(100))

    def put(rel, cls, write):
        k = next(i)
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        write(k, str(root / rel))
        good[rel] = (k, cls)

    put("cats/a.jpg", 0, lambda k, p: _solid(k).save(p, quality=95))
    put("cats/b.png", 0, lambda k, p: _solid(k).save(p))
    put("cats/c.gif", 0, lambda k, p: _solid(k).save(p))
    put("cats/d.bmp", 0, lambda k, p: _solid(k).save(p))
    put("cats/e.webp", 0, lambda k, p: _solid(k).save(p, lossless=True))
    put("cats/gray.png", 0, lambda k, p: Image.new("L", (24, 20), _value(k)).save(p))
    put("cats/palette.png", 0, lambda k, p: _solid(k).quantize(4).save(p))
    put("cats/sixteen.png", 0,
        lambda k, p: Image.fromarray(np.full((20, 24), _value(k) * 257, np.uint16)).save(p))
    put("cats/really_png.jpg", 0, lambda k, p: _solid(k).save(p, format="PNG"))
    put("cats/scan.tif", 0, lambda k, p: _solid(k).save(p))
    put("cats/nested/deeper/n.jpg", 0, lambda k, p: _solid(k).save(p, quality=95))
    put("dogs/f.jpg", 1, lambda k, p: _solid(k).save(p, quality=95))
    put("dogs/gray.jpg", 1, lambda k, p: Image.new("L", (24, 20), _value(k)).save(p, quality=95))
    put("dogs/cmyk.jpg", 1, lambda k, p: _solid(k).convert("CMYK").save(p, quality=95))
    put("dogs/opaque_rgba.png", 1, lambda k, p: _solid(k, "RGBA").save(p))

    def transparent(k, p):  # alpha 128 over white must give _value(k) in red
        r = round((_value(k) * 255 - 255 * 127) / 128)
        Image.fromarray(np.full((20, 24, 4), (r, 0, 0, 128), np.uint8)).save(p)

    put("dogs/transparent.png", 1, transparent)
    (root / "cats/zero.jpg").write_bytes(b"")
    bad["cats/zero.jpg"] = "0 bytes"
    jpeg = root / "cats/a.jpg"
    (root / "dogs/truncated.jpg").write_bytes(jpeg.read_bytes()[:400])
    bad["dogs/truncated.jpg"] = "truncated"
    (root / "cats/text.jpg").write_text("this is not an image\n")
    bad["cats/text.jpg"] = "not an image"
    (root / "cats/notes.txt").write_text("notes")
    (root / "cats/nested/readme.md").write_text("# readme")
    ignored = ["cats/notes.txt", "cats/nested/readme.md"]
    return good, bad, ignored


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TLKERAS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def messy(tmp_path):
    root = tmp_path / "messy"
    good, bad, ignored = make_messy_folder(root)
    return root, good, bad, ignored


def _ids(images):
    """Image ids decoded from the red channel (mean over the image)."""
    red = np.asarray(images)[..., 0].mean(axis=(1, 2))
    return np.round((red - 10) / 12).astype(int).tolist()


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_scan_sorts_good_converted_bad_and_ignored(messy):
    root, good, bad, ignored = messy
    report = data.scan_images(root)
    rel = lambda p: os.path.relpath(p, root).replace(os.sep, "/")  # noqa: E731
    assert sorted(rel(p) for p in report.good) == sorted(good)
    assert {rel(p): r for p, r in report.bad}.keys() == bad.keys()
    for p, reason in report.bad:
        assert bad[rel(p)] in reason, (p, reason)
    assert sorted(rel(p) for p in report.ignored) == sorted(ignored)
    conv = {rel(r.path): r for r in report.converted}
    # Pillow-made copies live in the cache, never in the user's folder.
    for name in ("cats/scan.tif", "dogs/cmyk.jpg", "dogs/transparent.png"):
        assert conv[name].read_path.endswith(".png")
        assert not conv[name].read_path.startswith(str(root))
    for name in ("cats/gray.png", "cats/palette.png", "cats/sixteen.png", "dogs/gray.jpg",
                 "dogs/opaque_rgba.png"):
        assert "TF decoder" in conv[name].conversion
        assert conv[name].read_path == conv[name].path
    lying = next(r for r in report.images if rel(r.path) == "cats/really_png.jpg")
    assert "content is PNG" in lying.note
    saved = json.loads(open(report.report_path).read())
    assert saved["counts"] == {"good": len(good), "converted": len(conv), "bad": len(bad),
                               "ignored": len(ignored)}
    assert {os.path.basename(b["path"]) for b in saved["bad"]} == {"zero.jpg", "truncated.jpg",
                                                                   "text.jpg"}


def test_second_scan_uses_the_cache_and_notices_changes(messy, tmp_path, monkeypatch):
    root, good, bad, _ = messy
    first = data.scan_images(root, report_path=tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["bad"] == 3
    calls = []
    real = data._check_file
    monkeypatch.setattr(data, "_check_file", lambda p, d: calls.append(p) or real(p, d))
    second = data.scan_images(root)
    assert calls == [] and second.good == first.good and second.bad == first.bad
    # Fixing a broken file changes size/mtime: only that file is checked again.
    _solid(50).save(root / "dogs/truncated.jpg", quality=95)
    third = data.scan_images(root)
    assert [os.path.basename(p) for p in calls] == ["truncated.jpg"]
    assert len(third.bad) == 2 and len(third.good) == len(good) + 1


def test_strict_raises_before_training_with_the_list(messy):
    root, _, bad, _ = messy
    with pytest.raises(data.ImageScanError) as err:
        data.from_directory(root, SIZE, class_names=["cats", "dogs"], strict=True)
    for name in bad:
        assert os.path.basename(name) in str(err.value)
    assert len(err.value.report.bad) == 3
    assert len(err.value.report.ignored) == 2  # notes.txt, nested/readme.md


def test_unreadable_files_and_broken_links_are_reported_not_fatal(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        os.makedirs(root / c)
        _solid(1).save(root / c / "ok.png")
    os.symlink(tmp_path / "nowhere.jpg", root / "a" / "dangling.jpg")
    report = data.scan_images(root)
    assert len(report.good) == 2
    assert [(os.path.basename(p), r.split(":")[0]) for p, r in report.bad] == [
        ("dangling.jpg", "cannot read")]


def test_every_good_image_arrives_exactly_once_and_epochs_do_not_crash(messy):
    root, good, _, _ = messy
    with pytest.raises(ValueError, match=r"Empty class folder.*empty"):
        data.from_directory(root, SIZE)
    ds = data.from_directory(root, SIZE, class_names=["cats", "dogs"], batch_size=4, seed=3)
    assert ds.class_names == ["cats", "dogs"]
    expected = sorted((k, cls) for k, cls in good.values())
    for _ in range(2):  # two full epochs, reshuffled
        x, y = _collect(ds)
        assert x.shape == (len(good), *SIZE, 3) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255
        got = sorted(zip(_ids(x), y.tolist()))
        assert got == expected
    # Unshuffled order is file_paths order.
    ds = data.from_directory(root, SIZE, class_names=["cats", "dogs"], shuffle=False)
    x, y = _collect(ds)
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in ds.file_paths]
    assert _ids(x) == [good[r][0] for r in rel]
    assert y.tolist() == [good[r][1] for r in rel] == ds.labels.tolist()


def test_keras_image_dataset_from_directory_crashes_on_the_same_folder(messy):
    root = messy[0]
    ds = keras.utils.image_dataset_from_directory(root, image_size=SIZE, batch_size=4,
                                                  shuffle=False, verbose=False)
    with pytest.raises(tf.errors.InvalidArgumentError):
        for _ in ds:
            pass


def test_validation_split_is_stratified_disjoint_and_seeded(tmp_path):
    root = tmp_path / "d"
    ids = {}
    for c, cls in enumerate(("a", "b", "c")):
        os.makedirs(root / cls)
        for j in range(5):
            k = 5 * c + j
            _solid(k).save(root / cls / f"{k}.png")
            ids[k] = c
    train, val = data.from_directory(root, SIZE, validation_split=0.4, subset="both", seed=7,
                                     augmentation=keras.layers.RandomBrightness(0.5, seed=1))
    assert set(train.file_paths).isdisjoint(val.file_paths)
    assert len(train.file_paths) == 9 and len(val.file_paths) == 6
    assert np.bincount(val.labels).tolist() == [2, 2, 2]
    again = data.from_directory(root, SIZE, validation_split=0.4, subset="validation", seed=7)
    assert again.file_paths == val.file_paths
    xv, yv = _collect(again)
    assert sorted(_ids(xv)) == sorted(int(os.path.basename(p)[:-4]) for p in val.file_paths)
    xt, _ = _collect(train)
    nominal = [255 - _value(int(os.path.basename(p)[:-4])) for p in train.file_paths]
    assert np.abs(np.sort(xt[..., 1].mean(axis=(1, 2))) - np.sort(nominal)).max() > 5


def test_seed_makes_order_and_augmentation_deterministic(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for j in range(6):
            Image.fromarray(np.random.default_rng(j).integers(0, 255, (20, 20, 3), np.uint8)
                            ).save(root / c / f"{j}.png")

    def run():
        ds = data.from_directory(root, SIZE, seed=11, batch_size=3,
                                 augmentation=data.augmentation_preset("standard", seed=11))
        return [_collect(ds) for _ in range(2)]

    (x1, y1), (x2, y2) = run()
    (x3, y3), (x4, y4) = run()
    np.testing.assert_array_equal(x1, x3)
    np.testing.assert_array_equal(y2, y4)
    np.testing.assert_array_equal(x2, x4)
    assert not np.array_equal(x1, x2)  # a new shuffle/augmentation every epoch


@pytest.mark.parametrize("cache", [True, "file"])
def test_cache_gives_the_same_images(tmp_path, cache):
    root = tmp_path / "d"
    for c in ("a", "b"):
        os.makedirs(root / c)
        for j in range(4):
            _solid(j + 4 * (c == "b")).save(root / c / f"{j}.jpg")
    cache = str(tmp_path / "tfcache") if cache == "file" else cache
    ds = data.from_directory(root, SIZE, seed=0, cache=cache)
    a = sorted(_ids(_collect(ds)[0]))
    b = sorted(_ids(_collect(ds)[0]))
    assert a == b == list(range(8))
    if cache is not True:
        assert any(f.startswith("tfcache") for f in os.listdir(tmp_path))


def test_clear_errors_for_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.from_directory(tmp_path / "nope", SIZE)
    one = tmp_path / "one"
    os.makedirs(one / "only")
    _solid(1).save(one / "only/x.png")
    with pytest.raises(ValueError, match="Only one class"):
        data.from_directory(one, SIZE)
    unlabeled = data.from_directory(one, SIZE, labels=None)
    assert _ids(np.concatenate(list(unlabeled))) == [1]
    flat = tmp_path / "flat"
    os.makedirs(flat)
    _solid(1).save(flat / "x.png")
    with pytest.raises(ValueError, match="No class subfolders.*directly"):
        data.from_directory(flat, SIZE)
    nothing = tmp_path / "nothing"
    os.makedirs(nothing / "a")
    os.makedirs(nothing / "b")
    (nothing / "a/readme.txt").write_text("x")
    with pytest.raises(ValueError, match="No files with extensions"):
        data.from_directory(nothing, SIZE)
    broken = tmp_path / "broken"
    os.makedirs(broken / "a")
    os.makedirs(broken / "b")
    _solid(1).save(broken / "a/x.png")
    (broken / "b/y.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)Empty class.*'b'.*undecodable.*0 bytes"):
        data.from_directory(broken, SIZE)


def test_from_csv_multilabel_relative_paths_and_errors(tmp_path):
    os.makedirs(tmp_path / "imgs")
    for k in range(4):
        _solid(k).save(tmp_path / "imgs" / f"{k}.png")
    (tmp_path / "imgs/bad.png").write_text("nope")
    rows = ["file,tags", "imgs/0.png,sea|sky", "imgs/1.png,sky", "imgs/2.png,sand",
            "imgs/3.png,sea | sand", "imgs/bad.png,sky"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    ds = data.from_csv(csv_path, "file", "tags", image_size=SIZE, label_sep="|", shuffle=False)
    assert ds.class_names == ["sand", "sea", "sky"]
    x, y = _collect(ds)
    assert _ids(x) == [0, 1, 2, 3]  # the undecodable row is skipped and reported
    np.testing.assert_array_equal(y, [[0, 1, 1], [0, 0, 1], [1, 0, 0], [1, 1, 0]])
    assert [os.path.basename(p) for p, _ in ds.scan_report.bad] == ["bad.png"]
    single = tmp_path / "single.csv"
    single.write_text("file,label\nimgs/0.png,cat\nimgs/1.png,dog\nimgs/2.png,cat\n")
    x, y = _collect(data.from_csv(single, "file", "label", image_size=SIZE, shuffle=False))
    assert y.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"Column 'path' not in .*\['file', 'label'\]"):
        data.from_csv(single, "path", "label", image_size=SIZE)
    with pytest.raises(ValueError, match="Label 'dog' on line 3 .* not in class_names"):
        data.from_csv(single, "file", "label", image_size=SIZE, class_names=["cat", "bird"])
    missing = tmp_path / "missing.csv"
    missing.write_text("file,label\nimgs/0.png,a\nimgs/gone.png,b\n")
    with pytest.raises(FileNotFoundError, match="line 3: .*gone.png"):
        data.from_csv(missing, "file", "label", image_size=SIZE)


def test_from_arrays_grayscale_resize_and_label_range():
    x = np.stack([np.full((8, 8), _value(k), np.uint8) for k in range(6)])
    y = np.array([0, 1, 2, 0, 1, 2])
    ds = data.from_arrays(x, y, image_size=SIZE, batch_size=4, shuffle=False, num_classes=3)
    xs, ys = _collect(ds)
    assert xs.shape == (6, *SIZE, 3) and xs.dtype == np.float32
    np.testing.assert_array_equal(xs[..., 0], xs[..., 2])
    assert _ids(xs) == list(range(6)) and ys.tolist() == y.tolist()
    xs, _ = _collect(data.from_arrays(x[..., None], y, seed=1))
    assert xs.shape == (6, 8, 8, 3) and sorted(_ids(xs)) == list(range(6))
    with pytest.raises(ValueError, match=r"Label 3 at index 1 is outside \[0, num_classes=3\)"):
        data.from_arrays(x, [0, 3, 1, 1, 1, 1], num_classes=3)
    with pytest.raises(ValueError, match="x must have shape"):
        data.from_arrays(np.zeros((2, 4, 4, 2)), [0, 1])


def test_from_tfds_image_and_text_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        ds = data.from_tfds("mnist", "train", (12, 12), batch_size=4, seed=0,
                            data_dir=str(tmp_path), download=False)  # mock data, no network
        x, y = _collect(ds)
        assert x.shape == (10, 12, 12, 3) and x.dtype == np.float32
        np.testing.assert_array_equal(x[..., 0], x[..., 1])
        assert ds.class_names == [str(i) for i in range(10)]
        assert set(y.tolist()) <= set(range(10))
        text = data.from_tfds("imdb_reviews", "test", batch_size=5, shuffle=False,
                              data_dir=str(tmp_path), download=False)
        s, lab = next(iter(text))
        assert s.dtype == tf.string and s.shape == (5,) and lab.shape == (5,)
        assert text.class_names == ["neg", "pos"]


def test_from_tfds_offline_error_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(RuntimeError, match=r"(?s)not prepared.*tfds build mnist.*data_dir=DIR"):
        data.from_tfds("mnist", "train", (8, 8), data_dir=str(tmp_path), download=False)


def test_from_text_directory_yields_raw_strings(tmp_path):
    for c, words in (("neg", ["bad", "awful", "meh"]), ("pos", ["good", "great"])):
        os.makedirs(tmp_path / c)
        for j, w in enumerate(words):
            (tmp_path / c / f"{j}.txt").write_text(f"{w} movie")
    ds = data.from_text_directory(tmp_path, batch_size=8, shuffle=False)
    texts, labels = next(iter(ds))
    assert [t.decode() for t in texts.numpy()] == ["bad movie", "awful movie", "meh movie",
                                                    "good movie", "great movie"]
    assert labels.numpy().tolist() == [0, 0, 0, 1, 1] and ds.class_names == ["neg", "pos"]
    os.makedirs(tmp_path / "zzz")
    with pytest.raises(ValueError, match="Empty class folder.*zzz"):
        data.from_text_directory(tmp_path)


def test_class_weights_balanced(tmp_path):
    assert data.class_weights([0, 0, 0, 1]) == {0: 4 / 6, 1: 2.0}
    assert data.class_weights(np.eye(3)[[0, 1, 1, 2, 2, 2]]) == pytest.approx(
        {0: 2.0, 1: 1.0, 2: 2 / 3})
    ds = data.from_arrays(np.zeros((4, 4, 4)), [1, 1, 1, 0], batch_size=2)
    assert data.class_weights(ds) == {0: 2.0, 1: 4 / 6}
    assert data.class_weights(ds.map(lambda x, y: (x, y))) == {0: 2.0, 1: 4 / 6}


def test_augmentation_presets_and_user_layers():
    for name, n in (("light", 2), ("standard", 5), ("strong", 6)):
        aug = data.augmentation_preset(name, seed=1)
        assert isinstance(aug, keras.Sequential) and len(aug.layers) == n
        x = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)), tf.float32)
        out = aug(x, training=True).numpy()
        assert out.shape == x.shape and not np.allclose(out, x)
        np.testing.assert_allclose(aug(x, training=False), x)
    with pytest.raises(ValueError, match="Unknown augmentation preset 'heavy'"):
        data.augmentation_preset("heavy")
    with pytest.raises(TypeError, match="augmentation must be"):
        data.from_arrays(np.zeros((2, 4, 4)), [0, 1], augmentation=3)
    ds = data.from_arrays(np.zeros((2, 4, 4)), [0, 1],
                          augmentation=[keras.layers.RandomBrightness(0.5, seed=0)])
    assert np.abs(next(iter(ds))[0].numpy()).max() > 0

