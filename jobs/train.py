"""Train CSL with Ray Train: `python jobs/train.py [--config FILE] [--preset NAME] [KEY=VALUE ...]`.

With no arguments this is the embedded default: a local Ray, the built-in dataset (generated once into
~/.cache/csl-ray/builtin), the `tiny` preset on 2 CPU workers; it ends with a result table and the run directory.

    python jobs/train.py
    python jobs/train.py --smoke                                    # a few iterations on 1 worker
    python jobs/train.py --config exp.yaml ray.num_workers=4 ray.use_gpu=true train.name=exp1
    python jobs/train.py --preset pascal --set data.root=/data/pascal --set ray.storage_path=s3://bucket/runs

Re-running with the same `train.name` (and storage) resumes from its newest checkpoint that verifies. On a cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/train.py --config exp.yaml

(`ray job submit` sets RAY_ADDRESS, which the job attaches to, and puts the working dir on every node's
PYTHONPATH; see csl_ray/train.py for the runtime_env's dependencies and where data, checkpoints and outputs live.)
"""

from __future__ import annotations

import argparse

from csl_ray.cli import config_from_arguments, config_parser
from csl_ray.config import ConfigError
from csl_ray.preflight import check_run, usage_error
from csl_ray.train import train


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__, "KEY=VALUE overrides")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_arguments(args)
        check_run(cfg)  # before Ray starts or the run directory is written
    except ConfigError as err:
        usage_error(parser, err)
    train(cfg)


if __name__ == "__main__":
    main()
