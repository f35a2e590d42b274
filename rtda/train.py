"""``rtda-train``: seed, build data / network / method / trainer from the Hydra config, fit, test, summarise.

    rtda-train                                     # source-only BiSeNet-R18 on the built-in demo pair
    rtda-train experiment=demo_oracle              # trained on the target's labels: the upper bound
    rtda-train -m augmentation=none,geometric      # a sweep, one run folder per job
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from rtda import config as rtda_config
from rtda.results import format_summary, test_summary

log = logging.getLogger("rtda")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``auto`` -> this run folder's ``checkpoints/last.ckpt`` when present (resume after preemption)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        last = output_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    return ckpt_path


def random_init_warning(cfg: DictConfig) -> str | None:
    """Real data with a randomly initialised network: the most common cause of far-too-low baselines."""
    pretrained = cfg.model.get("pretrained")
    real_data = cfg.data.get("prepare") is None  # the built-in demo is generated; real datasets are not
    if real_data and (pretrained is None or pretrained is False or str(pretrained).lower() == "false"):
        return ("model.pretrained=false on real data: the network trains from random initialisation and will "
                "score far below the references. Use model.pretrained=true (torchvision ImageNet weights) or a file.")
    return None


def method_strategy(strategy, module) -> dict:
    """``{"strategy": ...}`` with the options the method needs (``module.strategy_options``, e.g. DDP's
    ``find_unused_parameters`` for adversarial methods) applied to a named DDP strategy, so the user never
    has to know them; ``{}`` (keep the trainer config's strategy) when the method needs none."""
    options = dict(getattr(module, "strategy_options", None) or {})
    if not options or not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return {}
    from pytorch_lightning.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        raise ValueError(f"trainer.strategy={strategy!r}: expected one of {sorted(StrategyRegistry)}")
    entry = StrategyRegistry[strategy]
    return {"strategy": entry["strategy"](**{**entry["init_params"], **options})}


def train(cfg: DictConfig) -> dict:
    """Run one experiment; returns the results written to ``results.json``."""
    import pytorch_lightning as pl

    output_dir = Path(cfg.paths.output_dir)
    warnings_seen = [w for w in [random_init_warning(cfg)] if w]
    for warning in warnings_seen:
        log.warning(warning)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data, augmentation=cfg.get("augmentation"))
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.adaptation, net=net, optimizer=hydra.utils.instantiate(cfg.optimizer))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # saved in every checkpoint: the resolved config (what the weights need) and the command line that made
    # it (so rtda-eval can recompose the run's data with today's paths)
    module.run_config = {"config": resolved, "overrides": rtda_config.overrides(), "choices": rtda_config.choices()}

    loggers = list(rtda_config.instantiate_dict(cfg.get("logger")).values())
    callbacks = list(rtda_config.instantiate_dict(cfg.get("callbacks")).values())
    if not loggers:  # LearningRateMonitor refuses to run without a logger; nothing to monitor into
        callbacks = [cb for cb in callbacks if not isinstance(cb, pl.callbacks.LearningRateMonitor)]
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                  **method_strategy(cfg.trainer.get("strategy"), module))
    revision = _git_revision()
    for logger in loggers:
        logger.log_hyperparams({**resolved, "git_revision": revision})

    ckpt_cb = trainer.checkpoint_callback
    tested = None
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_path(cfg.get("ckpt_path"), output_dir))
            if ckpt_cb is not None and ckpt_cb.dirpath:
                # last.ckpt = the final weights, even when training stopped between two validations
                tested = str(Path(ckpt_cb.dirpath) / "last.ckpt")
                trainer.save_checkpoint(tested)
        elif cfg.get("ckpt_path"):
            tested = resolve_ckpt_path(cfg.ckpt_path, output_dir)
        best = getattr(ckpt_cb, "best_model_path", "") or None
        if cfg.get("test", True):
            test_ckpt = None  # the weights in memory: the final ones, or those loaded below
            if cfg.get("test_ckpt") == "best" and best:
                test_ckpt = tested = best
            elif not cfg.get("train", True) and tested:
                test_ckpt = tested
            trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, weights_only=False)
    finally:
        for logger in loggers:
            logger.finalize("success")

    best_score = getattr(ckpt_cb, "best_model_score", None) if ckpt_cb else None
    results = {
        "experiment": rtda_config.describe(cfg),
        "choices": rtda_config.choices(),
        "run_dir": str(output_dir.resolve()),
        "git_revision": revision,
        "test": test_summary(trainer.callback_metrics, module.class_names),
        "best_val_mIoU": None if best_score is None else float(best_score),
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "checkpoint": str(Path(tested).resolve()) if tested and Path(tested).is_file() else None,
        "tested_weights": cfg.get("test_ckpt", "last"),
        "warnings": warnings_seen,
    }
    if results["test"]:
        results["test/mIoU"] = results["test"]["mIoU"]
    if module.test_results:  # not filled in this process under ddp_spawn
        results["test/confmat"] = module.test_results["confmat"]
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(format_summary(results))
    return results


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="train")
@rtda_config.report_user_errors
def _hydra_main(cfg: DictConfig) -> float | None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    results = train(cfg)
    metric = cfg.get("optimized_metric")
    value = results.get("best_val_mIoU") if metric == "val/mIoU" else results.get(metric)
    if value is None:
        value = results.get("test/mIoU")
    return None if value is None or math.isnan(value) else float(value)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
