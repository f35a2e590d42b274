"""Every option of every config group composes, and the parts rtda-train builds from it instantiate."""


import hydra
import pytest
import pytorch_lightning as pl
from helpers import compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from rtda.adaptation.base import build_method
from rtda.run.config import CONFIG_DIR

GROUPS = ["data", "model", "augmentation", "adaptation", "optimizer", "trainer", "logger", "callbacks", "experiment", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_contract_options_exist():
    assert {"demo", "demo_oracle"} <= set(options("data"))
    assert "bisenet_r18" in options("model")
    assert {"none", "geometric", "photometric"} <= set(options("augmentation"))
    assert {"source_only", "adversarial", "minent", "advent", "fda", "fda_ssl", "cyclegan", "dacs", "mic"} <= set(options("adaptation"))
    assert {"gta5_cyclegan", "gta5_cyclegan_source_only", "demo_cyclegan", "demo_cyclegan_source_only"} <= set(options("experiment"))
    assert {"gta5_adversarial", "gta5_adversarial_multi", "gta5_minent", "gta5_advent", "demo_adversarial",
            "demo_minent", "demo_advent", "gta5_fda", "gta5_fda_ssl", "demo_fda", "demo_fda_ssl",
            "gta5_dacs", "gta5_dacs_rcs", "gta5_mic", "gta5_dacs_bisenet", "gta5_dacs_rcs_bisenet", "gta5_mic_bisenet",
            "demo_dacs", "demo_mic"} <= set(options("experiment"))
    assert {"fdr", "overfit", "limit", "profiler"} <= set(options("debug"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g) if not (g == "debug" and o == "default")])
def test_every_option_composes(group, option, tmp_path):
    cfg = compose_config("train", [f"{group}={option}"], output_dir=tmp_path)
    assert cfg.data.num_classes == 19
    if group in ("data", "model", "augmentation", "adaptation", "optimizer"):
        net = hydra.utils.instantiate(cfg.model)
        module = build_method(cfg.adaptation, net=net, optimizer=hydra.utils.instantiate(cfg.optimizer))
        dm = hydra.utils.instantiate(cfg.data, augmentation=cfg.augmentation)
        assert isinstance(module, hydra.utils.get_class(cfg.adaptation._target_)) and dm.num_classes == 19
        assert getattr(module, "net", None) is (net if module.trains_segmenter else None)
    if group in ("logger", "callbacks"):
        for node in [*(cfg.get("logger") or {}).values(), *(cfg.get("callbacks") or {}).values()]:
            target = hydra.utils.get_object(node._target_)  # a class, or a function building a Lightning logger
            expected = target if isinstance(target, type) else (pl.loggers.Logger,)
            assert isinstance(hydra.utils.instantiate(node), expected)
    if group == "trainer" and cfg.trainer.accelerator == "cpu":
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RTDA_DATA_DIR", "/datasets")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert cfg.paths.data_dir == "/datasets"
    assert cfg.data.source.root == "/datasets/demo/gta5"
