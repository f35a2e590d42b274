"""``rtda-export``: the segmenter of a checkpoint as an ONNX file (fp32, fp16 or INT8) with its card (see
:mod:`rtda.pipelines.export`); ``rtda-eval ckpt_path=model.onnx`` scores it."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from rtda.pipelines.evaluate import replay_overrides
from rtda.pipelines.export import export
from rtda.run import config as rtda_config
from rtda.run.console import log_to_the_run
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="export")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> None:
    log_to_the_run()
    export(cfg)


def main() -> None:
    sys.argv = sys.argv[:1] + replay_overrides(sys.argv[1:])
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
