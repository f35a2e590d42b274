"""The studies' one-liners from the README, end to end on small trees in the real GTA5/Cityscapes formats."""

import json

import pytest
from helpers import rtda_train, run_folder, run_in_process

from rtda.cli.train import main as train_main
from rtda.data.stats import cached_class_stats

SMALL = ["data.source_size=[36,64]", "data.target_size=[32,64]", "data.batch_size=2", "data.eval_batch_size=2",
         "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2", "model.pretrained=false",
         "logger=none", "callbacks=none"]


@pytest.mark.parametrize("experiment", ["gta5_source_only", "cityscapes_bisenet",
                                        pytest.param("cityscapes_deeplabv2", marks=pytest.mark.slow),
                                        pytest.param("gta5_adversarial_multi", marks=pytest.mark.slow)])
def test_study_runs_on_real_format_trees(experiment, tiny_demo_dir, tmp_path):
    # tiny_demo_dir/demo holds gta5/ and cityscapes/ exactly as the real datasets are laid out
    proc = rtda_train([f"experiment={experiment}", f"paths.data_dir={tiny_demo_dir / 'demo'}", *SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_folder(proc.stdout) / "results.json").read_text())
    assert 0.0 <= results["test/mIoU"] <= 1.0
    # real data from random init is flagged loudly, in the summary too
    assert any("random initialisation" in w for w in results["warnings"])
    assert "WARNING: model.pretrained=false on real data" in proc.stdout


def test_augmentation_sweep_is_one_multirun(tiny_demo_dir, tmp_path):
    proc = rtda_train(["-m", "experiment=gta5_source_only", "augmentation=none,strong", f"paths.data_dir={tiny_demo_dir / 'demo'}",
                       *SMALL], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "outputs" / "train" / "multiruns").glob("*/*/results.json"))
    assert len(results) == 2
    assert {json.loads(r.read_text())["choices"]["augmentation"] for r in results} == {"none", "strong"}


def test_missing_cityscapes_val_names_the_tree(tiny_demo_dir, tmp_path):
    (tmp_path / "gta5").symlink_to(tiny_demo_dir / "demo" / "gta5")
    proc = run_in_process(train_main, ["experiment=gta5_source_only", f"paths.data_dir={tmp_path}", *SMALL],
                    tmp_path)
    assert proc.returncode == 1
    assert f"{tmp_path}/cityscapes/leftImg8bit/val" in proc.stderr and "gtFine/val/CITY" in proc.stderr


@pytest.mark.parametrize("experiment, model", [("cityscapes_stdc1", "stdc1"), ("gta5_pidnet_s_dacs", "pidnet_s"),
                                               ("gta5_ddrnet23_slim_source_only", "ddrnet23_slim"),
                                               ("gta5_daformer", "daformer_mitb5"),
                                               ("gta5_mic_segformer_b1", "segformer_b1")])
def test_a_recipe_from_imagenet_weights_asks_for_the_file_before_training(experiment, model, tiny_demo_dir, tmp_path):
    proc = run_in_process(train_main, [f"experiment={experiment}", f"paths.data_dir={tiny_demo_dir / 'demo'}",
                                       *(o for o in SMALL if not o.startswith("model.pretrained"))], tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtda: error")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "model.pretrained=/path/to/" in errors[0] and "Epoch" not in proc.stdout


@pytest.mark.parametrize("experiment, variant", [("gta5_dacs_segformer_b0", "b0"),
                                                 pytest.param("gta5_mic_daformer", "b0", marks=pytest.mark.slow)])
def test_the_daformer_recipe_runs_on_mit_networks_from_an_imagenet_file(experiment, variant, tiny_demo_dir, tmp_path):
    """DAFormer's recipe end to end on the small trees: an ImageNet MiT file in the NVlabs layout (random values,
    its 1000-class ``head``), the feature distance on the MiT's last stage, no weight decay on its norms, ClassMix
    over the batch, DAFormer's EMA ramp (gta5_mic_daformer: its head on MiT-B0, the B5 encoder is 85 M parameters)."""
    import torch

    from rtda.models.mix_transformer import MixVisionTransformer

    weights = tmp_path / f"mit_{variant}.pth"
    state = MixVisionTransformer(variant).state_dict()
    torch.save({**state, "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}, weights)
    small = [o for o in SMALL if not o.startswith("model.pretrained")]
    proc = rtda_train([f"experiment={experiment}", f"model.variant={variant}", f"model.pretrained={weights}",
                       f"paths.data_dir={tiny_demo_dir / 'demo'}", "augmentation.target.crop.height=32",
                       "augmentation.target.crop.width=64", "data.rcs_min_pixels=20", *small], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_folder(proc.stdout) / "results.json").read_text())
    assert 0.0 <= results["test/mIoU"] <= 1.0
    adaptation = results["config"]["adaptation"]
    assert adaptation["fdist_lambda"] == 0.005 and adaptation["classmix_classes"] == "batch"
    assert adaptation["ema_schedule"] == "daformer"
    assert not any("random initialisation" in w for w in results["warnings"])


def test_class_stats_are_counted_and_cached(tiny_demo_dir, tmp_path):
    import shutil

    root = tmp_path / "cityscapes"
    shutil.copytree(tiny_demo_dir / "demo" / "cityscapes", root)
    stats = cached_class_stats("cityscapes", root, "val", num_workers=0)
    assert stats["images"] == 4
    assert sum(stats["frequency"].values()) == pytest.approx(1.0)
    assert stats["pixels"]["road"] > 0 and stats["images_containing"]["sky"] == 4
    cache = root / "class_stats_val.json"
    assert json.loads(cache.read_text())["pixels"] == stats["pixels"]
    stats["pixels"]["road"] = -1
    cache.write_text(json.dumps(stats))
    assert cached_class_stats("cityscapes", root, "val")["pixels"]["road"] == -1  # served from the cache
