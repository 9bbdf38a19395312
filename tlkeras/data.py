"""Input pipelines that survive real folders.

Every image constructor returns a batched ``tf.data.Dataset`` of
``(float32 RGB pixels in [0, 255], labels)`` - the input every tlkeras model
takes - with a ``class_names`` attribute (Keras convention) and, for files,
``file_paths`` (original paths, in list order) and ``scan_report``.

Robust reading: before a pipeline is built, :func:`scan_images` checks every
file once (in parallel) and sorts it into

* **good**: TensorFlow decodes it to the right pixels; it is read inside the
  ``tf.data`` graph. Grayscale, palette, 16-bit and fully opaque RGBA PNG/JPEG/
  GIF files are converted to 8-bit RGB by TensorFlow's decoder itself.
* **converted**: Pillow reads it but TensorFlow cannot (TIFF, CMYK JPEG,
  palette BMP, ...) or would get it wrong (transparent images are composited
  onto a white background). An RGB PNG copy is written once to the tlkeras
  cache folder (never into your folder) and the pipeline reads the copy.
* **bad**: nothing decodes it (zero bytes, truncated, not an image). It is
  skipped, logged (logger ``"tlkeras.data"``) and listed with its reason in a
  JSON report; ``strict=True`` raises :class:`ImageScanError` instead.

So no epoch can crash on a file. Results are remembered per file
(absolute path, size, mtime) in ``<cache>/scan/<folder-hash>.json``, so a
second scan of the same folder only stats the files. ``<cache>`` is
``$TLKERAS_CACHE_DIR`` or ``~/.cache/tlkeras``.

Example:

>>> import os, tempfile, keras
>>> from PIL import Image
>>> folder = tempfile.mkdtemp()
>>> for name, color in [("daisy", "white"), ("roses", "red"), ("tulips", "yellow")]:
...     os.makedirs(os.path.join(folder, name))
...     for i in range(5):
...         Image.new("RGB", (40, 30), color).save(os.path.join(folder, name, f"{i}.png"))
>>> train_ds, val_ds = from_directory(folder, (32, 32), batch_size=4,
...     validation_split=0.2, subset="both", seed=42, augmentation="standard")
>>> train_ds.class_names
['daisy', 'roses', 'tulips']
>>> len(train_ds.file_paths), len(val_ds.file_paths)
(12, 3)
>>> class_weights(train_ds)
{0: 1.0, 1: 1.0, 2: 1.0}
>>> model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
...                           keras.layers.Dense(3, activation="softmax")])
>>> model.compile("adam", "sparse_categorical_crossentropy")
>>> history = model.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0,
...                     class_weight=class_weights(train_ds))
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import socket
import string

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

from tlkeras import atomic

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp",
                    ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm")
# Formats TensorFlow's decode_image reads (sniffed from content, not extension).
_TF_FORMATS = {"JPEG", "PNG", "GIF", "BMP"} | (
    {"WEBP"} if hasattr(tf.image, "decode_webp") else set())
_EXT_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG",
                ".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP",
                ".tif": "TIFF", ".tiff": "TIFF"}
_SCAN_VERSION = 2  # 2: entries keyed on content too
_SHUFFLE_BUFFER_BYTES = 256 * 2**20

__all__ = [
    "ImageRecord", "ImageScanError", "ScanReport", "augmentation_preset",
    "class_weights", "from_arrays", "from_csv", "from_directory", "from_files", "from_tfds",
    "from_text_directory", "scan_images",
]


def cache_root():
    """The tlkeras cache folder: ``$TLKERAS_CACHE_DIR`` or ``~/.cache/tlkeras``."""
    return os.environ.get("TLKERAS_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tlkeras")


# --------------------------------------------------------------------- scan


@dataclasses.dataclass
class ImageRecord:
    """One usable image: ``path`` (yours), ``read_path`` (what the pipeline
    reads: ``path`` or a converted copy), ``conversion`` (None or what was
    converted) and ``note`` (e.g. an extension that does not match content)."""

    path: str
    read_path: str
    conversion: str | None = None
    note: str | None = None


@dataclasses.dataclass
class ScanReport:
    """Result of :func:`scan_images`.

    Attributes: ``root``; ``images`` (usable :class:`ImageRecord`s, sorted by
    path); ``bad`` (list of ``(path, reason)``); ``ignored`` (files without an
    image extension); ``report_path`` (the JSON report written).
    """

    root: str
    images: list
    bad: list
    ignored: list
    report_path: str | None = None

    @property
    def good(self):
        """Paths of all usable images (converted ones included)."""
        return [r.path for r in self.images]

    @property
    def converted(self):
        """Records of usable images that needed a conversion to 8-bit RGB."""
        return [r for r in self.images if r.conversion]

    def to_dict(self):
        return {
            "root": self.root,
            "counts": {"good": len(self.images), "converted": len(self.converted),
                       "bad": len(self.bad), "ignored": len(self.ignored)},
            "bad": [{"path": p, "reason": r} for p, r in self.bad],
            "converted": [dataclasses.asdict(r) for r in self.converted],
            "good": self.good,
            "ignored": self.ignored,
        }

    def __str__(self):
        lines = [f"{len(self.images)} usable images in {self.root} "
                 f"({len(self.converted)} converted), {len(self.bad)} skipped"]
        lines += [f"  {p}: {r}" for p, r in self.bad]
        return "\n".join(lines)


class ImageScanError(ValueError):
    """Raised with ``strict=True`` when files cannot be decoded; ``.report``
    holds the :class:`ScanReport`."""

    def __init__(self, report):
        self.report = report
        super().__init__(
            f"{len(report.bad)} image file(s) under {report.root} cannot be decoded "
            "(strict=True; remove or fix them, or pass strict=False to skip them):\n"
            + "\n".join(f"  {p}: {r}" for p, r in report.bad)
            + (f"\nReport: {report.report_path}" if report.report_path else ""))


def _describe_bad(path, error, head):
    if isinstance(error, UnidentifiedImageError):
        printable = set(string.printable.encode())
        if head and all(b in printable for b in head):
            return "not an image: text content"
        return "not an image: unknown file format"
    message = str(error) or type(error).__name__
    if "truncated" in message.lower():
        return f"truncated image ({message})"
    return f"cannot decode: {message}"


def _to_rgb(im):
    """Pillow image -> 8-bit RGB; transparency composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if im.mode.startswith("I;16") or a.max() > 255 else a
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _check_file(path, convert_dir):
    """Returns ("good", ImageRecord) or ("bad", reason); never raises."""
    try:
        return _check_image(path, convert_dir)
    except Exception as e:  # noqa: BLE001 - e.g. permissions, a file removed meanwhile
        return "bad", f"cannot read: {e}"


def _check_image(path, convert_dir):
    size = os.path.getsize(path)
    if size == 0:
        return "bad", "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            has_alpha = mode in ("RGBA", "LA", "PA") or "transparency" in im.info
            frames = getattr(im, "n_frames", 1)
    except Exception as e:  # noqa: BLE001 - any header failure is a reason
        return "bad", _describe_bad(path, e, head)
    ext = os.path.splitext(path)[1].lower()
    note = None
    if _EXT_FORMATS.get(ext, fmt) != fmt:
        note = f"extension {ext} but content is {fmt}"
    in_graph = fmt in _TF_FORMATS and not (
        (fmt == "JPEG" and mode == "CMYK")
        or (fmt == "BMP" and mode not in ("RGB", "RGBA"))
        or (fmt in ("GIF", "WEBP") and has_alpha)
        or (fmt == "WEBP" and frames > 1))
    tf_error = None
    if in_graph:
        try:
            pixels = tf.io.decode_image(tf.io.read_file(os.fsencode(path)),
                                        channels=4 if has_alpha else 3,
                                        expand_animations=False)
            ok = tuple(pixels.shape[:2]) == (h, w) and (
                not has_alpha or int(tf.reduce_min(pixels[..., 3])) == 255)
            if ok and fmt == "BMP":  # TF's BMP decoder ignores some variants
                with Image.open(path) as im:
                    ok = np.array_equal(np.asarray(im.convert("RGB")), pixels.numpy()[..., :3])
            if ok:
                conversion = {"L": "grayscale -> RGB", "P": "palette -> RGB",
                              "1": "1-bit -> RGB", "RGBA": "opaque RGBA -> RGB",
                              "LA": "opaque grayscale+alpha -> RGB"}.get(mode)
                if mode.startswith("I") and fmt == "PNG":
                    conversion = "16-bit -> 8-bit RGB"
                if conversion:
                    conversion += " (by the TF decoder)"
                return "good", ImageRecord(path, path, conversion, note)
        except tf.errors.OpError as e:
            tf_error = e.message.splitlines()[0] if e.message else type(e).__name__
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
    except Exception as e:  # noqa: BLE001
        return "bad", _describe_bad(path, e, head)
    st = os.stat(path)
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{_digest(path)}".encode(
        "utf-8", "surrogateescape")).hexdigest()[:24]
    copy = os.path.join(convert_dir, key + ".png")
    if not os.path.exists(copy):
        tmp = f"{copy}.{os.getpid()}.tmp"
        rgb.save(tmp, format="PNG")
        os.replace(tmp, copy)
    why = f"{fmt} {mode}" + (" with transparency (composited onto white)" if has_alpha else "")
    why += f" -> RGB copy (TF: {tf_error})" if tf_error else " -> RGB copy"
    return "good", ImageRecord(path, copy, why, note)


def _list_images(folder, exts=IMAGE_EXTENSIONS, seen=None):
    """(files with exts, other files) under folder, recursively, sorted.

    Each real folder and file is read once: symbolic links back up the tree (loops) or to
    what was already read (`seen`, shared between the class folders) are skipped."""
    seen = seen if seen is not None else {"dirs": set(), "files": set()}
    seen_dirs, seen_files = seen["dirs"], seen["files"]
    images, ignored, repeats, top = [], [], [], os.path.realpath(folder)

    def unreadable(error):
        raise PermissionError(error.errno, f"Cannot read the folder {error.filename}: "
                              f"{error.strerror}. Make it readable, or move it out of {folder}.")

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or (dirpath != folder and os.path.commonpath([real, top]) == real):
            repeats.append(dirpath)
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = os.path.join(dirpath, name)
            if name.lower().endswith(exts):
                if os.path.realpath(p) in seen_files:
                    repeats.append(p)
                    continue
                seen_files.add(os.path.realpath(p))
                images.append(p)
            else:
                ignored.append(p)
    if repeats:
        logger.warning("Read each real file once under %s: skipped %d symbolic links to folders or "
                       "files already read (e.g. %s).", folder, len(repeats), repeats[0])
    return images, ignored


def _digest(path, head=1 << 16):
    """A content key: the file's first 64 KiB (the whole of most images)."""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(head), digest_size=12).hexdigest()
    except OSError:
        return None


def _scan_files(files, root, *, ignored=(), strict=False, report_path=None, num_workers=None):
    root = os.path.abspath(root)
    key = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:16]
    scan_dir = os.path.join(cache_root(), "scan")
    convert_dir = os.path.join(cache_root(), "converted")
    try:
        os.makedirs(scan_dir, exist_ok=True)
        os.makedirs(convert_dir, exist_ok=True)
        with atomic.path(os.path.join(scan_dir, ".writable")) as probe:
            open(probe, "w").close()
    except OSError as e:
        raise OSError(e.errno, f"The tlkeras cache folder {cache_root()} is not writable "
                      f"({e.strerror}). Set TLKERAS_CACHE_DIR to a writable folder.") from e
    index_path = os.path.join(scan_dir, key + ".json")
    stamp = {"version": _SCAN_VERSION, "tf": tf.__version__, "pil": Image.__version__}
    index = {}
    try:
        with open(index_path) as f:
            saved = json.load(f)
        if saved.get("stamp") == stamp:
            index = saved["files"]
    except (OSError, ValueError, KeyError):
        pass

    results, todo = {}, []
    for p in files:
        p = os.path.abspath(p)
        try:
            st = os.stat(p)
        except OSError as e:  # e.g. a broken symlink
            results[p] = ("bad", f"cannot read: {e}")
            continue
        entry = index.get(p)
        digest = _digest(p)
        if (entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns
                and entry[4:] == [digest]
                and (entry[2] == "bad" or os.path.exists(entry[3]["read_path"]))):
            results[p] = (entry[2], entry[3] if entry[2] == "bad" else ImageRecord(**entry[3]))
        else:
            todo.append((p, st, digest))
    if todo:
        logger.info("Scanning %d image files under %s (%d already checked)",
                    len(todo), root, len(results))
        workers = num_workers or min(32, 2 * (os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for (p, st, digest), res in zip(todo, pool.map(
                    lambda a: _check_file(a[0], convert_dir), todo)):
                results[p] = res
                index[p] = [st.st_size, st.st_mtime_ns, res[0],
                            res[1] if res[0] == "bad" else dataclasses.asdict(res[1]), digest]
        tmp = f"{index_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"stamp": stamp, "root": root, "files": index}, f)
        os.replace(tmp, index_path)

    report = ScanReport(
        root=root,
        images=[results[p][1] for p in sorted(results) if results[p][0] == "good"],
        bad=[(p, results[p][1]) for p in sorted(results) if results[p][0] == "bad"],
        ignored=sorted(os.path.abspath(p) for p in ignored))
    report.report_path = report_path or os.path.join(scan_dir, key + ".report.json")
    os.makedirs(os.path.dirname(os.path.abspath(report.report_path)), exist_ok=True)
    with open(report.report_path, "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    for p, reason in report.bad:
        logger.warning("Skipping %s: %s", p, reason)
    logger.info("%d usable images (%d converted), %d skipped; report: %s",
                len(report.images), len(report.converted), len(report.bad),
                report.report_path)
    if strict and report.bad:
        raise ImageScanError(report)
    return report


def scan_images(path, *, strict=False, report_path=None, num_workers=None):
    """Checks every image file under ``path`` (recursively) once.

    Files with an image extension are decoded (TensorFlow first, Pillow as a
    fallback); see the module docstring for what counts as good, converted and
    bad. Runs in a thread pool of ``num_workers`` (default ``2 * cpu_count``)
    and remembers results by (path, size, mtime), so a second scan is fast.

    Args:
        path: folder to scan.
        strict: raise :class:`ImageScanError` listing bad files instead of
            skipping them.
        report_path: where to write the JSON report (default: next to the
            scan cache, ``<cache>/scan/<hash>.report.json``).
        num_workers: threads used for checking.

    Returns:
        A :class:`ScanReport`.

    Example:

    >>> import os, tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> os.makedirs(os.path.join(folder, "cat"))
    >>> Image.new("RGB", (8, 8)).save(os.path.join(folder, "cat", "ok.png"))
    >>> with open(os.path.join(folder, "cat", "x.jpg"), "wb") as f:
    ...     _ = f.write(b"not an image")
    >>> report = scan_images(folder)
    >>> len(report.images), len(report.bad)
    (1, 1)
    >>> for path, reason in report.bad:
    ...     print(os.path.relpath(path, folder), reason)
    cat/x.jpg ...
    """
    path = _check_dir(path)
    images, ignored = _list_images(path)
    return _scan_files(images, path, ignored=ignored, strict=strict,
                       report_path=report_path, num_workers=num_workers)


# ------------------------------------------------------------ augmentation

_PRESETS = {
    "light": dict(rotation=0.05, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0),
    "medium": dict(rotation=0.05, zoom=0.0, translation=0.0, contrast=0.0, brightness=0.0,
                   randaugment=True),
    "standard": dict(rotation=0.1, zoom=0.1, translation=0.1, contrast=0.1, brightness=0.0),
    "strong": dict(rotation=0.2, zoom=0.2, translation=0.15, contrast=0.3, brightness=0.2),
}


def augmentation_preset(preset="standard", *, seed=None, name="augmentation"):
    """A ``keras.Sequential`` of random preprocessing layers for [0, 255] images.

    Presets: ``"light"`` (horizontal flip, small rotation), ``"medium"``
    (``"light"`` + ``keras.layers.RandAugment``, two random ops per image), ``"standard"``
    (+ zoom, translation, contrast) and ``"strong"`` (larger ranges, +
    brightness). The layers only act with ``training=True``. MixUp and CutMix
    need the labels, so they are not here: see ``tlkeras.fine_tune(mix=...)``. ``seed`` makes
    them repeatable; ``name`` names the Sequential.

    Example:

    >>> aug = augmentation_preset("light", seed=1)
    >>> [type(layer).__name__ for layer in aug.layers]
    ['RandomFlip', 'RandomRotation']
    """
    if preset not in _PRESETS:
        raise ValueError(f"Unknown augmentation preset {preset!r}; use one of {list(_PRESETS)} "
                         "or pass your own keras layers.")
    p = _PRESETS[preset]
    L = keras.layers
    layers = [L.RandomFlip("horizontal", seed=seed), L.RandomRotation(p["rotation"], seed=seed)]
    if p["zoom"]:
        layers.append(L.RandomZoom(p["zoom"], seed=seed))
    if p["translation"]:
        layers.append(L.RandomTranslation(p["translation"], p["translation"], seed=seed))
    if p["contrast"]:
        layers.append(L.RandomContrast(p["contrast"], value_range=(0, 255), seed=seed))
    if p["brightness"]:
        layers.append(L.RandomBrightness(p["brightness"], value_range=(0, 255), seed=seed))
    if p.get("randaugment"):
        layers.append(L.RandAugment(value_range=(0, 255), seed=seed))
    return keras.Sequential(layers, name=name)


def _resolve_augmentation(augmentation, seed):
    if augmentation is None:
        return None
    if isinstance(augmentation, str):
        return augmentation_preset(augmentation, seed=seed)
    if isinstance(augmentation, (list, tuple)):
        return keras.Sequential(list(augmentation), name="augmentation")
    if isinstance(augmentation, keras.layers.Layer):
        return augmentation
    raise TypeError("augmentation must be None, a preset name ('light', 'standard', "
                    f"'strong'), a keras layer or a list of layers; got {augmentation!r}")


# ------------------------------------------------------------- pipelines


def _check_dir(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Data path does not exist: {path!r}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"Data path is not a folder: {path!r}")
    return path


def _image_size(image_size):
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"Expected image_size to be (height, width) of ints > 0 or an int > 0, "
                         f"received image_size={image_size!r}.")
    return tuple(int(s) for s in size)


def _to_rgb_tensor(img):
    """(H, W, 1|3|4) -> float32 (H, W, 3)."""
    channels = img.shape[-1]
    if channels == 1:
        img = tf.image.grayscale_to_rgb(img)
    elif channels == 4:
        img = img[..., :3]
    return tf.cast(img, tf.float32)


def _resize(img, image_size, interpolation, crop_to_aspect_ratio):
    if image_size is None:
        return img
    img = keras.ops.image.resize(img, image_size, interpolation=interpolation,
                                 crop_to_aspect_ratio=crop_to_aspect_ratio)
    img.set_shape((*image_size, 3))
    return img


def _split(groups, validation_split, subset, seed):
    """Stratified split of indices 0..n-1 (groups: hashable label per item)."""
    if validation_split is None:
        if subset is not None:
            raise ValueError(f"subset={subset!r} needs validation_split.")
        return [np.arange(len(groups))]
    if not 0 < validation_split < 1:
        raise ValueError(f"validation_split must be in (0, 1); got {validation_split}")
    if subset not in ("training", "validation", "both"):
        raise ValueError("With validation_split, subset must be 'training', 'validation' "
                         f"or 'both'; got {subset!r}")
    rng = np.random.default_rng(1337 if seed is None else seed)
    train, val = [], []
    groups = np.asarray([str(g) for g in groups])
    for g in sorted(set(groups)):
        idx = rng.permutation(np.flatnonzero(groups == g))
        n_val = int(round(len(idx) * validation_split))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    train, val = np.sort(np.array(train, int)), np.sort(np.array(val, int))
    return {"training": [train], "validation": [val], "both": [train, val]}[subset]


def _encode_labels(labels, label_mode, num_classes):
    if label_mode == "int":
        return np.asarray(labels, np.int32)
    if label_mode == "categorical":
        return np.eye(num_classes, dtype=np.float32)[np.asarray(labels, int)]
    if label_mode == "binary":
        if num_classes != 2:
            raise ValueError(f"label_mode='binary' needs exactly 2 classes; found {num_classes}.")
        return np.asarray(labels, np.float32).reshape(-1, 1)
    raise ValueError(f"label_mode must be 'int', 'categorical', 'binary' or None; "
                     f"got {label_mode!r}")


def _finish(ds, n, *, batch_size, shuffle, seed, cache, augmentation, elem_bytes, decode,
            cheap=True, skip_errors=False):
    """Shared tail: (shuffle) -> decode -> (cache) -> (shuffle) -> batch -> aug -> prefetch.

    ``cheap``: elements before ``decode`` are paths/indices, so they are
    shuffled fully every epoch; otherwise a bounded buffer after decode."""
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"Expected batch_size to be an int >= 1 or None, received "
                         f"batch_size={batch_size!r}.")
    if shuffle and cheap and not cache:
        ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
    if skip_errors:  # decode flags files broken since the scan: skipped (and logged), not fatal
        ds = ds.filter(_flagged_ok).map(_drop_flag)
        ds = ds.ignore_errors(log_warning=True)
    if cache:
        ds = ds.cache("" if cache is True else os.fspath(cache))
    if shuffle and (cache or not cheap):
        buffer = max(8 * (batch_size or 1), min(n, _SHUFFLE_BUFFER_BYTES // elem_bytes))
        ds = ds.shuffle(max(1, min(n, buffer)), seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        ds = ds.batch(batch_size)
    if augmentation is not None:  # sequential when seeded: the layers' seed state is shared
        ds = ds.map(lambda x, *y: (augmentation(x, training=True), *y) if y
                    else augmentation(x, training=True),
                    num_parallel_calls=AUTOTUNE if seed is None else None)
    ds = ds.prefetch(AUTOTUNE)
    ds.augmentation = augmentation  # tlkeras.fine_tune / tune: no feature cache for augmented data
    return ds


def _flagged_ok(*element):
    return element[-1]


def _drop_flag(*element):
    return element[:-1] if len(element) > 2 else element[0]


def _files_dataset(records, labels, image_size, *, interpolation, crop_to_aspect_ratio, **tail):
    read_paths = [r.read_path for r in records]
    n = len(read_paths)
    if tail["shuffle"] and tail["cache"]:  # fixed pre-shuffle; cache freezes the order
        order = np.random.default_rng(tail["seed"]).permutation(n)
        read_paths = [read_paths[i] for i in order]
        labels = None if labels is None else labels[order]

    def read(contents):
        img = tf.io.decode_image(contents, channels=3, expand_animations=False)
        img.set_shape((None, None, 3))
        return _resize(tf.cast(img, tf.float32), image_size, interpolation, crop_to_aspect_ratio)

    def decode(path, *label):  # (image, *label, ok): a file broken since the scan is skipped
        contents = tf.io.read_file(path)
        ok = _looks_like_image(contents)
        img = tf.cond(ok, lambda: read(contents), lambda: _skipped(path, image_size))
        return (img, *label, ok)

    read_paths = [os.fsencode(p) for p in read_paths]  # file names need not be UTF-8
    elems = (read_paths,) if labels is None else (read_paths, labels)
    ds = tf.data.Dataset.from_tensor_slices(elems)
    h, w = image_size
    return _finish(ds, n, decode=decode, elem_bytes=h * w * 12, skip_errors=True, **tail)


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF")


def _looks_like_image(contents):
    head = tf.strings.substr(contents, 0, 4)
    return tf.reduce_any([tf.strings.substr(head, 0, len(m)) == m for m in _MAGIC])


def _skipped(path, image_size):
    def log(p):
        logger.warning("Skipping %s: it is no longer an image (changed since it was scanned).",
                       p.numpy().decode("utf-8", "surrogateescape"))
        return True

    with tf.control_dependencies([tf.py_function(log, [path], tf.bool)]):
        return tf.zeros((*image_size, 3), tf.float32)


def _attach(ds, class_names, records=None, labels=None, report=None):
    ds.class_names = class_names
    if records is not None:
        ds.file_paths = [r.path for r in records]
        ds.scan_report = report
    if labels is not None:
        ds.labels = labels
    return ds


def _class_folders(path, class_names, exts):
    """(class_names, [files per class], other files) with clear errors."""
    subdirs = sorted(d for d in os.listdir(path)
                     if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if class_names is not None:
        missing = [c for c in class_names if c not in subdirs]
        if missing:
            raise ValueError(f"class_names {missing} have no folder in {path!r}; "
                             f"subfolders are {subdirs}")
        subdirs = list(class_names)
    if not subdirs:
        has_files = any(f.lower().endswith(exts) for f in os.listdir(path))
        raise ValueError(f"No class subfolders in {path!r}" + (
            "; the images lie directly in it. Put each class in its own subfolder "
            "(or use labels=None)." if has_files else " and no files to read."))
    per_class, others, seen = [], [], {"dirs": set(), "files": set()}
    for d in subdirs:
        files, rest = _list_images(os.path.join(path, d), exts, seen)
        per_class.append(files)
        others += rest
    if not any(per_class):
        raise ValueError(f"No files with extensions {exts} in the class folders of {path!r}.")
    return subdirs, per_class, others


def _check_classes(path, class_names, counts, bad_by_class=None, kind="image"):
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    if empty:
        detail = ""
        for c in empty:
            bad = (bad_by_class or {}).get(c, [])
            detail += f"\n  {os.path.join(path, c)}: " + (
                f"all {len(bad)} files undecodable, e.g. {bad[0][0]}: {bad[0][1]}" if bad
                else f"no {kind} files")
        raise ValueError(f"Empty class folder(s) {empty} in {path!r}:{detail}\n"
                         "Remove them, add images, or pass class_names=[...] listing the "
                         "classes to use.")
    if len(class_names) < 2:
        raise ValueError(f"Only one class ({class_names[0]!r}) in {path!r}; a classifier needs "
                         "at least two class subfolders. For unlabeled images use labels=None.")


def from_directory(path, image_size, *, validation_split=None, subset=None, seed=None,
                   batch_size=32, labels="inferred", label_mode="int", class_names=None,
                   shuffle=True, crop_to_aspect_ratio=False, interpolation="bilinear",
                   augmentation=None, cache=False, strict=False, report_path=None,
                   num_workers=None):
    """Image classification dataset from class subfolders, robust to bad files.

    Like ``keras.utils.image_dataset_from_directory`` (same arguments and
    ``class_names`` / ``file_paths`` attributes), but every file is checked
    first by :func:`scan_images`: undecodable files are skipped and reported,
    convertible ones converted, so an epoch cannot crash.

    Args:
        path: folder with one subfolder per class (nested folders inside a
            class folder belong to that class).
        image_size: ``(height, width)`` (or an int) to resize to.
        validation_split, subset, seed: float fraction held out; subset
            ``"training"``, ``"validation"`` or ``"both"`` (returns a tuple).
            The split is stratified per class and fixed by ``seed`` (default
            1337, so separate calls never overlap).
        batch_size: batch size, or None for unbatched elements.
        labels: ``"inferred"`` (from folders) or None (images only).
        label_mode: ``"int"``, ``"categorical"``, ``"binary"`` or None.
        class_names: classes to use and their order (a subset of the
            subfolders; default all, alphabetical).
        shuffle: reshuffle every epoch (seeded by ``seed``).
        crop_to_aspect_ratio, interpolation: as in Keras.
        augmentation: preset name, keras layer(s), or None; applied to the
            training data only (never to ``subset="validation"``).
        cache: False, True (memory) or a file path for ``Dataset.cache``.
            Without it, images are streamed from disk (bounded memory).
        strict, report_path, num_workers: see :func:`scan_images`.

    Returns:
        A ``tf.data.Dataset`` of ``(float32 (B, H, W, 3) in [0, 255], labels)``
        with ``class_names``, ``file_paths``, ``labels`` (int class per file)
        and ``scan_report``; or a (training, validation) tuple.

    Example:

    >>> import os, tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> for name in ["cat", "dog"]:
    ...     os.makedirs(os.path.join(folder, name))
    ...     for i in range(3):
    ...         Image.new("RGB", (20, 10), name == "cat" and "red" or "blue").save(
    ...             os.path.join(folder, name, f"{i}.png"))
    >>> ds = from_directory(folder, (16, 16), batch_size=4, seed=0)
    >>> images, labels = next(iter(ds))
    >>> images.shape
    TensorShape([4, 16, 16, 3])
    """
    path = _check_dir(path)
    image_size = _image_size(image_size)
    if image_size is None:
        raise ValueError("image_size is required, e.g. (224, 224).")
    if labels not in ("inferred", None):
        raise ValueError("labels must be 'inferred' or None; for explicit labels per file "
                         "use tlkeras.data.from_csv.")
    if labels is None or label_mode is None:
        files, ignored = _list_images(path)
        if not files:
            raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {path!r}.")
        report = _scan_files(files, path, ignored=ignored, strict=strict,
                             report_path=report_path, num_workers=num_workers)
        if not report.images:
            raise ValueError(f"No decodable images under {path!r}:\n{report}")
        names, records, y = class_names, report.images, None
        groups = [0] * len(records)
    else:
        names, per_class, ignored = _class_folders(path, class_names, IMAGE_EXTENSIONS)
        all_files = [f for fs in per_class for f in fs]
        report = _scan_files(all_files, path, ignored=ignored, strict=strict,
                             report_path=report_path, num_workers=num_workers)
        by_path = {r.path: r for r in report.images}
        bad = dict(report.bad)
        records, y, bad_by_class = [], [], {}
        for i, fs in enumerate(per_class):
            ok = [by_path[os.path.abspath(f)] for f in fs if os.path.abspath(f) in by_path]
            bad_by_class[names[i]] = [(f, bad[os.path.abspath(f)]) for f in fs
                                      if os.path.abspath(f) in bad]
            records += ok
            y += [i] * len(ok)
        _check_classes(path, names, np.bincount(y, minlength=len(names)), bad_by_class)
        y = np.asarray(y, np.int32)
        groups = y
    aug = _resolve_augmentation(augmentation, seed)
    out = []
    for which, idx in zip(["training", "validation"] if subset != "validation"
                          else ["validation"], _split(groups, validation_split, subset, seed)):
        sub = [records[i] for i in idx]
        sub_y = None if y is None else y[idx]
        ds = _files_dataset(
            sub, None if sub_y is None else _encode_labels(sub_y, label_mode, len(names)),
            image_size, interpolation=interpolation, crop_to_aspect_ratio=crop_to_aspect_ratio,
            batch_size=batch_size, shuffle=shuffle, seed=seed, cache=cache,
            augmentation=aug if which == "training" else None)
        out.append(_attach(ds, names, sub, sub_y, report))
    return tuple(out) if subset == "both" else out[0]


def from_files(paths, image_size, *, batch_size=32, interpolation="bilinear",
               crop_to_aspect_ratio=False, strict=False, num_workers=None):
    """Unlabelled, unshuffled images of files and folders (searched recursively), for prediction.

    Every file is checked by :func:`scan_images` first: undecodable ones are
    skipped (listed in ``scan_report.bad``), convertible ones converted.

    Args:
        paths: image files and/or folders (one path or a list).
        image_size: ``(height, width)`` (or an int) to resize to.
        batch_size, interpolation, crop_to_aspect_ratio: as in :func:`from_directory`.
        strict, num_workers: see :func:`scan_images`.

    Returns:
        A ``tf.data.Dataset`` of float32 ``(B, H, W, 3)`` pixels in [0, 255], in
        the order of ``paths`` (a folder's files sorted), with ``file_paths``
        (the usable files, in that order) and ``scan_report``.

    Example:

    >>> import os, tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> Image.new("RGB", (20, 10), "red").save(os.path.join(folder, "a.png"))
    >>> ds = from_files([folder], (8, 8))
    >>> next(iter(ds)).shape
    TensorShape([1, 8, 8, 3])
    """
    image_size = _image_size(image_size)
    files = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            files += _list_images(path)[0]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or folder: {path!r}.")
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {paths!r}.")
    files = [os.path.abspath(f) for f in files]
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    report = _scan_files(files, root, strict=strict, num_workers=num_workers)
    by_path = {r.path: r for r in report.images}
    records = [by_path[f] for f in files if f in by_path]
    if not records:
        raise ValueError(f"No decodable images in {paths!r}:\n{report}")
    ds = _files_dataset(records, None, image_size, interpolation=interpolation,
                        crop_to_aspect_ratio=crop_to_aspect_ratio, batch_size=batch_size,
                        shuffle=False, seed=None, cache=False, augmentation=None)
    return _attach(ds, None, records, None, report)


def from_csv(path, image_column, label_column, *, image_size, label_sep=None,
             label_mode=None, class_names=None, validation_split=None, subset=None, seed=None,
             batch_size=32, shuffle=True, crop_to_aspect_ratio=False,
             interpolation="bilinear", augmentation=None, cache=False, strict=False,
             report_path=None, num_workers=None):
    """Image dataset from a CSV of image paths and labels.

    Paths are relative to the CSV's folder (absolute paths work too). Labels
    are class names; with ``label_sep`` (e.g. ``"|"``) a cell holds several
    and labels become multi-hot float32 vectors (multilabel).

    Args:
        path: the CSV file (with a header row).
        image_column, label_column: column names.
        image_size: ``(height, width)``.
        label_sep: separator of multiple labels per cell, or None.
        label_mode: ``"int"`` (default single-label), ``"categorical"``,
            ``"binary"``, ``"multi_hot"`` (default with ``label_sep``) or
            ``"float"`` (numbers, for regression).
        class_names: the classes and their order; a label not in it is an
            error. Default: sorted unique labels.
        Other arguments as in :func:`from_directory`.

    Example:

    >>> import os, tempfile
    >>> from PIL import Image
    >>> folder = tempfile.mkdtemp()
    >>> rows = [("a.png", "beach|sunset"), ("b.png", "people"), ("c.png", "beach|people")]
    >>> for file, _ in rows:
    ...     Image.new("RGB", (20, 10), "orange").save(os.path.join(folder, file))
    >>> with open(os.path.join(folder, "labels.csv"), "w") as f:
    ...     _ = f.write("file,tags\\n" + "".join(f"{a},{b}\\n" for a, b in rows))
    >>> ds = from_csv(os.path.join(folder, "labels.csv"), "file", "tags", image_size=16,
    ...               label_sep="|", shuffle=False)
    >>> ds.class_names
    ['beach', 'people', 'sunset']
    >>> next(iter(ds))[1].numpy().tolist()
    [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file does not exist: {path!r}")
    rows = _read_csv_rows(path, image_column, label_column)
    base = os.path.dirname(os.path.abspath(path))
    rows = _unique_rows(path, rows, base, label_sep, label_mode)
    files = [os.path.normpath(os.path.join(base, p)) for p, _, _ in rows]
    missing = [(i + 2, p) for i, p in enumerate(files) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed in {path!r} do not exist, e.g.\n" + "\n".join(
                f"  line {line}: {p}" for line, p in missing[:10]))
    label_mode = label_mode or ("multi_hot" if label_sep else "int")
    if label_mode == "float":
        try:
            y = np.asarray([float(v) for _, v, _ in rows], np.float32)
        except ValueError as e:
            raise ValueError(f"label_mode='float' but column {label_column!r} in {path!r} "
                             f"has a non-number: {e}") from None
        names, groups = class_names, [0] * len(rows)
    else:
        cells = [[s.strip() for s in v.split(label_sep) if s.strip()] if label_sep
                 else [v.strip()] for _, v, _ in rows]
        empty = [i for i, cell in enumerate(cells) if cell == [""]]
        if empty:
            raise ValueError(f"Line {rows[empty[0]][2]} of {path!r} has an empty {label_column!r} "
                             f"cell ({len(empty)} such rows); every image needs a label. Fill it "
                             "in or remove the row.")
        found = sorted({c for cell in cells for c in cell},
                       key=lambda c: (0, int(c), "") if c.lstrip("-").isdigit() else (1, 0, c))
        names = list(class_names) if class_names is not None else found
        index = {c: i for i, c in enumerate(names)}
        for (_, _, line), cell in zip(rows, cells):
            for c in cell:
                if c not in index:
                    raise ValueError(f"Label {c!r} on line {line} of {path!r} is not in "
                                     f"class_names {names}")
        if label_mode == "multi_hot":
            y = np.zeros((len(rows), len(names)), np.float32)
            for i, cell in enumerate(cells):
                y[i, [index[c] for c in cell]] = 1.0
            groups = [0] * len(rows)
        else:
            if any(len(cell) != 1 for cell in cells):
                raise ValueError(f"Some rows of {path!r} have no label or several; pass "
                                 "label_sep for multilabel data.")
            ints = np.asarray([index[cell[0]] for cell in cells], np.int32)
            y, groups = _encode_labels(ints, label_mode, len(names)), ints
    report = _scan_files(files, base, strict=strict, report_path=report_path,
                         num_workers=num_workers)
    by_path = {r.path: r for r in report.images}
    keep = [i for i, p in enumerate(files) if p in by_path]
    if not keep:
        raise ValueError(f"No decodable images listed in {path!r}:\n{report}")
    records = [by_path[files[i]] for i in keep]
    y, groups = y[keep], np.asarray(groups)[keep]
    aug = _resolve_augmentation(augmentation, seed)
    image_size = _image_size(image_size)
    out = []
    for k, idx in enumerate(_split(groups, validation_split, subset, seed)):
        training = subset != "validation" and k == 0
        ds = _files_dataset([records[i] for i in idx], y[idx], image_size,
                            interpolation=interpolation,
                            crop_to_aspect_ratio=crop_to_aspect_ratio, batch_size=batch_size,
                            shuffle=shuffle, seed=seed, cache=cache,
                            augmentation=aug if training else None)
        out.append(_attach(ds, names, [records[i] for i in idx], y[idx], report))
    return tuple(out) if subset == "both" else out[0]


def _read_csv_rows(path, image_column, label_column):
    """[(image, label, line)] from a UTF-8 CSV (a byte-order mark is fine)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for col in (image_column, label_column):
                if col not in columns:
                    raise ValueError(f"Column {col!r} not in {path!r}; columns are {columns}")
            rows = [(r[image_column] or "", r[label_column] or "", reader.line_num)
                    for r in reader]
    except UnicodeDecodeError as error:
        with open(path, "rb") as f:
            line = f.read()[:error.start].count(b"\n") + 1
        byte = error.object[error.start]
        raise ValueError(f"Line {line} of {path!r} is not UTF-8 (byte {byte:#x}); save the CSV "
                         "as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from None
    if not rows:
        raise ValueError(f"CSV {path!r} has no rows.")
    return rows


def _unique_rows(path, rows, base, label_sep, label_mode):
    """One row per image file: repeated rows dropped (logged); conflicting labels refused
    (merged for multilabel), so no image can land in both training and validation."""
    by_file, order = {}, []
    for image, label, line in rows:
        key = os.path.realpath(os.path.join(base, image))
        if key not in by_file:
            by_file[key] = [image, label, line]
            order.append(key)
        elif by_file[key][1].strip() != label.strip():
            if not label_sep or label_mode not in (None, "multi_hot"):
                raise ValueError(
                    f"{image!r} is listed with two labels in {path!r}: {by_file[key][1]!r} on "
                    f"line {by_file[key][2]} and {label!r} on line {line}. Keep one row per image "
                    "(or pass label_sep for multilabel data).")
            by_file[key][1] += label_sep + label
    if len(order) < len(rows):
        logger.warning("%s lists %d image(s) more than once; each image is used once.", path,
                       len(rows) - len(order))
    return [tuple(by_file[k]) for k in order]


def from_arrays(x, y=None, *, image_size=None, batch_size=32, shuffle=True, seed=None,
                class_names=None, num_classes=None, validation_split=None, subset=None,
                augmentation=None, cache=False, interpolation="bilinear",
                crop_to_aspect_ratio=False):
    """Image dataset from in-memory arrays.

    ``x`` is (N, H, W), (N, H, W, 1), (N, H, W, 3) or (N, H, W, 4) pixels in
    [0, 255]; grayscale becomes RGB, alpha is dropped. ``y`` (optional) is
    passed through (int classes are checked against ``num_classes`` /
    ``class_names``). With ``image_size`` images are resized.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.integers(0, 256, (40, 28, 28), dtype="uint8")  # grayscale, like MNIST
    >>> y = rng.integers(0, 10, 40)
    >>> ds = from_arrays(x, y, image_size=(32, 32), num_classes=10)
    >>> next(iter(ds))[0].shape
    TensorShape([32, 32, 32, 3])
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"x must have shape (N, H, W) or (N, H, W, 1|3|4); got {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and x.size and float(x.max()) <= 1.0:
        logger.warning("x is float with max <= 1; tlkeras models expect pixels in [0, 255].")
    n = len(x)
    if y is not None:
        y = np.asarray(y)
        if len(y) != n:
            raise ValueError(f"x has {n} samples but y has {len(y)}")
        num_classes = num_classes or (len(class_names) if class_names is not None else None)
        if num_classes is not None and np.issubdtype(y.dtype, np.integer) and y.ndim == 1:
            bad = np.flatnonzero((y < 0) | (y >= num_classes))
            if len(bad):
                raise ValueError(f"Label {y[bad[0]]} at index {bad[0]} is outside "
                                 f"[0, num_classes={num_classes}) ({len(bad)} such labels).")
        if np.issubdtype(y.dtype, np.integer):
            y = y.astype(np.int32)
        elif np.issubdtype(y.dtype, np.floating):
            y = y.astype(np.float32)
    image_size = _image_size(image_size)
    h, w = image_size or x.shape[1:3]
    groups = y if (y is not None and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)) \
        else [0] * n
    aug = _resolve_augmentation(augmentation, seed)
    xs = tf.constant(x)
    ys = None if y is None else tf.constant(y)
    out = []
    for k, idx in enumerate(_split(groups, validation_split, subset, seed)):
        def decode(i):
            img = _resize(_to_rgb_tensor(tf.gather(xs, i)), image_size, interpolation,
                          crop_to_aspect_ratio)
            return img if ys is None else (img, tf.gather(ys, i))
        training = subset != "validation" and k == 0
        ds = _finish(tf.data.Dataset.from_tensor_slices(idx.astype(np.int64)), len(idx),
                     decode=decode, elem_bytes=h * w * 12, batch_size=batch_size,
                     shuffle=shuffle, seed=seed, cache=cache,
                     augmentation=aug if training else None)
        out.append(_attach(ds, class_names, labels=None if y is None else y[idx]))
    return tuple(out) if subset == "both" else out[0]


def from_tfds(name, split, image_size=None, *, data_dir=None, download=True, batch_size=32,
              shuffle=True, seed=None, augmentation=None, cache=False,
              interpolation="bilinear", crop_to_aspect_ratio=False):
    """A TFDS image- or text-classification dataset by name.

    Image datasets yield ``(float32 RGB (B, H, W, 3) in [0, 255], int label)``
    (grayscale becomes RGB; ``image_size`` resizes and is needed when image
    sizes vary); text datasets yield ``(raw string, label)``. ``split`` is a
    TFDS split string such as ``"train[:80%]"``.

    Offline: prepare the data on a machine with internet (``tfds build NAME
    --data_dir DIR`` or ``tfds.builder(NAME, data_dir=DIR).download_and_prepare()``),
    copy ``DIR`` over and pass ``data_dir=DIR, download=False``.

    Example:

    >>> train = from_tfds("tf_flowers", "train[:80%]", (224, 224), seed=1)  # doctest: +SKIP
    >>> train.class_names[:2]  # doctest: +SKIP
    ['dandelion', 'daisy']
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.list_builders(), n=3, cutoff=0.6)
        raise ValueError(f"from_tfds: no TFDS dataset is named {name!r}"
                         + (f"; close matches: {', '.join(map(repr, close))}" if close else "")
                         + ". See tfds.list_builders() for all names.") from None
    offline_help = (f"prepare it where there is internet (`tfds build {name} --data_dir DIR`), "
                    f"copy DIR here and call from_tfds({name!r}, ..., data_dir=DIR, "
                    "download=False)")
    if download and not tf.io.gfile.exists(builder.data_dir):
        try:
            if not _is_mocked(builder):  # tfds.testing.mock_data downloads nothing
                _check_network()
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise RuntimeError(f"from_tfds: TFDS dataset {name!r} could not be downloaded "
                               f"into {builder.data_dir} ({_root_cause(e)}). To use it offline, {offline_help}.") from e
    features = builder.info.features
    keys = builder.info.supervised_keys
    if keys is None or not isinstance(keys[0], str):
        keys = (next((k for k, f in features.items()
                      if isinstance(f, (tfds.features.Image, tfds.features.Text))), None),
                next((k for k, f in features.items()
                      if isinstance(f, tfds.features.ClassLabel)), None))
    x_key, y_key = keys[0], keys[1]
    if x_key is None or y_key is None:
        raise ValueError(f"TFDS dataset {name!r} has no image/text input and class label "
                         f"features: {features}")
    try:
        raw = builder.as_dataset(split=split, shuffle_files=shuffle,
                                 read_config=tfds.ReadConfig(shuffle_seed=seed))
    except AssertionError as e:  # tfds: "Dataset ... not found / not prepared"
        raise RuntimeError(f"from_tfds: TFDS dataset {name!r} is not prepared in "
                           f"{builder.data_dir} (download=False). To use it offline, "
                           f"{offline_help}.") from e
    is_image = isinstance(features[x_key], tfds.features.Image)
    image_size = _image_size(image_size)
    if is_image and image_size is None:
        shape = features[x_key].shape
        if None in shape[:2]:
            raise ValueError(f"Images of {name!r} vary in size; pass image_size=(H, W).")
        image_size_out = tuple(shape[:2])
    else:
        image_size_out = image_size or (1, 1)

    def decode(ex):
        x = ex[x_key]
        if is_image:
            x = _resize(_to_rgb_tensor(x), image_size, interpolation, crop_to_aspect_ratio)
        return x, ex[y_key]

    h, w = image_size_out
    ds = _finish(raw, 10_000, decode=decode, elem_bytes=h * w * 12 if is_image else 1024,
                 cheap=False,
                 batch_size=batch_size, shuffle=shuffle, seed=seed, cache=cache,
                 augmentation=_resolve_augmentation(augmentation, seed) if is_image else None)
    label_feature = features[y_key]
    names = list(label_feature.names) if isinstance(label_feature, tfds.features.ClassLabel) \
        else None
    return _attach(ds, names)


_TFDS_HOST = "storage.googleapis.com"  # where TFDS keeps most of its data


def _is_mocked(builder):
    """Whether `tfds.testing.mock_data` replaced the builder's download (it serves random data)."""
    prepare = getattr(type(builder), "download_and_prepare", None)
    return "testing" in getattr(prepare, "__module__", "")


def _check_network():
    """Fails at once when the host TFDS downloads from cannot be resolved (TFDS itself would
    retry each file for minutes before giving up); behind a proxy, leaves it to TFDS."""
    if any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return
    try:
        socket.getaddrinfo(_TFDS_HOST, 443)
    except OSError as e:
        raise ConnectionError(f"no network: cannot resolve {_TFDS_HOST} ({e})") from None


def _root_cause(error):
    """The first line of the innermost cause of `error`, in at most 160 characters."""
    while error.__cause__ or (error.__context__ and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    line = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def from_text_directory(path, *, batch_size=32, validation_split=None, subset=None, seed=None,
                        shuffle=True, label_mode="int", class_names=None, max_length=None):
    """Text classification dataset of raw strings from class subfolders of ``.txt`` files.

    Wraps ``keras.utils.text_dataset_from_directory`` (same arguments) with
    clear errors for a missing path, empty class folders and a single class.
    Yields ``(string, label)`` batches for text backbones.

    Example:

    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> for label, text in [("neg", "dull and slow"), ("pos", "a delight")]:
    ...     os.makedirs(os.path.join(folder, label))
    ...     with open(os.path.join(folder, label, "1.txt"), "w") as f:
    ...         _ = f.write(text)
    >>> ds = from_text_directory(folder, batch_size=8)
    >>> texts, labels = next(iter(ds))
    >>> texts.dtype
    tf.string
    """
    path = _check_dir(path)
    names, per_class, _ = _class_folders(path, class_names, (".txt",))
    _check_classes(path, names, [len(fs) for fs in per_class], kind="text (.txt)")
    if validation_split is not None and subset is None:
        raise ValueError("subset='training', 'validation' or 'both' is needed with "
                         "validation_split.")
    return keras.utils.text_dataset_from_directory(
        path, batch_size=batch_size, validation_split=validation_split, subset=subset,
        seed=1337 if seed is None and validation_split else seed, shuffle=shuffle,
        label_mode=label_mode, class_names=names, max_length=max_length, verbose=False)


# ------------------------------------------------------------ class weights


def class_weights(dataset_or_labels, method="balanced"):
    """Class weights for ``model.fit(class_weight=...)``.

    ``"balanced"`` gives class ``c`` the weight ``n_samples / (n_classes *
    count_c)`` (scikit-learn's convention), so every class contributes equally
    to the loss. Accepts int labels, one-hot labels, or a dataset (its
    ``labels`` attribute when it has one, else its labels are iterated).

    Example:

    >>> class_weights([0, 0, 0, 1])
    {0: 0.6666666666666666, 1: 2.0}
    """
    if method != "balanced":
        raise ValueError(f"Only method='balanced' is supported; got {method!r}")
    if isinstance(dataset_or_labels, tf.data.Dataset):
        y = getattr(dataset_or_labels, "labels", None)
        if y is None:
            y = np.concatenate([np.asarray(b[1]) for b in dataset_or_labels])
    else:
        y = dataset_or_labels
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        counts = y.sum(axis=0)
    else:
        y = y.reshape(-1).astype(int)
        counts = np.bincount(y)
    n_classes = len(counts)
    total = counts.sum()
    if (counts == 0).any():
        logger.warning("Classes %s have no samples; their weight is set to 0.",
                       np.flatnonzero(counts == 0).tolist())
    return {i: (float(total / (n_classes * c)) if c else 0.0) for i, c in enumerate(counts)}
