"""``rtda-predict``: colourised masks and overlays of an image, a folder or a video, from a checkpoint or an
exported ``.onnx`` file (see :mod:`rtda.pipelines.predict`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rtda.pipelines.predict import predict
from rtda.run import config as rtda_config
from rtda.run.errors import exit_on_user_error, run_cli


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="predict")
@exit_on_user_error
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
