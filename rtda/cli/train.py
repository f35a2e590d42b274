"""``rtda-train``: seed, build data / network / method / trainer from the Hydra config, fit, test, summarise.

    rtda-train                                     # source-only BiSeNet-R18 on the built-in demo pair
    rtda-train experiment=demo_oracle              # trained on the target's labels: the upper bound
    rtda-train -m augmentation=none,geometric      # a sweep, one run folder per job
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rtda.pipelines.train import optimized_value, run_job
from rtda.run import config as rtda_config
from rtda.run.console import log_to_the_run
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="train")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> float | None:
    log_to_the_run()
    return optimized_value(cfg, run_job(cfg))


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
