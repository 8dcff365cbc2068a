"""The one cadence rule (log / validate / checkpoint) and the step driver shared by the plain loop and the worker."""

from csl_ray.cadence import Due, due_at, run_steps
from csl_ray.config import load_config


def cadence_config(iterations: int = 10):
    return load_config(
        preset="tiny",
        overrides=[
            f"train.iterations={iterations}",
            "train.eval_every=4",
            "train.checkpoint_every=3",
            "logging.log_every=2",
        ],
    )


def test_due_at_each_interval_and_everything_but_checkpoint_only_at_the_last_iteration():
    cfg = cadence_config()
    due = {step: due_at(step, cfg) for step in range(1, 11)}
    assert [s for s, d in due.items() if d.log] == [2, 4, 6, 8, 10]
    assert [s for s, d in due.items() if d.validate] == [4, 8, 10]  # the last iteration always validates
    assert [s for s, d in due.items() if d.checkpoint] == [3, 4, 6, 8, 9, 10]  # and every validation checkpoints
    assert due[1] == Due(log=False, validate=False, checkpoint=False)


def test_last_iteration_logs_off_the_interval():
    assert due_at(9, cadence_config(iterations=9)) == Due(log=True, validate=True, checkpoint=True)


class CountingLoop:
    """Steps like TrainLoop: `step` counts completed iterations; records the batches it was given."""

    def __init__(self, cfg, step: int = 0) -> None:
        self.cfg, self.step, self.seen = cfg, step, []

    def train_step(self, labeled, unlabeled=None):
        self.seen.append((labeled, unlabeled))
        self.step += 1
        return {"loss": float(self.step)}


def test_run_steps_resumes_from_the_loop_step_and_draws_both_streams_every_iteration():
    cfg = cadence_config(iterations=6)
    loop = CountingLoop(cfg, step=2)  # resumed at iteration 2
    calls = []
    seconds = run_steps(loop, iter(range(100)), iter(range(100, 200)), lambda m, d: calls.append((m, d)))
    assert loop.seen == [(0, 100), (1, 101), (2, 102), (3, 103)]
    assert [(m["loss"], d) for m, d in calls] == [(float(s), due_at(s, cfg)) for s in range(3, 7)]
    assert seconds >= 0
    supervised = CountingLoop(cfg)
    run_steps(supervised, iter(range(100)), None, lambda m, d: None)
    assert [u for _, u in supervised.seen] == [None] * 6
