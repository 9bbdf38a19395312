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
    tlkeras add-classes --model runs/flowers --image_dir new_flowers/ [--method rehearsal+lwf]
    tlkeras ensemble --models runs/a runs/b --image_dir held_out/ --output_dir export/fused
    tlkeras distill --teacher export/fused --student MobileNetV3Small --image_dir flowers/

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


def _rate_or_find(text):
    if text == "find":
        return text
    try:
        return _number(float, 0, low_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'find', received {text!r}"
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
    # 2: tlkeras.phases.UNFREEZE, written out since the parser starts without importing TensorFlow
    g.add_argument("--unfreeze", type=_depth, default=2,
                   help="phase 2 unfreezes this many blocks (or layers) of the base, or 'all' "
                   "(default 2)")
    g.add_argument("--unfreeze_unit", choices=("blocks", "layers"), default="blocks")
    g.add_argument("--head_learning_rate", "--learning_rate", dest="learning_rate",
                   type=_rate_or_find, default=1e-3,
                   help="phase 1 learning rate, or 'find' (tlkeras.lr_find's suggestion); "
                   "--learning_rate: its old name")
    g.add_argument("--fine_tune_learning_rate", type=_rate_or_find,
                   help="phase 2 peak learning rate, or 'find' (default: head_learning_rate / 5)")
    g.add_argument("--layer_decay", type=_number(float, 0, 1, low_open=True), metavar="FACTOR",
                   help="phase 2: each unfrozen block down from the head trains at FACTOR times "
                   "the learning rate of the one above")
    g.add_argument("--gradual_unfreeze", type=_number(int, 1), metavar="N",
                   help="phase 2: start with the top block training, add the next one down "
                   "every N epochs")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                   help="phase 2: keep an exponential moving average of the weights; validate, "
                   "checkpoint and save the averaged weights")
    g.add_argument("--mix", choices=("none", "mixup", "cutmix"), default="none",
                   help="phase 2: train on MixUp / CutMix batches with soft labels")
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
    g.add_argument("--run_dir", help="the search folder (default: DIRECTORY/PROJECT_NAME)")
    g.add_argument("--directory", default="tuning", help="old form of --run_dir: its parent")
    g.add_argument("--project_name", default="tlkeras", help="old form of --run_dir: its name")
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
    evaluate.add_argument("--tta", action="store_true",
                          help="test-time augmentation: average with the flipped images")

    explain = add("explain", "Explain predictions: heatmap overlays of image files and an "
                  "index.html (a text model: .txt files, one text each, shaded in tokens.html).")
    explain.add_argument("inputs", nargs="+", type=_existing("path"), metavar="IMAGE")
    explain.add_argument("--model", required=True, type=_existing("path"),
                         help="a .keras file, a run folder, an exported SavedModel folder or a "
                              ".tflite file")
    explain.add_argument("--output_dir", required=True)
    explain.add_argument("--method", choices=("gradcam", "gradcam++", "integrated_gradients",
                                              "occlusion"),
                         help="default: gradcam for Keras image models, occlusion for "
                              "exports, integrated_gradients for text models")

    predict = add("predict", "Predict the top-k labels of image files or folders.")
    predict.add_argument("inputs", nargs="+", type=_existing("path"), metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--model", required=True, type=_existing("path"),
                         help="a .keras or .tflite file, a run folder, an export folder or a "
                              "SavedModel folder")
    predict.add_argument("--labels", type=_existing("file"),
                         help="class names, one per line (default: labels.txt beside the model)")
    predict.add_argument("--top_k", type=_number(int, 1), default=3)
    predict.add_argument(
        "--output", metavar="FILE", help="a .csv or .json file (default: CSV on stdout)"
    )
    predict.add_argument("--batch_size", type=_number(int, 1), default=32)
    predict.add_argument("--tta", action="store_true",
                         help="test-time augmentation: average with the flipped images")

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

    add_cls = add("add-classes", "Add new classes to a trained model without forgetting the old "
                  "ones (tlkeras.add_classes: exemplar rehearsal and distillation).")
    add_cls.add_argument("--model", required=True, type=_existing("folder"),
                         help="a run folder holding model.keras (of train or add-classes)")
    add_cls.add_argument("--image_dir", required=True, type=_existing("folder"),
                         help="one subfolder of images per NEW class")
    add_cls.add_argument("--old_image_dir", type=_existing("folder"),
                         help="images of the old classes to choose exemplars from (default: the "
                              "run's memory/, else the --image_dir its cli_config.json names)")
    add_cls.add_argument("--method", choices=("rehearsal+lwf", "rehearsal", "lwf", "naive"),
                         default="rehearsal+lwf")
    add_cls.add_argument("--epochs", type=_number(int, 1), default=30, help="head training")
    add_cls.add_argument("--learning_rate", type=_number(float, 0, low_open=True), default=1e-3)
    add_cls.add_argument("--memory_per_class", type=_number(int, 1), default=20,
                         help="exemplars kept per class")
    add_cls.add_argument("--memory_size", type=_number(int, 1), help="exemplars kept in all")
    add_cls.add_argument("--run_dir", metavar="DIR",
                         help="write the extended run here (default: update --model in place)")
    add_cls.add_argument("--batch_size", type=_number(int, 1), default=32)
    add_cls.add_argument("--seed", type=int, default=42)

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
    _add_unlabeled_commands(add)
    _add_fusion_commands(add)
    return parser, subparsers


def _add_unlabeled_commands(add):
    """`pretrain`, `adapt`, `cluster`: learning from unlabeled images (tlkeras.unlabeled)."""
    model_help = "a .keras file (a base or a transfer model) or a run folder holding model.keras"
    pretrain = add("pretrain", "Self-supervised (SimCLR) training of a pretrained base or model "
                   "on a folder of unlabeled images; writes <run_dir>/model.keras.")
    pretrain.add_argument("--model", required=True, type=_existing("path"), help=model_help)
    pretrain.add_argument("--unlabeled_dir", required=True, type=_existing("folder"),
                          help="unlabeled images (any subfolders are ignored as labels)")
    pretrain.add_argument("--run_dir", required=True, help="the run folder (resumable)")
    pretrain.add_argument("--epochs", type=_number(int, 1), default=10)
    pretrain.add_argument("--batch_size", type=_number(int, 2), default=64)
    pretrain.add_argument("--learning_rate", type=_number(float, 0, low_open=True), default=1e-3)
    pretrain.add_argument("--temperature", type=_number(float, 0, low_open=True), default=0.1)
    pretrain.add_argument("--precision", choices=("auto", "float32", "mixed_float16",
                                                  "mixed_bfloat16"), default="auto",
                          help="auto: mixed_float16 on recent NVIDIA GPUs, else float32")
    pretrain.add_argument("--seed", type=int, default=42)

    adapt = add("adapt", "Unsupervised domain adaptation of a trained transfer model toward a "
                "folder of unlabeled target images (CORAL or DANN).")
    adapt.add_argument("--model", required=True, type=_existing("path"), help=model_help)
    adapt.add_argument("--image_dir", required=True, type=_existing("folder"),
                       help="labeled source images, one subfolder per class")
    adapt.add_argument("--target_dir", required=True, type=_existing("folder"),
                       help="unlabeled target images (never read as labels)")
    adapt.add_argument("--target_val_dir", type=_existing("folder"),
                       help="a few labeled target images, one subfolder per class: only pick "
                            "the checkpoint (default: source validation)")
    adapt.add_argument("--method", choices=("coral", "dann"), default="coral")
    adapt.add_argument("--epochs", type=_number(int, 1), default=10)
    adapt.add_argument("--batch_size", type=_number(int, 1), default=32)
    adapt.add_argument("--output", required=True, metavar="FILE.keras")
    adapt.add_argument("--seed", type=int, default=42)

    cluster = add("cluster", "Cluster a folder of images by k-means on a pretrained model's "
                  "features; writes a CSV of file,cluster.")
    cluster.add_argument("--model", required=True, type=_existing("path"), help=model_help)
    cluster.add_argument("--image_dir", required=True, type=_existing("folder"))
    cluster.add_argument("--n_clusters", type=_number(int, 1),
                         help="default: chosen by silhouette score")
    cluster.add_argument("--max_clusters", type=_number(int, 2), default=15)
    cluster.add_argument("--output", metavar="FILE.csv", help="default: CSV on stdout")
    cluster.add_argument("--batch_size", type=_number(int, 1), default=32)


def _add_fusion_commands(add):
    """`tlkeras ensemble` and `tlkeras distill` (tlkeras.fusion)."""
    ensemble = add("ensemble", "Fuse trained models into one (average, weighted, stacking or "
                   "a weight soup), evaluate it and export it (tlkeras.ensemble).")
    ensemble.add_argument("--models", nargs="+", required=True, type=_existing("path"),
                          metavar="RUN", help="runs, export folders or .keras files")
    ensemble.add_argument("--image_dir", required=True, type=_existing("folder"), metavar="DIR",
                          help="held-out labeled images (a subfolder per class), not used to "
                               "train the members: they fit weighted/stacking/the greedy soup")
    ensemble.add_argument("--output_dir", required=True, help="the fused model's exports")
    ensemble.add_argument("--method", choices=("average", "weighted", "stacking", "soup"),
                          default="average")
    ensemble.add_argument("--batch_size", type=_number(int, 1), default=32)

    distill = add("distill", "Distill a trained teacher into a small student "
                  "(keras.distillation; tlkeras.distill) and export it.")
    distill.add_argument("--teacher", required=True, type=_existing("path"),
                         help="a run, export folder or .keras file (e.g. a `tlkeras ensemble`)")
    distill.add_argument("--student", default="MobileNetV3Small",
                         help="a backbone name (built at --image_size) or a .keras file")
    distill.add_argument("--weights", default="imagenet",
                         help="the student's: imagenet, none or a path to a weights file")
    _add_data_args(distill, validation=True)
    g = distill.add_argument_group("distillation")
    g.add_argument("--unlabeled_dir", type=_existing("folder"), metavar="DIR",
                   help="more images, without labels (any folders): teacher targets only")
    g.add_argument("--epochs", type=_number(int, 1), default=10)
    g.add_argument("--temperature", type=_number(float, 0, low_open=True), default=3.0)
    g.add_argument("--alpha", type=_number(float, 0, 1), default=0.1,
                   help="weight of the labels' loss; 1 - alpha is the teacher's")
    g.add_argument("--learning_rate", type=_number(float, 0, low_open=True), default=1e-3)
    g.add_argument("--run_dir", metavar="DIR", help="config, history.csv, checkpoints, the "
                   "student's model.keras, TensorBoard logs; resumes "
                   "(default: runs/distill-<time>)")
    g.add_argument("--export_dir", metavar="DIR", help="export the student here (.keras, "
                   "SavedModel, TFLite)")
    g.add_argument("--quantize", choices=("none", "dynamic", "float16", "int8"), default="none",
                   help="TFLite quantization of the student")


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


def _load_model(path, labels_file=None):
    """(keras model, class names) of a .keras file or a run/export folder holding model.keras."""
    from tlkeras.predict import Predictor

    _model_path(path)  # a clear usage error when there is no model.keras
    predictor = Predictor(path, labels_file)
    return predictor.model, predictor.class_names


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
    augmentation = _augmentation(args)  # in the model: fine_tune sees it; exports drop it
    train, val = _load_data(args, size)
    class_names = list(train.class_names)
    regularizer = keras.regularizers.L1L2(args.l1, args.l2) if (args.l1 or args.l2) else None
    keras.utils.set_random_seed(args.seed)
    model = tlkeras.build_transfer_model(
        base, len(class_names), input_shape=(size, size, 3), weights=weights,
        pooling=None if args.pooling == "flatten" else args.pooling, dropout=args.dropout,
        hidden_units=tuple(args.hidden_units), kernel_regularizer=regularizer,
        augmentation=augmentation)
    optimizer = args.optimizer
    if args.momentum is not None:
        kind = keras.optimizers.SGD if args.optimizer == "sgd" else keras.optimizers.RMSprop
        optimizer = lambda lr: kind(lr, momentum=args.momentum)  # noqa: E731
    from tlkeras import atomic, runs

    runs.RunLock(run_dir).acquire()  # released when the process exits; before anything is written
    runs.check_resume(run_dir, {"base": tlkeras.get_base(model).name,
                                "input_shape": [size, size, 3], "class_names": class_names})
    resolved = {
        k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "debug")
    }
    resolved["run_dir"] = run_dir
    atomic.write_json(os.path.join(run_dir, "cli_config.json"), resolved, default=None)
    atomic.write_text(os.path.join(run_dir, "labels.txt"), "\n".join(class_names) + "\n")
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
            head_learning_rate=args.learning_rate,
            fine_tune_learning_rate=args.fine_tune_learning_rate,
            optimizer=optimizer,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            class_weight="balanced" if args.balance_classes else None,
            cache_features="auto",  # fine_tune caches only without augmentation
            run_dir=run_dir,
            precision=args.precision,
            strategy=strategy,
            early_stopping=args.early_stopping,
            class_names=class_names,
            seed=args.seed,
            verbose=_verbose(),
            layer_decay=args.layer_decay,
            gradual_unfreeze=args.gradual_unfreeze,
            ema=args.ema,
            mix=None if args.mix == "none" else args.mix,
        )
        if val is not None:
            report = tlkeras.evaluate(result.model, val, class_names,
                                      output_dir=os.path.join(run_dir, "evaluation"),
                                      history=os.path.join(run_dir, "history.csv"), overwrite=True)
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
        space["unfreeze"] = args.unfreeze_depths
    for key, flag, name in (("fine_tune_learning_rate", args.learning_rates, "learning_rates"),
                            ("dropout", args.dropouts, "dropouts")):
        if flag:
            try:
                space[key] = [float(v) for v in flag.split(",") if v.strip()]
            except ValueError:
                raise UsageError(f"argument --{name}: expected comma-separated numbers, "
                                 f"received {flag!r}") from None
    with _quiet_tf():
        result = tlkeras.tune(
            base, train, val, num_classes=len(train.class_names), input_shape=(size, size, 3),
            weights=weights, augmentation=_augmentation(args), search_space=space or None,
            tuner=args.tuner, max_trials=args.max_trials, max_epochs=args.max_epochs,
            objective=args.objective,
            run_dir=args.run_dir or os.path.join(args.directory, args.project_name),
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

    model, names = _load_model(args.model)
    size = model.input_shape[1]
    data, _ = _load_data(args, size, training=False)
    from tlkeras.continual import load_class_steps

    steps = load_class_steps(os.path.dirname(os.path.abspath(_model_path(args.model))))
    output_dir = args.output_dir or _free_folder(  # the data's classes are matched by name
        os.path.join(os.path.dirname(os.path.abspath(_model_path(args.model))), "evaluation"))
    with _quiet_tf():
        report = tlkeras.evaluate(model, data, names, top_k=args.top_k, output_dir=output_dir,
                                  class_steps=steps, tta=args.tta)
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
    print(f"Page: {report.files.get('html')}")
    return 0


def cmd_explain(args):
    import numpy as np

    from tlkeras import data
    from tlkeras.explain import explain, input_size, load_callable
    from tlkeras.report import index_page, thumbnail_png

    keras_model = not (args.model.endswith(".tflite")
                       or os.path.isfile(os.path.join(args.model, "saved_model.pb")))
    if keras_model:
        model, names = _load_model(args.model)
    else:
        model = load_callable(args.model)
        folder = args.model if os.path.isdir(args.model) else os.path.dirname(args.model)
        labels = [os.path.join(folder, "labels.txt"), os.path.join(folder, "..", "labels.txt")]
        labels = next((path for path in labels if os.path.isfile(path)), None)
        names = open(labels).read().split("\n") if labels else []
    if keras_model and model.inputs[0].dtype == "string":
        return _explain_texts(args, model, names)
    method = args.method or ("gradcam" if keras_model else "occlusion")
    size = input_size(model if keras_model else args.model)
    files = data.from_files(args.inputs, size)  # unreadable files are skipped and listed
    if not files.file_paths:
        raise UsageError(f"no readable image among {args.inputs}")
    images = list(np.concatenate([batch.numpy() for batch in files]))
    args.inputs = list(files.file_paths)
    with _quiet_tf():
        result = explain(model, images, method=method)
    os.makedirs(args.output_dir, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(path))[0] for path in args.inputs]
    paths = result.save(args.output_dir, [f"{i:03d}_{stem}.png" for i, stem in enumerate(stems)])
    cards = []
    for path, image, overlay, c, p in zip(args.inputs, images, result.overlay(),
                                          result.explained, result.probabilities):
        name = names[c] if c < len(names) and names[c] else str(c)
        score = p[c] if len(p) > 1 else (p[0] if c == 1 else 1 - p[0])
        cards.append(([thumbnail_png(image), thumbnail_png(overlay)],
                      f"{os.path.basename(path)}: {name} ({score:.3f})"))
    page = index_page(os.path.join(args.output_dir, "index.html"),
                      f"{method} of {os.path.basename(os.path.abspath(args.model))}", cards)
    print(f"{len(paths)} overlays ({method}) in {args.output_dir}; page: {page}")
    return 0


def _explain_texts(args, model, names):
    """`tlkeras explain` on a text model: each input file is one text."""
    from tlkeras.explain import explain

    texts = [open(path, encoding="utf-8", errors="replace").read() for path in args.inputs]
    with _quiet_tf():
        result = explain(model, texts, method=args.method)
    names = names or []
    captions = [os.path.basename(path) + (f" ({names[c]})" if c < len(names) and names[c] else "")
                for path, c in zip(args.inputs, result.explained)]
    page = result.save(args.output_dir, captions)[0]
    print(f"{len(texts)} texts explained ({result.method}); page: {page}")
    return 0


def _free_folder(path):
    """`path`, or `path-2`, `path-3`, ... : the first that holds no report (never overwrite one)."""
    candidate, n = path, 1
    while os.path.exists(os.path.join(candidate, "report.json")):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def cmd_predict(args):
    from tlkeras.predict import Predictor, predict

    try:
        model = Predictor(args.model, args.labels)
    except (OSError, ValueError) as error:
        raise UsageError(f"argument --model: {error}") from None
    with _quiet_tf():
        result = predict(model, args.inputs, top_k=args.top_k, batch_size=args.batch_size,
                         tta=args.tta)
    for path, reason in result.skipped:
        print(f"skipping {path}: {reason}", file=sys.stderr)
    if args.output and args.output.endswith(".json"):
        k = result.top_k.shape[1]
        records = [{"file": row["file"], "predictions": [
            {"label": row[f"label_{i}"], "probability": row[f"probability_{i}"]}
            for i in range(1, k + 1)]} for row in result.to_rows()]
        with open(args.output, "w") as f:
            json.dump(records, f, indent=2)
    else:
        result.to_csv(args.output or sys.stdout)
    if args.output:
        print(f"Predictions of {len(result.inputs)} images: {args.output}", file=sys.stderr)
    return 0


def cmd_export(args):
    import tlkeras

    from tlkeras import data

    model, names = _load_model(args.model, args.labels)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
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


def _unlabeled_images(model, folder, batch_size, seed=None):
    """The images of `folder` (recursively; subfolders are not labels), at the model's size."""
    from tlkeras import data

    height, width = model.input_shape[1:3]
    if height is None:
        raise UsageError("argument --model: the model's input size is not fixed")
    return data.from_directory(folder, (height, width), labels=None, batch_size=batch_size,
                               shuffle=seed is not None, seed=seed)


def cmd_pretrain(args):
    import tlkeras

    model, _ = _load_model(args.model)
    images = _unlabeled_images(model, args.unlabeled_dir, args.batch_size, args.seed)
    result = tlkeras.pretrain(model, images, epochs=args.epochs,
                              learning_rate=args.learning_rate, temperature=args.temperature,
                              precision=args.precision, run_dir=args.run_dir, seed=args.seed,
                              verbose=_verbose())
    loss = result.history.get("loss") or [float("nan")]  # empty when a finished run resumes
    print(f"NT-Xent loss {loss[0]:.4f} -> {loss[-1]:.4f}; adapted model: "
          f"{result.paths['model.keras']}")
    return 0


def cmd_adapt(args):
    import tlkeras
    from tlkeras import data

    model, _ = _load_model(args.model)
    size = model.input_shape[1:3]
    source, source_val = data.from_directory(args.image_dir, size, validation_split=0.2,
                                             subset="both", batch_size=args.batch_size,
                                             seed=args.seed)
    target = _unlabeled_images(model, args.target_dir, args.batch_size, args.seed)
    target_val = (data.from_directory(args.target_val_dir, size, batch_size=args.batch_size,
                                      shuffle=False) if args.target_val_dir else None)
    result = tlkeras.adapt(model, source, target, method=args.method, epochs=args.epochs,
                           target_validation_data=target_val, source_validation_data=source_val,
                           seed=args.seed, verbose=_verbose())
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    result.model.save(args.output)
    print(f"{args.method}: checkpoint of epoch {result.best_epoch} (picked by "
          f"{result.selected_by.replace('_', ' ')}); adapted model: {args.output}")
    return 0


def cmd_cluster(args):
    import tlkeras

    model, _ = _load_model(args.model)
    images = _unlabeled_images(model, args.image_dir, args.batch_size)
    result = tlkeras.cluster(model, images, n_clusters=args.n_clusters,
                             max_clusters=args.max_clusters)
    rows = ["file,cluster"] + [f"{path},{c}" for path, c in zip(images.file_paths,
                                                                 result.labels)]
    text = "\n".join(rows) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(f"{len(result.labels)} images in {result.n_clusters} clusters (silhouette "
          f"{result.silhouette:.3f})", file=sys.stderr)


def cmd_add_classes(args):
    import tlkeras
    from tlkeras import data

    model, names = _load_model(args.model)
    size = model.input_shape[1]
    new = data.from_directory(args.image_dir, size, batch_size=args.batch_size, shuffle=False)
    old_dir = args.old_image_dir
    has_memory = os.path.isfile(os.path.join(args.model, "memory", "manifest.json"))
    trained_on = os.path.join(args.model, "cli_config.json")
    if old_dir is None and not has_memory and os.path.isfile(trained_on):
        with open(trained_on) as f:
            old_dir = json.load(f).get("image_dir")
    old = None
    if old_dir and args.method.startswith("rehearsal"):
        print(f"Choosing exemplars of {len(names)} old classes from {old_dir}", flush=True)
        old = data.from_directory(old_dir, size, class_names=names, batch_size=args.batch_size,
                                  shuffle=False)
    print(f"Adding {len(new.class_names)} classes ({', '.join(new.class_names)}) to "
          f"{len(names)} with {args.method}", flush=True)
    with _quiet_tf():
        result = tlkeras.add_classes(
            args.model, new, new_class_names=new.class_names, method=args.method, old_data=old,
            class_names=names, epochs=args.epochs, learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            memory_per_class=args.memory_per_class, memory_size=args.memory_size,
            run_dir=args.run_dir or args.model, seed=args.seed, verbose=_verbose())
    print(f"Model: {os.path.join(result.run_dir, 'model.keras')} ({len(result.class_names)} "
          f"classes; exemplar memory {len(result.memory)} images in "
          f"{os.path.join(result.run_dir, 'memory')})")
    return 0


def cmd_demo(args):
    from tlkeras import demo

    results = demo.run_demo(args.run_dir, quick=args.quick, budgets=args.budgets, seeds=args.seeds,
                            verbose=0)
    return 0 if results["rows"] else 1


def cmd_ensemble(args):
    import tlkeras
    from tlkeras import data

    loaded = [_load_model(path) for path in args.models]
    members, names = [model for model, _ in loaded], loaded[0][1]
    size = max((tuple(m.input_shape[1:3]) for m in members), key=lambda s: s[0] * s[1])
    held_out = data.from_directory(args.image_dir, size, batch_size=args.batch_size, shuffle=False)
    with _quiet_tf():
        fused = tlkeras.ensemble(members, method=args.method,
                                 validation_data=None if args.method == "average" else held_out)
        report = tlkeras.evaluate(fused, held_out, names,
                                  output_dir=os.path.join(args.output_dir, "evaluation"))
        result = tlkeras.export_model(fused, args.output_dir, class_names=names,
                                      representative_data=held_out)
    fitted = "" if args.method == "average" else " (the images it was fitted on)"
    print(f"{args.method} of {len(members)} models: accuracy {report.metrics['accuracy']:.4f} on "
          f"{report.num_samples} images of {args.image_dir}{fitted}")
    for kind, path in result.paths.items():
        print(f"{kind:>12}: {path}")
    return 0


def cmd_distill(args):
    import keras

    import tlkeras
    from tlkeras import backbones, data

    given = [name for name in DATA_SOURCES if getattr(args, name)]
    if len(given) != 1:
        raise UsageError("give exactly one data source of --image_dir, --tfds, --csv (see "
                         "`tlkeras distill --help`)")
    teacher, names = _load_model(args.teacher)
    if args.student.endswith(".keras"):
        student, _ = _load_model(args.student)
        size = tuple(student.input_shape[1:3])
    elif backbones.exists(args.student):
        side = args.image_size or backbones.get(args.student).default_size
        size = (side, side)
        student = tlkeras.build_transfer_model(args.student, len(names), input_shape=(*size, 3),
                                               weights=_weights(args))
        tlkeras.unfreeze(student, "all")
    else:
        raise UsageError(f"argument --student: expected a backbone name (see `tlkeras "
                         f"backbones`) or a .keras file, received {args.student!r}")
    train, val = _load_data(args, size)
    unlabeled = None
    if args.unlabeled_dir:
        unlabeled = data.from_directory(args.unlabeled_dir, size, labels=None,
                                        batch_size=args.batch_size, seed=args.seed)
    run_dir = args.run_dir or os.path.join(
        "runs", f"distill-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    with _quiet_tf():
        result = tlkeras.distill(teacher, student, train, val, temperature=args.temperature,
                                 alpha=args.alpha, epochs=args.epochs, unlabeled_data=unlabeled,
                                 learning_rate=args.learning_rate, run_dir=run_dir,
                                 class_names=names, seed=args.seed, verbose=_verbose())
        if val is not None:
            for role, model in (("teacher", teacher), ("student", result.model)):
                accuracy = tlkeras.evaluate(model, val.map(
                    lambda x, y, m=model: (keras.ops.image.resize(x, m.input_shape[1:3]), y)),
                    names).metrics["accuracy"]
                print(f"{role}: validation accuracy {accuracy:.4f}")
        if args.export_dir:
            result_export = tlkeras.export_model(
                result.model, args.export_dir, class_names=names,
                quantize=None if args.quantize == "none" else args.quantize,
                representative_data=val if val is not None else train)
            for kind, path in result_export.paths.items():
                print(f"{kind:>12}: {path}")
    print(f"Run folder: {result.run_dir}")
    return 0


_COMMANDS = {"train": cmd_train, "tune": cmd_tune, "evaluate": cmd_evaluate, "predict": cmd_predict,
             "explain": cmd_explain,
             "export": cmd_export, "scan": cmd_scan, "backbones": cmd_backbones,
             "weights": cmd_weights, "demo": cmd_demo}
_COMMANDS["add-classes"] = cmd_add_classes
_COMMANDS.update(pretrain=cmd_pretrain, adapt=cmd_adapt, cluster=cmd_cluster)
_COMMANDS.update(ensemble=cmd_ensemble, distill=cmd_distill)


if __name__ == "__main__":
    sys.exit(main())
