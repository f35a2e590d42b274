"""``rtda-eval``: score one checkpoint, or the softmax average of several, on a target split (see
:mod:`rtda.pipelines.evaluate`); ``pseudo_labels.out=DIR`` writes FDA's pseudo-labels instead."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from rtda.pipelines.evaluate import evaluate, replay_overrides
from rtda.pipelines.pseudo_labels import write_pseudo_labels
from rtda.run import config as rtda_config
from rtda.run.console import log_to_the_run
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="eval")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> float:
    log_to_the_run()
    if cfg.get("pseudo_labels") and cfg.pseudo_labels.get("out"):
        return write_pseudo_labels(cfg)["test/mIoU"]
    return evaluate(cfg)["test/mIoU"]


def main() -> None:
    sys.argv = sys.argv[:1] + replay_overrides(sys.argv[1:])
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
