"""A self-contained `report.html` for an evaluation: one page to look at, no network needed.

Images are inlined as base64 PNG thumbnails, so the page works from a file://
URL and stays small with thousands of evaluated images: it holds only the
most confident mistakes and a few correct examples per class.
"""

import base64
import heapq
import html
import io
import os

import numpy as np

from tlkeras.explain import explain, html_tokens
from tlkeras.plots import figure_to_png, plot_confusion_matrix, plot_training_curves

__all__ = ["Examples", "write_report", "index_page"]

THUMBNAIL = 128  # longest side of an inlined image, in pixels

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;padding:6px;
font-size:12px;width:270px}.card img{width:128px;height:128px;object-fit:contain;
image-rendering:pixelated;background:#eee}.bad{color:#b00}.note{color:#777}
.text{line-height:1.5;margin:0 0 4px}
"""

# Marks images that fail to load and records the outcome on <body> (read by tests and users).
_SCRIPT = """
window.addEventListener('error', e => { document.body.dataset.error = String(e.message); });
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0);
  broken.forEach(i => { i.alt = 'missing image'; i.style.outline = '2px solid red'; });
  document.body.dataset.images = (images.length - broken.length) + '/' + images.length;
});
"""


class Examples:
    """Keeps, while predictions stream by, the images a report shows.

    The `num_mistakes` most confident mistakes (ties: earliest first, as
    `evaluate` ranks them) and the `per_class` most confident correct
    predictions of each class, at their original resolution.
    """

    def __init__(self, task, num_mistakes=10, per_class=3):
        self.task, self.num_mistakes, self.per_class = task, num_mistakes, per_class
        self.mistakes, self.correct, self.seen = [], {}, 0

    def add(self, images, labels, probabilities):
        if self.task not in ("multiclass", "binary"):
            return
        labels, probabilities = class_ids(self.task, labels, probabilities)
        predicted = probabilities.argmax(axis=1)
        for i, (label, guess) in enumerate(zip(labels, predicted)):
            index, confidence = self.seen + i, float(probabilities[i, guess])
            item = (confidence, -index, np.asarray(images[i]), probabilities[i])
            if label != guess:
                _push(self.mistakes, item, self.num_mistakes)
            else:
                _push(self.correct.setdefault(int(label), []), item, self.per_class)
        self.seen += len(labels)

    def image(self, index):
        """The kept image of sample `index`, or None."""
        for items in [self.mistakes, *self.correct.values()]:
            for _, minus_index, image, _ in items:
                if -minus_index == index:
                    return image
        return None


def class_ids(task, labels, probabilities):
    """`(labels, probabilities)` as class ids and `(N, classes)` (binary: 2 columns)."""
    n = len(labels)
    probabilities = np.asarray(probabilities, dtype="float32").reshape(n, -1)
    labels = np.asarray(labels)
    if task == "binary":
        probabilities = np.concatenate([1.0 - probabilities, probabilities], axis=1)
        labels = labels.reshape(n)
    elif labels.ndim > 1:
        labels = labels.reshape(n, -1).argmax(axis=1)
    return np.rint(labels).astype(int), probabilities


def write_report(report, output_dir, model=None, examples=None, history=None, top_k=3):
    """Writes `<output_dir>/report.html` for an `EvaluationReport`; returns its path."""
    names = report.class_names or []
    parts = [f"<h1>Evaluation report</h1><p>{report.num_samples} samples, task "
             f"<b>{report.task}</b>.</p>", "<h2>Metrics</h2>", _metrics_table(report.metrics)]
    if report.per_class:
        parts += ["<h2>Per class</h2>", _per_class_table(report.per_class)]
    if report.confusion_matrix is not None:
        cm = np.asarray(report.confusion_matrix)
        parts += ["<h2>Confusion matrix</h2>", _confusion_table(cm, names),
                  _img(figure_to_png(plot_confusion_matrix(cm, names)), "confusion matrix",
                       width=None)]
    if history is None and os.path.isfile(os.path.join(output_dir, "history.csv")):
        history = os.path.join(output_dir, "history.csv")
    if history is not None:
        parts += ["<h2>Training curves</h2>",
                  _img(figure_to_png(plot_training_curves(history)), "training curves", None)]
    if examples is not None and examples.seen:
        parts += _example_sections(report, model, examples, names, top_k)
    page = _page("Evaluation report", "".join(parts))
    path = os.path.join(output_dir, "report.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def index_page(path, title, cards):
    """Writes an HTML page of `(png_bytes_list, caption)` cards; returns `path`."""
    body = "".join(
        "<div class='card'>" + "".join(_img(p, caption) for p in pngs)
        + f"<br>{html.escape(caption)}</div>" for pngs, caption in cards
    )
    with open(path, "w") as f:
        f.write(_page(title, f"<h1>{html.escape(title)}</h1><div class='cards'>{body}</div>"))
    return path


def thumbnail_png(image, size=THUMBNAIL):
    """PNG bytes of an image (uint8 or float in [0, 255]) scaled to at most `size` pixels."""
    from PIL import Image

    array = np.clip(np.asarray(image, dtype="float32"), 0, 255).astype("uint8")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    picture = Image.fromarray(array)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _example_sections(report, model, examples, names, top_k):
    mistakes = sorted(examples.mistakes, reverse=True)
    correct = [(c, sorted(items, reverse=True)) for c, items in sorted(examples.correct.items())]
    chosen = mistakes + [item for _, items in correct for item in items]
    overlays, note = (_token_scores if _is_text(chosen) else _gradcam_overlays)(model, chosen)
    by_index = dict(zip([-item[1] for item in chosen], overlays))
    parts = ["<h2>Most confident mistakes</h2>", note]
    parts.append(_cards(mistakes, by_index, names, top_k, examples, report) or
                 "<p>No mistakes.</p>")
    parts.append("<h2>Correct examples per class</h2>")
    for c, items in correct:
        parts += [f"<h3>{html.escape(_name(names, c))}</h3>",
                  _cards(items, by_index, names, top_k, examples, report)]
    return parts


def _gradcam_overlays(model, items):
    if model is None or not items:
        return [None] * len(items), ""
    images = np.stack([item[2] for item in items])
    classes = [int(np.argmax(item[3])) for item in items]
    if images.ndim != 4:
        return [None] * len(items), ""
    try:
        maps = explain(model, images, class_index=classes)
    except Exception as error:  # e.g. a base Keras cannot see into
        message = f"No Grad-CAM overlays: {type(error).__name__}: {error}"
        return [None] * len(items), f"<p class='note'>{html.escape(message)}</p>"
    note = (f"<p class='note'>Grad-CAM (layer <code>{html.escape(maps.layer_name)}</code>) "
            "of the predicted class beside each image.</p>")
    return list(maps.overlay()), note


def _is_text(items):
    return bool(items) and np.asarray(items[0][2]).dtype.kind in "SUO"


def _token_scores(model, items):
    """Per text item its `(word, score)` pairs for the predicted class (or None), and a note."""
    if model is None or not items:
        return [None] * len(items), ""
    texts = [_as_text(item[2]) for item in items]
    classes = [int(np.argmax(item[3])) for item in items]
    try:  # the shown texts only; 16 path steps are plenty for shading
        result = explain(model, texts, class_index=classes, steps=16)
    except Exception as error:  # e.g. a model whose tokens cannot be reached
        message = f"No token scores: {type(error).__name__}: {error}"
        return [None] * len(items), f"<p class='note'>{html.escape(message)}</p>"
    method = result.method.replace("_", " ")
    note = (f"<p class='note'>Words shaded by their {method} score for the predicted class "
            "(red: for it, blue: against it; hover for the value).</p>")
    return result.tokens, note


def _as_text(item):
    text = np.asarray(item).reshape(-1)[0]
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _text_html(text, pairs, words=120):
    """The text with its words shaded by score (the first `words` words), else a quote."""
    if pairs is None:
        return f"<blockquote>{html.escape(text[:400])}</blockquote>"
    more = " &hellip;" if len(pairs) > words else ""
    return f"<p class='text'>{html_tokens(pairs[:words])}{more}</p>"


def _cards(items, overlays, names, top_k, examples, report):
    cards = []
    for confidence, minus_index, image, probabilities in items:
        index = -minus_index
        top = np.argsort(-probabilities, kind="stable")[:top_k]
        scores = "<br>".join(f"{html.escape(_name(names, c))}: {probabilities[c]:.3f}"
                             for c in top)
        true = _true_label(report, index)
        if np.asarray(image).dtype.kind in "SUO":  # a text model's input: the text itself
            images = _text_html(_as_text(image), overlays.get(index))
        else:
            images = _img(thumbnail_png(image), f"sample {index}")
        if overlays.get(index) is not None and not isinstance(overlays[index], list):
            images += _img(thumbnail_png(overlays[index]), f"Grad-CAM of sample {index}")
        label = f"true <b>{html.escape(true)}</b>, " if true is not None else ""
        cards.append(f"<div class='card'>{images}<br>#{index} {label}predicted "
                     f"<b>{html.escape(_name(names, int(top[0])))}</b><br>{scores}</div>")
    return f"<div class='cards'>{''.join(cards)}</div>" if cards else ""


def _true_label(report, index):
    for mistake in report.mistakes or []:
        if mistake["index"] == index:
            return mistake["true"]
    return None


def _metrics_table(metrics):
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td data-metric='{html.escape(k)}'>"
                   f"{v:.4f}</td></tr>" for k, v in metrics.items())
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def _per_class_table(per_class):
    rows = "".join(
        f"<tr data-class='{html.escape(name)}'><td>{html.escape(name)}</td>"
        f"<td>{v['precision']:.4f}</td><td>{v['recall']:.4f}</td><td>{v['f1']:.4f}</td>"
        f"<td>{v['support']}</td></tr>" for name, v in per_class.items()
    )
    return ("<table id='per-class'><tr><th>class</th><th>precision</th><th>recall</th>"
            f"<th>f1</th><th>support</th></tr>{rows}</table>")


def _confusion_table(cm, names):
    head = "".join(f"<th>{html.escape(_name(names, j))}</th>" for j in range(len(cm)))
    rows = "".join(
        f"<tr><th>{html.escape(_name(names, i))}</th>"
        + "".join(f"<td>{int(v)}</td>" for v in row) + "</tr>" for i, row in enumerate(cm)
    )
    return (f"<table id='confusion'><tr><th>true \\ predicted</th>{head}</tr>{rows}</table>")


def _img(png, alt, width=THUMBNAIL):
    data = base64.b64encode(png).decode("ascii")
    size = f" width='{width}'" if width else " style='max-width:100%'"
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'{size}>"


def _page(title, body):
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head>"
            f"<body>{body}</body></html>")


def _name(names, index):
    return names[index] if index < len(names) else str(index)


def _push(heap, item, limit):
    if limit <= 0:
        return
    key = item[:2]
    if len(heap) < limit:
        heapq.heappush(heap, _Item(key, item))
    elif key > heap[0].key:
        heapq.heapreplace(heap, _Item(key, item))


class _Item(tuple):
    """A heap entry ordered by `key` only (images do not compare)."""

    def __new__(cls, key, item):
        entry = super().__new__(cls, item)
        entry.key = key
        return entry

    def __lt__(self, other):
        return self.key < other.key

    def __gt__(self, other):
        return self.key > other.key
