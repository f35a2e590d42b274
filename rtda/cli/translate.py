"""``rtda-translate``: a translated copy of the source dataset in the GTA5 format, labels byte-identical
(see :mod:`rtda.pipelines.translate`)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from rtda.pipelines.translate import replay_data_overrides, translate
from rtda.run import config as rtda_config
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="translate")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    translate(cfg)


def main() -> None:
    sys.argv = sys.argv[:1] + replay_data_overrides(sys.argv[1:])
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
