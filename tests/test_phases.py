"""tlkeras.phases: the one phase-2 schedule and the sizes that fine_tune and tune share."""

import numpy as np
import pytest
import tensorflow as tf

from tlkeras import phases


@pytest.mark.parametrize("steps, epochs, warmup_epochs, expected", [
    (10, 20, 1, 10),   # a long phase: one epoch of warm-up
    (10, 3, 1, 3),     # a short one (fine_tune's 3 epochs, tune's trials): a tenth of it
    (10, 20, 0, 0),    # none asked
    (1, 1, 1, 0),      # a single step: no warm-up at all
])
def test_one_warmup_rule_then_cosine_decay(steps, epochs, warmup_epochs, expected):
    schedule = phases.fine_tune_schedule(1e-3, steps, epochs, warmup_epochs)
    assert schedule.warmup_steps == expected
    rates = [float(schedule(step)) for step in range(steps * epochs + 1)]
    peak = int(np.argmax(rates))
    assert peak == expected and rates[peak] == pytest.approx(1e-3)
    assert rates[-1] == pytest.approx(1e-5, rel=1e-3)  # decays to 1% of the peak
    if expected:
        assert rates[0] == pytest.approx(1e-5)  # the warm-up starts at 1% of the peak
        assert all(a <= b for a, b in zip(rates[:peak], rates[1:peak + 1]))


def test_sizes_of_a_pipeline_of_unknown_length():
    data = tf.data.Dataset.range(50).filter(lambda i: i % 5 > 0).map(lambda i: (i, i)).batch(8)
    assert int(data.cardinality()) < 0  # unknown: counted
    assert phases.steps_per_epoch(data) == 5 and phases.batch_size(data) == 8
    with pytest.raises(ValueError, match="empty"):
        phases.batch_size(data.take(0))


def test_one_default_depth_for_fine_tune_lr_find_and_the_command_line():
    import inspect

    import tlkeras
    from tlkeras import cli

    assert inspect.signature(tlkeras.fine_tune).parameters["unfreeze"].default == phases.UNFREEZE
    assert inspect.signature(tlkeras.lr_find).parameters["unfreeze"].default == phases.UNFREEZE
    parser, commands = cli.build_parser()
    assert parser.parse_args(["train", "--image_dir", "data"]).unfreeze == phases.UNFREEZE
