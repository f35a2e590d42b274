"""``rtda-stream``: segment a stream while adapting online (see :mod:`rtda.pipelines.stream`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rtda.pipelines.stream import stream
from rtda.run import config as rtda_config
from rtda.run.console import log_to_the_run
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="stream")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> float | None:
    log_to_the_run()
    return stream(cfg).get("mIoU")


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
