"""The `tlkeras` command line.

    tlkeras train --image_dir flowers/ --base EfficientNetB0 --run_dir runs/flowers \\
        --saved_model_dir export/saved_model --tflite_output_file export/model.tflite \\
        --labels_output_file export/labels.txt
    tlkeras predict --model runs/flowers new_photos/ --top_k 3 --output predictions.csv
    tlkeras evaluate --model runs/flowers --image_dir test/
    tlkeras export --model runs/flowers --output_dir export/ --quantize dynamic
    tlkeras tune --image_dir flowers/ --base MobileNetV2 --max_trials 8
    tlkeras scan flowers/
    tlkeras backbones
    tlkeras weights ResNet50 [--verify resnet50_notop.h5]
    tlkeras demo [--quick]

Every subcommand has `--help`. Every setting of `train` and `tune` can also
come from `--config file.yaml|json` (keys are the flag names without `--`;
flags on the command line win), and `train` writes the resolved settings to
`<run_dir>/cli_config.json`, so `tlkeras train --config
runs/a/cli_config.json --run_dir runs/b` repeats run a.

A mistake in the command (a bad value, a missing file, an unknown backbone,
weights that cannot be downloaded) ends with one line on stderr starting with
`tlkeras <command>: error:` and a non-zero exit status (2 for a wrong
command line, 1 otherwise); `--debug` shows the Python traceback instead.
"""

import argparse
import contextlib
import datetime
import difflib
import json
import os
import shutil
import sys
import tempfile
import warnings

DATA_SOURCES = ("image_dir", "tfds", "csv")


class UsageError(Exception):
    """A wrong command line: reported as one line, exit status 2."""


class Failure(Exception):
    """The command ran but failed (e.g. accuracy below the bar): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def main(argv=None):
    """Runs the command line; returns the exit status (the console script exits with it)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"tlkeras {command}" if command in _COMMANDS else "tlkeras"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # Keras notes that tf.data inputs are not reshuffled by fit: they shuffle themselves.
            warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
            args = parse_args(argv)
            return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, Failure) as error:
        if debug:
            raise
        _print_error(prog, error)
        return 2 if isinstance(error, UsageError) else 1
    except Exception as error:  # noqa: BLE001 - every error becomes one readable line
        if debug:
            raise
        _print_error(prog, error, hint=True)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _print_error(prog, error, hint=False):
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if not isinstance(error, (UsageError, Failure, ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    if hint:
        message += " (--debug shows the traceback)"
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ parsing


def parse_args(argv):
    """Parses `argv`, merging a `--config` file under the flags given on the command line."""
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = subparsers[args.command]
        rest = argv[argv.index(args.command) + 1:]
        file_argv = config_to_argv(load_config(args.config), sub, rest)
        args = parser.parse_args([args.command, *file_argv, *rest])
    if hasattr(args, "image_dir") and args.command in ("train", "tune", "evaluate"):
        given = [name for name in DATA_SOURCES if getattr(args, name)]
        if len(given) != 1:
            received = ", ".join("--" + g for g in given) or "none"
            raise UsageError(f"give exactly one data source of --image_dir, --tfds, --csv "
                             f"(received {received}) (see `tlkeras {args.command} --help`)")
    return args


def load_config(path):
    """The settings dict of a `.json`, `.yaml` or `.yml` file."""
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except Exception as error:
        raise UsageError(f"--config {path}: cannot parse it ({error})") from None
    if not isinstance(config, dict):
        raise UsageError(
            f"--config {path}: expected a mapping of settings, found {type(config).__name__}"
        )
    return config


def config_to_argv(config, parser, cli_argv=()):
    """Turns a settings dict into command-line tokens for `parser` (flags in `cli_argv` win)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "debug")}
    on_cli = {a.dest for a in actions.values() for token in cli_argv for opt in a.option_strings
              if token == opt or token.startswith(opt + "=")}
    if on_cli & set(DATA_SOURCES):  # a data source on the command line replaces the file's
        config = {k: v for k, v in config.items() if k not in DATA_SOURCES}
    tokens, positionals = [], []
    for key, value in config.items():
        dest = key.lstrip("-").replace("-", "_")
        if dest not in actions:
            raise UsageError(f"--config: unknown setting {key!r} for `{parser.prog}`; settings "
                             f"are its flag names without '--': {', '.join(sorted(actions))}")
        action = actions[dest]
        if value is None or dest in on_cli:
            continue
        if not action.option_strings:
            positionals += [str(v) for v in (value if isinstance(value, list) else [value])]
        elif isinstance(action, argparse.BooleanOptionalAction):
            tokens.append(action.option_strings[0] if value else action.option_strings[1])
        elif isinstance(value, list):
            tokens += [action.option_strings[0], ",".join(str(v) for v in value)]
        else:
            tokens += [action.option_strings[0], str(value)]
    return positionals + tokens


def _number(kind, low=None, high=None, low_open=False):
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, " f"received {text!r}"
            ) from None
        if (low is not None and (value < low or (low_open and value == low))) or (
                high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected a value {bounds}, received {text!r}")
        return value
    return convert


def _existing(kind):
    def check(path):
        ok = os.path.isdir(path) if kind == "folder" else (
            os.path.isfile(path) if kind == "file" else os.path.exists(path))
        if not ok:
            raise argparse.ArgumentTypeError(f"no such {kind}: {path!r}")
        return path
    return check


def _ints(text):
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, received {text!r}"
        ) from None


def _depth(text):
    if text == "all":
        return text
    return _number(int, 0)(text)


def build_parser():
    """The argparse parser; returns `(parser, {command: subparser})`."""
    parser = _Parser(prog="tlkeras", description="Transfer learning with Keras 3: train, tune, "
                     "evaluate, predict, export; `tlkeras demo` runs an offline example.")
    from tlkeras import __version__

    parser.add_argument("--version", action="version", version=f"tlkeras {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True,
                                     parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    configurable = argparse.ArgumentParser(add_help=False)
    configurable.add_argument("--config", type=_existing("file"), metavar="FILE",
                              help="read settings from a .yaml/.json file (flag names without "
                                   "'--'); flags given on the command line win")
    subparsers = {}

    def add(name, help, parents=(), **kwargs):
        sub = commands.add_parser(name, help=help, description=help, parents=[common, *parents],
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        subparsers[name] = sub
        sub.set_defaults(func=_COMMANDS[name])
        return sub

    train = add("train", "Train a transfer model: the head on a frozen base, then fine-tune; "
                "optionally export it.", [configurable])
    _add_data_args(train, validation=True)
    _add_model_args(train)
    g = train.add_argument_group("training")
    g.add_argument(
        "--head_epochs", type=_number(int, 0), default=5, help="epochs of phase 1 (the head)"
    )
    g.add_argument("--fine_tune_epochs", type=_number(int, 0), default=5,
                   help="epochs of phase 2 (the unfrozen base)")
    g.add_argument("--unfreeze", type=_depth, default="all",
                   help="phase 2 unfreezes this many blocks (or layers) of the base, or 'all'")
    g.add_argument("--unfreeze_unit", choices=("blocks", "layers"), default="blocks")
    g.add_argument("--learning_rate", type=_number(float, 0, low_open=True), default=1e-3,
                   help="phase 1 learning rate")
    g.add_argument("--fine_tune_learning_rate", type=_number(float, 0, low_open=True),
                   help="phase 2 peak learning rate (default: learning_rate / 20)")
    g.add_argument("--warmup_epochs", type=_number(float, 0), default=1)
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd", "rmsprop"), default="adam")
    g.add_argument("--momentum", type=_number(float, 0, 1),
                   help="momentum of --optimizer sgd (default 0.9) or rmsprop (default 0)")
    g.add_argument("--label_smoothing", type=_number(float, 0, 1), default=0.0)
    g.add_argument("--balance_classes", action=argparse.BooleanOptionalAction, default=False,
                   help="weight classes inversely to their frequency")
    g.add_argument("--early_stopping", type=_number(int, 1), metavar="PATIENCE",
                   help="stop a phase after this many epochs without improvement")
    g.add_argument("--precision", choices=("auto", "float32", "mixed_float16", "mixed_bfloat16"),
                   default="auto", help="auto: mixed_float16 on recent NVIDIA GPUs, else float32")
    g.add_argument("--strategy", choices=("auto", "mirrored", "multiworker"), default="auto",
                   help="multiworker: MultiWorkerMirroredStrategy from TF_CONFIG")
    g.add_argument(
        "--run_dir",
        "--log_dir",
        dest="run_dir",
        metavar="DIR",
        help="the run folder: config, history.csv, checkpoints, model.keras, TensorBoard "
        "logs (logs/); an interrupted run resumes there (default: runs/<base>-<time>)",
    )
    g = train.add_argument_group("output")
    g.add_argument("--saved_model_dir", metavar="DIR", help="export a TF Serving SavedModel here")
    g.add_argument("--tflite_output_file", metavar="FILE", help="export a TFLite model here")
    g.add_argument("--labels_output_file", metavar="FILE", help="write the class names here")
    g.add_argument("--quantize", choices=("none", "dynamic", "float16", "int8"), default="none",
                   help="TFLite quantization")
    g.add_argument("--assert_accuracy_at_least", type=_number(float, 0, 1), metavar="ACCURACY",
                   help="fail (exit 1, export nothing) if the validation accuracy is lower")

    tune = add("tune", "Search unfreeze depth, learning rate and dropout with Keras Tuner "
               "(tlkeras.tune).", [configurable])
    _add_data_args(tune, validation=True)
    _add_model_args(tune, head=False)
    g = tune.add_argument_group("search")
    g.add_argument(
        "--tuner", choices=("hyperband", "bayesian", "random", "grid"), default="hyperband"
    )
    g.add_argument("--max_trials", type=_number(int, 1), default=10)
    g.add_argument(
        "--max_epochs", type=_number(int, 1), default=3, help="fine-tune epochs per trial"
    )
    g.add_argument(
        "--head_epochs", type=_number(int, 0), default=5, help="epochs of phase 1 (once)"
    )
    g.add_argument("--objective", default="val_accuracy")
    g.add_argument("--unfreeze_depths", type=_ints, metavar="N,N,...",
                   help="depths (blocks) to try (default: every block boundary)")
    g.add_argument("--learning_rates", metavar="LR,LR,...",
                   help="phase-2 learning rates to try (default: 1e-5 to 1e-3, log scale)")
    g.add_argument("--dropouts", metavar="P,P,...", help="dropout rates to try (default: 0 to 0.5)")
    g.add_argument("--directory", default="tuning", help="the search folder's parent")
    g.add_argument("--project_name", default="tlkeras")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="start afresh instead of resuming")
    g.add_argument("--export_dir", metavar="DIR", help="export the best model here")

    evaluate = add("evaluate", "Evaluate a trained model: accuracy, per-class precision/recall, "
                   "confusion matrix, confident mistakes.")
    evaluate.add_argument("--model", required=True, type=_existing("path"),
                          help="a .keras file or a run/export folder holding model.keras")
    _add_data_args(evaluate, validation=False)
    evaluate.add_argument("--output_dir", help="where report.json and confusion_matrix.png go "
                                               "(default: <model folder>/evaluation)")
    evaluate.add_argument("--top_k", type=_number(int, 1), default=5)

    predict = add("predict", "Predict the top-k labels of image files or folders.")
    predict.add_argument("inputs", nargs="+", type=_existing("path"), metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--model", required=True, type=_existing("path"),
                         help="a .keras file or a run/export folder holding model.keras")
    predict.add_argument("--labels", type=_existing("file"),
                         help="class names, one per line (default: labels.txt beside the model)")
    predict.add_argument("--top_k", type=_number(int, 1), default=3)
    predict.add_argument(
        "--output", metavar="FILE", help="a .csv or .json file (default: CSV on stdout)"
    )
    predict.add_argument("--batch_size", type=_number(int, 1), default=32)

    export = add(
        "export", "Export a trained model (.keras, SavedModel, TFLite), verified against it."
    )
    export.add_argument("--model", required=True, type=_existing("path"),
                        help="a .keras file or a run folder holding model.keras")
    export.add_argument("--output_dir", required=True)
    export.add_argument("--formats", default="keras,saved_model,tflite",
                        help="comma-separated, of keras, saved_model, tflite")
    export.add_argument(
        "--quantize", choices=("none", "dynamic", "float16", "int8"), default="none"
    )
    export.add_argument("--representative_dir", type=_existing("folder"),
                        help="images for int8 calibration and verification")
    export.add_argument("--labels", type=_existing("file"),
                        help="class names, one per line (default: labels.txt beside the model)")

    scan = add("scan", "Check every image of a folder: usable, converted or bad (with reasons).")
    scan.add_argument("path", type=_existing("folder"))
    scan.add_argument("--report", metavar="FILE", help="write the JSON report here")
    scan.add_argument("--strict", action="store_true", help="exit 1 when a file is bad")

    add("backbones", "List the backbones (keras.applications) with sizes and preprocessing.")

    weights = add("weights", "Show where a backbone's ImageNet weights are expected offline, "
                  "or verify a weights file.")
    weights.add_argument("name", help="a backbone name, e.g. ResNet50")
    weights.add_argument("--verify", type=_existing("file"), metavar="PATH",
                         help="load this .h5/.weights.h5/.keras file into the architecture")

    demo = add("demo", "The offline example: transfer from digits 0-4 to 5-9 against training "
               "from scratch, at several label budgets.")
    demo.add_argument("--run_dir", default=os.path.join("runs", "demo"))
    demo.add_argument(
        "--quick", action="store_true", help="fewer budgets and seeds (about a minute)"
    )
    demo.add_argument(
        "--budgets", type=_ints, metavar="K,K,...", help="labels per class to compare"
    )
    demo.add_argument("--seeds", type=_number(int, 1), help="seeds averaged per budget")
    return parser, subparsers


def _add_data_args(parser, validation):
    g = parser.add_argument_group("data (one of --image_dir, --tfds, --csv)")
    g.add_argument("--image_dir", type=_existing("folder"), metavar="DIR",
                   help="a folder with one subfolder of images per class")
    g.add_argument("--tfds", metavar="NAME", help="a TensorFlow Datasets name, e.g. tf_flowers")
    g.add_argument("--csv", type=_existing("file"), metavar="FILE",
                   help="a CSV of image paths (relative to it) and labels")
    g.add_argument("--image_column", default="image", help="CSV column of the image paths")
    g.add_argument("--label_column", default="label", help="CSV column of the labels")
    g.add_argument("--tfds_split", default="train" if validation else "test")
    g.add_argument(
        "--tfds_data_dir", metavar="DIR", help="TFDS data folder (offline: a prepared copy)"
    )
    g.add_argument("--image_size", type=_number(int, 1),
                   help="resize images to this square size (default: the base's)")
    g.add_argument("--batch_size", type=_number(int, 1), default=32)
    if validation:
        g.add_argument("--validation_split", type=_number(float, 0, 0.9), default=0.2,
                       help="fraction held out for validation (stratified)")
    g.add_argument("--seed", type=int, default=42, help="data split, shuffling and initialization")


def _add_model_args(parser, head=True):
    g = parser.add_argument_group("model")
    g.add_argument(
        "--base",
        default="MobileNetV2",
        help="a backbone name (see `tlkeras backbones`), hub:<handle>, a KerasHub preset, "
        "a SavedModel or preset folder, or a .keras file holding your own base model",
    )
    g.add_argument("--weights", default="imagenet",
                   help="imagenet, none (random initialization) or a path to a weights file")
    if head:
        g.add_argument("--dropout", type=_number(float, 0, 0.99), default=0.2)
        g.add_argument("--hidden_units", type=_ints, default=[], metavar="N,N,...",
                       help="hidden Dense layers of the head")
        g.add_argument("--l1", type=_number(float, 0), default=0.0,
                       help="L1 penalty on the head's Dense kernels")
        g.add_argument("--l2", type=_number(float, 0), default=0.0,
                       help="L2 penalty on the head's Dense kernels")
    g.add_argument("--pooling", choices=("avg", "max", "flatten"), default="avg")
    g = parser.add_argument_group("augmentation (of the training images; tune: in the model)")
    g.add_argument(
        "--augmentation",
        choices=("none", "light", "medium", "standard", "strong"),
        default="none",
        help="a preset of tlkeras.data.augmentation_preset",
    )
    g.add_argument(
        "--random_flip",
        choices=("none", "horizontal", "vertical", "horizontal_and_vertical"),
        default="none",
    )
    for name, what in (("rotation", "fraction of a full turn"), ("zoom", "fraction"),
                       ("translation", "fraction of the size"), ("contrast", "factor"),
                       ("brightness", "factor")):
        g.add_argument(f"--random_{name}", type=_number(float, 0, 1), default=0.0, help=what)


# ------------------------------------------------------------------ helpers


def _verbose():
    return 1 if sys.stdout.isatty() else 2


def _image_size(args):
    """The square input size: --image_size, else the base's own."""
    if args.image_size:
        return args.image_size
    from tlkeras import backbones

    if backbones.exists(args.base):
        return backbones.get(args.base).default_size
    if args.base.endswith(".keras"):
        return None  # the base model's own input shape
    return 224


def _base(args):
    """--base as `build_transfer_model` takes it (a .keras file is loaded)."""
    import keras

    from tlkeras import backbones

    base = args.base
    if base.endswith(".keras"):
        if not os.path.isfile(base):
            raise UsageError(f"argument --base: no such file: {base!r}")
        return keras.saving.load_model(base, compile=False)
    if not backbones.exists(base) and not os.path.exists(base) and ":" not in base:
        close = difflib.get_close_matches(
            base.lower(), [n.lower() for n in backbones.list_backbones()], n=1, cutoff=0.75
        )
        if close:
            name = backbones.get(close[0]).name
            raise UsageError(f"argument --base: unknown backbone {base!r}; did you mean {name}? "
                             "(see `tlkeras backbones`)")
    return base


def _weights(args):
    if args.weights.lower() == "none":
        return None
    if args.weights == "imagenet":
        return "imagenet"
    if not os.path.isfile(args.weights):
        raise UsageError(f"argument --weights: expected imagenet, none or an existing file, "
                         f"received {args.weights!r}")
    return args.weights


def _augmentation(args):
    import keras

    from tlkeras import data

    layers = (
        list(data.augmentation_preset(args.augmentation).layers)
        if args.augmentation != "none"
        else []
    )
    L = keras.layers
    if args.random_flip != "none":
        layers.append(L.RandomFlip(args.random_flip))
    if args.random_rotation:
        layers.append(L.RandomRotation(args.random_rotation))
    if args.random_zoom:
        layers.append(L.RandomZoom(args.random_zoom))
    if args.random_translation:
        layers.append(L.RandomTranslation(args.random_translation, args.random_translation))
    if args.random_contrast:
        layers.append(L.RandomContrast(args.random_contrast, value_range=(0, 255)))
    if args.random_brightness:
        layers.append(L.RandomBrightness(args.random_brightness, value_range=(0, 255)))
    return layers or None


def _load_data(args, size, training=True, augmentation=None):
    """`(train, validation)` datasets (validation None when not split) of --image_dir/--csv/--tfds.

    `augmentation` applies to the training data only (in the pipeline, so exports never hold it).
    """
    from tlkeras import data

    split = getattr(args, "validation_split", 0) if training else 0
    common = dict(batch_size=args.batch_size, seed=args.seed)
    if size is None and not args.tfds:
        raise UsageError("pass --image_size: the base model's input size is not fixed")
    if args.tfds:
        name, where = args.tfds, args.tfds_split
        if split:
            cut = round(100 * (1 - split))
            return (data.from_tfds(name, f"{where}[:{cut}%]", size, data_dir=args.tfds_data_dir,
                                   augmentation=augmentation, **common),
                    data.from_tfds(name, f"{where}[{cut}%:]", size, data_dir=args.tfds_data_dir,
                                   shuffle=False, **common))
        return data.from_tfds(name, where, size, data_dir=args.tfds_data_dir, shuffle=training,
                              augmentation=augmentation, **common), None

    def load(subset):
        kwargs = dict(validation_split=split or None, subset=subset, shuffle=subset != "validation"
                      and training, augmentation=None if subset == "validation" else augmentation,
                      **common)
        if args.image_dir:
            return data.from_directory(args.image_dir, size, **kwargs)
        return data.from_csv(
            args.csv, args.image_column, args.label_column, image_size=size, **kwargs
        )

    if not split:
        return load(None), None
    return load("training"), load("validation")  # the validation data unshuffled: files in order


def _model_path(path):
    """A .keras file, or the model.keras inside a run/export folder."""
    if os.path.isdir(path):
        inside = os.path.join(path, "model.keras")
        if not os.path.isfile(inside):
            raise UsageError(f"argument --model: folder {path!r} holds no model.keras")
        return inside
    if not path.endswith(".keras"):
        raise UsageError(
            f"argument --model: expected a .keras file or a folder holding model.keras, "
            f"received {path!r}"
        )
    return path


def _load_model(path):
    import keras

    import tlkeras  # noqa: F401 - registers tlkeras layers for deserialization

    return keras.saving.load_model(_model_path(path), compile=False)


def _class_names(model_path, labels_file, num_outputs):
    """Class names from --labels, labels.txt beside the model or the run's config.json."""
    folder = os.path.dirname(os.path.abspath(_model_path(model_path)))
    names = None
    candidates = [labels_file] if labels_file else [os.path.join(folder, "labels.txt")]
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                names = [line.rstrip("\n") for line in f if line.strip()]
            break
    if names is None and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            names = json.load(f).get("class_names")
    expected = 2 if num_outputs == 1 else num_outputs
    if names is None:
        return [str(i) for i in range(expected)]
    if len(names) != expected:
        raise UsageError(
            f"{len(names)} class names (from {labels_file or folder}) but the model has "
            f"{expected} classes"
        )
    return [str(n) for n in names]


def _copy(source, target):
    if os.path.isdir(target):
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)


@contextlib.contextmanager
def _quiet_tf():
    """Hides TensorFlow's Python-side retracing notes while a command runs."""
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------ commands


def cmd_train(args):
    import keras
    import tensorflow as tf

    import tlkeras

    # MultiWorkerMirroredStrategy must exist before any TensorFlow op runs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if args.strategy == "multiworker" else (
        None if args.strategy == "auto" else args.strategy)
    run_dir = args.run_dir or os.path.join(
        "runs", f"{os.path.basename(args.base.rstrip('/')).removesuffix('.keras')}-"
        f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    base, weights = _base(args), _weights(args)
    if args.momentum is not None and args.optimizer not in ("sgd", "rmsprop"):
        raise UsageError("argument --momentum: applies to --optimizer sgd or rmsprop")
    if args.assert_accuracy_at_least is not None and not args.validation_split:
        raise UsageError("argument --assert_accuracy_at_least: needs --validation_split > 0")
    if args.quantize == "int8" and not args.tflite_output_file:
        raise UsageError("argument --quantize: applies to --tflite_output_file")
    size = _image_size(args)
    if size is None:
        size = tuple(base.input_shape[1:3])[0]
    augmentation = _augmentation(args)
    train, val = _load_data(args, size, augmentation=augmentation)
    class_names = list(train.class_names)
    regularizer = keras.regularizers.L1L2(args.l1, args.l2) if (args.l1 or args.l2) else None
    keras.utils.set_random_seed(args.seed)
    model = tlkeras.build_transfer_model(
        base, len(class_names), input_shape=(size, size, 3), weights=weights,
        pooling=None if args.pooling == "flatten" else args.pooling, dropout=args.dropout,
        hidden_units=tuple(args.hidden_units), kernel_regularizer=regularizer)
    optimizer = args.optimizer
    if args.momentum is not None:
        kind = keras.optimizers.SGD if args.optimizer == "sgd" else keras.optimizers.RMSprop
        optimizer = lambda lr: kind(lr, momentum=args.momentum)  # noqa: E731
    os.makedirs(run_dir, exist_ok=True)
    resolved = {
        k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "debug")
    }
    resolved["run_dir"] = run_dir
    with open(os.path.join(run_dir, "cli_config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    with open(os.path.join(run_dir, "labels.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")
    shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    count = len(train.file_paths) if hasattr(train, "file_paths") else "?"
    print(f"Training on {count} images of {len(class_names)} classes ({shown}); "
          f"run folder {run_dir}", flush=True)
    with _quiet_tf():
        result = tlkeras.fine_tune(
            model,
            train,
            val,
            head_epochs=args.head_epochs,
            fine_tune_epochs=args.fine_tune_epochs,
            unfreeze=args.unfreeze,
            unfreeze_unit=args.unfreeze_unit,
            learning_rate=args.learning_rate,
            fine_tune_learning_rate=args.fine_tune_learning_rate,
            optimizer=optimizer,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            class_weight="balanced" if args.balance_classes else None,
            cache_features="auto" if augmentation is None else False,  # cache: no augmentation
            log_dir=run_dir,
            precision=args.precision,
            strategy=strategy,
            early_stopping=args.early_stopping,
            class_names=class_names,
            seed=args.seed,
            verbose=_verbose(),
        )
        if val is not None:
            report = tlkeras.evaluate(result.model, val, class_names,
                                      output_dir=os.path.join(run_dir, "evaluation"),
                                      history=os.path.join(run_dir, "history.csv"))
            accuracy = report.metrics["accuracy"]
            print(f"Validation accuracy {accuracy:.4f} on {report.num_samples} images; "
                  f"report in {os.path.join(run_dir, 'evaluation')}")
            if (
                args.assert_accuracy_at_least is not None
                and accuracy < args.assert_accuracy_at_least
            ):
                raise Failure(
                    f"validation accuracy {accuracy:.4f} is below --assert_accuracy_at_least "
                    f"{args.assert_accuracy_at_least}; nothing was exported"
                )
        _export_train_outputs(
            args, result.model, class_names, val if val is not None else train, run_dir
        )
    print(f"Model: {os.path.join(run_dir, 'model.keras')}. "
          f"TensorBoard: tensorboard --logdir {run_dir}")
    return 0


def _export_train_outputs(args, model, class_names, data, run_dir):
    import tlkeras

    formats = [
        f
        for f, flag in (("saved_model", args.saved_model_dir), ("tflite", args.tflite_output_file))
        if flag
    ]
    if args.labels_output_file:
        _copy(os.path.join(run_dir, "labels.txt"), args.labels_output_file)
        print(f"Labels: {args.labels_output_file}")
    if not formats:
        return
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:
        result = tlkeras.export_model(
            model, tmp, formats=formats, class_names=class_names,
            quantize=None if args.quantize == "none" else args.quantize, representative_data=data)
        if args.saved_model_dir:
            _copy(result.paths["saved_model"], args.saved_model_dir)
            print(f"SavedModel: {args.saved_model_dir}")
        if args.tflite_output_file:
            _copy(result.paths["tflite"], args.tflite_output_file)
            print(f"TFLite: {args.tflite_output_file}")


def cmd_tune(args):
    import tlkeras

    base, weights = _base(args), _weights(args)
    if not args.validation_split:
        raise UsageError("argument --validation_split: tune needs validation data (> 0)")
    size = _image_size(args) or tuple(base.input_shape[1:3])[0]
    train, val = _load_data(args, size)
    space = {}
    if args.unfreeze_depths:
        space["unfreeze_depth"] = args.unfreeze_depths
    for key, flag in (("learning_rate", args.learning_rates), ("dropout", args.dropouts)):
        if flag:
            try:
                space[key] = [float(v) for v in flag.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"argument --{key}s: expected comma-separated numbers, "
                                 f"received {flag!r}") from None
    with _quiet_tf():
        result = tlkeras.tune(
            base, train, val, num_classes=len(train.class_names), input_shape=(size, size, 3),
            weights=weights, augmentation=_augmentation(args), search_space=space or None,
            tuner=args.tuner, max_trials=args.max_trials, max_epochs=args.max_epochs,
            objective=args.objective, directory=args.directory, project_name=args.project_name,
            overwrite=args.overwrite, head_epochs=args.head_epochs, export_dir=args.export_dir,
            seed=args.seed, verbose=1)
    print(f"Best: {json.dumps(result.best_hyperparameters)} "
          f"({args.objective} {result.best_score:.4f})")
    print(f"Trials: {result.csv_path}. TensorBoard: tensorboard --logdir "
          f"{os.path.join(result.directory, 'logs')}")
    if args.export_dir:
        with open(os.path.join(args.export_dir, "labels.txt"), "w") as f:
            f.write("\n".join(train.class_names) + "\n")
        print(f"Best model exported to {args.export_dir}")
    return 0


def cmd_evaluate(args):
    import tlkeras

    model = _load_model(args.model)
    size = model.input_shape[1]
    data, _ = _load_data(args, size, training=False)
    names = _class_names(args.model, None, model.output_shape[-1])
    if data.class_names is not None and list(data.class_names) != names:
        print(f"note: the data's classes {list(data.class_names)} differ from the model's {names}; "
              "the data's are used", file=sys.stderr)
        names = list(data.class_names)
    output_dir = args.output_dir or os.path.join(
        os.path.dirname(os.path.abspath(_model_path(args.model))), "evaluation"
    )
    with _quiet_tf():
        report = tlkeras.evaluate(model, data, names, top_k=args.top_k, output_dir=output_dir)
    print(f"{report.num_samples} images")
    for key, value in report.metrics.items():
        print(f"{key:>20}: {value:.4f}")
    if report.per_class:
        width = max(len(n) for n in report.per_class)
        print(f"\n{'class':<{width}}  precision  recall      f1  support")
        for name, row in report.per_class.items():
            print(
                f"{name:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  "
                f"{row['f1']:>6.3f}  {row['support']:>7}"
            )
    print(f"\nReport: {report.files.get('report')}")
    return 0


def cmd_predict(args):
    import numpy as np
    import tensorflow as tf
    from tqdm import tqdm

    from tlkeras import data

    model = _load_model(args.model)
    names = _class_names(args.model, args.labels, model.output_shape[-1])
    height, width = model.input_shape[1:3]
    files = []
    for path in args.inputs:
        if os.path.isdir(path):
            files += sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
                            if f.lower().endswith(data.IMAGE_EXTENSIONS))
        else:
            files.append(path)
    rows, images, kept = [], [], []

    def flush():
        if images:
            probabilities = np.asarray(model.predict_on_batch(np.stack(images)), "float32")
            for path, p in zip(kept, probabilities):
                p = np.array([1 - p[0], p[0]]) if p.shape[-1] == 1 else p
                top = np.argsort(-p, kind="stable")[:min(args.top_k, len(p))]
                rows.append({"file": path, "predictions": [
                    {"label": names[i], "probability": round(float(p[i]), 6)} for i in top]})
            images.clear()
            kept.clear()

    for path in tqdm(files, desc="predict", unit="image", disable=None, file=sys.stderr):
        try:
            image = _read_image(path)
        except Exception as error:  # noqa: BLE001 - a bad file is skipped, not fatal
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        images.append(tf.image.resize(image, (height, width), method="bilinear").numpy())
        kept.append(path)
        if len(images) == args.batch_size:
            flush()
    flush()
    if not rows:
        raise Failure(f"no readable images in {', '.join(args.inputs)}")
    _write_predictions(rows, args.output, args.top_k)
    return 0


def _read_image(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return np.asarray(image.convert("RGB"), dtype="float32")


def _write_predictions(rows, output, top_k):
    if output and output.endswith(".json"):
        with open(output, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"Predictions of {len(rows)} images: {output}", file=sys.stderr)
        return
    import csv

    k = max(len(r["predictions"]) for r in rows)
    header = ["file"] + [f"{what}_{i + 1}" for i in range(k) for what in ("label", "probability")]
    f = open(output, "w", newline="") if output else sys.stdout
    try:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in rows:
            writer.writerow(
                [r["file"]] + [v for p in r["predictions"] for v in (p["label"], p["probability"])]
            )
    finally:
        if output:
            f.close()
            print(f"Predictions of {len(rows)} images: {output}", file=sys.stderr)


def cmd_export(args):
    import tlkeras

    from tlkeras import data

    model = _load_model(args.model)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    names = _class_names(args.model, args.labels, model.output_shape[-1])
    representative = None
    if args.representative_dir:
        representative = data.from_directory(args.representative_dir, tuple(model.input_shape[1:3]),
                                             labels=None, batch_size=32, shuffle=False)
    elif args.quantize == "int8":
        raise UsageError(
            "argument --quantize int8: needs --representative_dir (calibration images)"
        )
    with _quiet_tf():
        result = tlkeras.export_model(model, args.output_dir, formats=formats, class_names=names,
                                      quantize=None if args.quantize == "none" else args.quantize,
                                      representative_data=representative)
    for kind, path in result.paths.items():
        print(f"{kind:>12}: {path}")
    for kind, check in result.checks.items():
        print(f"verified {kind}: max |difference| {check['max_abs_diff']:.2g} "
              f"(tolerance {check['tolerance']:g}), top-1 agreement {check['top1_agreement']:.3f}")
    return 0


def cmd_scan(args):
    from tlkeras import data

    report = data.scan_images(args.path, strict=False, report_path=args.report)
    print(report)
    print(f"Report: {report.report_path}")
    if args.strict and report.bad:
        raise Failure(f"{len(report.bad)} bad file(s) in {args.path}")
    return 0


def cmd_backbones(args):
    from tlkeras import backbones

    print(f"{'name':<18} {'default size':>12} {'min size':>8} {'feature dim':>11}  "
          "preprocessing  family")
    for name in backbones.list_backbones():
        s = backbones.get(name)
        print(f"{s.name:<18} {s.default_size:>12} {s.min_size:>8} {s.feature_dim:>11}  "
              f"{s.preprocessing:<13}  {s.family}")
    print(
        "\nAlso accepted as --base: hub:<handle> (TF Hub), a KerasHub preset, a SavedModel or "
        "preset folder, or a .keras file with your own base model."
    )
    return 0


def cmd_weights(args):
    from tlkeras import backbones, models

    spec = backbones.get(args.name)
    if args.verify:
        with _quiet_tf():
            base = spec.build(weights=None)
            models.load_base_weights(base, args.verify)
        print(f"OK: {args.verify} matches {spec.name} ({len(base.weights)} weight tensors)")
        return 0
    info = models.weights_info(spec.name)
    cached = os.path.isfile(info["cache_path"])
    print(f"backbone:   {spec.name}\nfile name:  {info['file_name']}\nurl:        {info['url']}\n"
          f"cache path: {info['cache_path']} ({'present' if cached else 'missing'})")
    if not cached:
        print(
            f"\nOffline: download the file elsewhere, then either put it at the cache path "
            f"(weights='imagenet' then works) or pass it as --weights PATH "
            f"(build_transfer_model(..., weights=PATH)). Check it with: "
            f"tlkeras weights {spec.name} --verify PATH"
        )
    return 0


def cmd_demo(args):
    from tlkeras import demo

    results = demo.run_demo(args.run_dir, quick=args.quick, budgets=args.budgets, seeds=args.seeds,
                            verbose=0)
    return 0 if results["rows"] else 1


_COMMANDS = {"train": cmd_train, "tune": cmd_tune, "evaluate": cmd_evaluate, "predict": cmd_predict,
             "export": cmd_export, "scan": cmd_scan, "backbones": cmd_backbones,
             "weights": cmd_weights, "demo": cmd_demo}


if __name__ == "__main__":
    sys.exit(main())
