"""rtda.analysis.figures: the notebooks' figures draw the numbers they are given (bar heights, images, points, colours)."""

import math

import numpy as np
import pytest
import torch
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from rtda.analysis import compare
from rtda.analysis import figures as viz
from rtda.data.labels import CLASS_NAMES, TRAIN_ID_PALETTE


def bars(ax) -> list[list[float]]:
    """Bar heights of each ax.bar call, in order."""
    return [[r.get_height() for r in c] for c in ax.containers if isinstance(c, BarContainer)]


def images(fig) -> list[np.ndarray]:
    return [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]


class FakeDataset:
    """``load(i)`` like rtda's readers: a constant-colour image and a label of train ids."""

    def __init__(self, n, size, colour, name="img", mark=True):
        self.n, self.size, self.colour, self.name, self.mark = n, size, colour, name, mark

    def __len__(self):
        return self.n

    def load(self, i):
        image = np.zeros((*self.size, 3), dtype=np.uint8)
        image[:] = self.colour
        if self.mark:
            image[0, 0] = i  # tells the samples apart
        label = np.full(self.size, i % 19, dtype=np.uint8)
        label[-1] = 255
        return {"image": image, "label": label, "name": f"{self.name}{i}"}


def test_error_and_gain_maps_colour_each_pixel_by_outcome():
    label = np.array([[0, 1, 2, 255]])
    base = np.array([[0, 0, 2, 3]])
    pred = np.array([[0, 1, 5, 3]])
    err = viz.error_map(label, pred)
    assert [tuple(p) for p in err[0]] == [viz.ERROR_COLOURS[k] for k in ("correct", "correct", "wrong", "ignored")]
    gain = viz.gain_map(label, base, pred)
    assert [tuple(p) for p in gain[0]] == [viz.GAIN_COLOURS[k] for k in ("both right", "fixed", "broken", "ignored")]
    assert tuple(viz.gain_map(np.array([[1]]), np.array([[0]]), np.array([[2]]))[0, 0]) == viz.GAIN_COLOURS["both wrong"]


def test_image_grid_colourises_labels_and_leaves_missing_cells_empty(tmp_path):
    rgb = np.full((4, 8, 3), 7, dtype=np.uint8)
    ids = np.array([[0, 1], [13, 255]], dtype=np.uint8)
    fig = viz.image_grid([[rgb, ids], [rgb]], ["a", "b"], ["r0", "r1"], path=tmp_path / "grid.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    shown = images(fig)
    assert len(shown) == 3
    np.testing.assert_array_equal(shown[1], TRAIN_ID_PALETTE[ids])
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"] and fig.axes[0].get_ylabel() == "r0"
    assert not fig.axes[3].axison  # the missing cell
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_domain_samples_show_each_domain_with_its_labels():
    source = FakeDataset(5, (9, 16), (200, 30, 30))
    target = FakeDataset(3, (8, 16), (90, 90, 90))
    fig = viz.domain_samples(source, target, n=2)
    shown = images(fig)
    assert len(shown) == 8
    np.testing.assert_array_equal(shown[0], source.load(0)["image"])
    np.testing.assert_array_equal(shown[1], viz.colorize(source.load(0)["label"]))
    np.testing.assert_array_equal(shown[4], source.load(4)["image"])  # spread over the dataset: first and last
    np.testing.assert_array_equal(shown[6], target.load(2)["image"])
    assert [ax.get_title() for ax in fig.axes[:4]] == ["source", "source labels", "target", "target labels"]


def test_class_frequencies_bars_are_the_percentages_per_domain():
    freq_a = {n: (0.5 if n == "road" else 0.5 / 18) for n in CLASS_NAMES}
    freq_b = {n: (0.2 if n == "sky" else 0.8 / 18) for n in CLASS_NAMES}
    fig = viz.class_frequencies({"source": {"frequency": freq_a, "images": 3}, "target": {"frequency": freq_b, "images": 2}},
                                CLASS_NAMES)
    ax = fig.axes[0]
    heights = bars(ax)
    assert heights[0] == pytest.approx([100 * freq_a[n] for n in CLASS_NAMES])
    assert heights[1] == pytest.approx([100 * freq_b[n] for n in CLASS_NAMES])
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASS_NAMES)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["source (3 images)", "target (2 images)"]


def test_image_statistics_of_a_constant_image_and_their_plot():
    stats = viz.image_statistics(FakeDataset(2, (16, 32), (100, 150, 200), mark=False), n=None, size=(16, 32), bins=8)
    assert stats["images"] == 2
    assert stats["mean_rgb"] == pytest.approx([100, 150, 200])
    assert stats["brightness"].sum() == pytest.approx(1.0)
    assert stats["brightness"].argmax() == int((0.299 * 100 + 0.587 * 150 + 0.114 * 200) // (255 / 8))
    # a constant image: all the amplitude at frequency 0 (in the first radial bin), none elsewhere
    assert stats["amplitude"][0] > 0.1 and stats["amplitude"][1:] == pytest.approx(0.0, abs=1e-6)
    assert stats["log_amplitude"][8, 16] == pytest.approx(np.log1p(16 * 32 * (0.299 * 100 + 0.587 * 150 + 0.114 * 200)), abs=0.01)
    other = viz.image_statistics(FakeDataset(2, (16, 32), (50, 50, 50)), n=None, size=(16, 32), bins=8)
    fig = viz.plot_image_statistics({"source": stats, "target": other})
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 4
    mean_bars = bars(fig.axes[0])
    assert mean_bars[0] == pytest.approx(list(stats["mean_rgb"])) and mean_bars[1] == pytest.approx(list(other["mean_rgb"]))
    np.testing.assert_allclose(fig.axes[2].lines[0].get_ydata(), stats["amplitude"])
    np.testing.assert_allclose(images(fig)[0], other["log_amplitude"] - stats["log_amplitude"])


def test_fda_stylise_takes_the_target_mean_colour_and_beta_zero_keeps_the_source():
    rng = np.random.default_rng(0)
    source = rng.integers(60, 120, (32, 48, 3)).astype(np.uint8)
    target = rng.integers(140, 200, (20, 40, 3)).astype(np.uint8)  # another size: resized to the source's
    same, styled = viz.fda_stylise(source, target, [0.0, 0.05])
    np.testing.assert_array_equal(same, source)
    # β > 0 swaps the zero-frequency amplitude: the stylised image has the (resized) target's mean colour
    from PIL import Image

    resized = np.asarray(Image.fromarray(target).resize((48, 32), Image.BILINEAR)).reshape(-1, 3).mean(0)
    assert styled.reshape(-1, 3).mean(0) == pytest.approx(resized, abs=1.0)
    fig = viz.fda_examples(FakeDataset(2, (32, 48), (80, 80, 80)), FakeDataset(2, (32, 64), (180, 120, 60)), [0.01, 0.09], n=1)
    assert [ax.get_title() for ax in fig.axes] == ["source", "target (style)", "FDA β=0.01", "FDA β=0.09"]


def test_translation_examples_show_the_generators_output():
    from rtda.models.cyclegan import ResnetGenerator, translate_image

    torch.manual_seed(0)
    generator = ResnetGenerator(3, 3, ngf=4, n_blocks=1).eval()
    source = FakeDataset(3, (20, 36), (120, 60, 30))
    fig = viz.translation_examples(generator, source, n=2, size=(16, 32))
    shown = images(fig)
    assert len(shown) == 4 and shown[0].shape == (16, 32, 3)
    from rtda.data.render import resize_image

    expected = translate_image(generator, torch.from_numpy(resize_image(source.load(0)["image"], (16, 32)).transpose(2, 0, 1).copy())[None])
    np.testing.assert_array_equal(shown[1], expected[0].permute(1, 2, 0).numpy())


def test_prediction_and_error_grids_show_every_method_against_the_baseline():
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    samples = [{"image": np.zeros((2, 2, 3), np.uint8), "label": label, "name": "a",
                "preds": {"source-only": np.array([[0, 0], [0, 0]]), "FDA": np.array([[0, 1], [0, 0]])}}]
    fig = viz.prediction_grid(samples)
    assert [ax.get_title() for ax in fig.axes] == ["target image", "ground truth", "source-only", "FDA"]
    np.testing.assert_array_equal(images(fig)[3], viz.colorize(samples[0]["preds"]["FDA"]))
    fig = viz.error_grid(samples)
    assert [ax.get_title() for ax in fig.axes] == ["target image", "errors: source-only", "errors: FDA", "FDA vs source-only"]
    np.testing.assert_array_equal(images(fig)[3], viz.gain_map(label, samples[0]["preds"]["source-only"], samples[0]["preds"]["FDA"]))
    assert images(fig)[3][0, 1].tolist() == list(viz.GAIN_COLOURS["fixed"])


def test_iou_bars_put_the_miou_first_and_leave_absent_classes_out():
    names = ["road", "sky", "train"]
    fig = viz.iou_bars({"a": {"mIoU": 40.0, "road": 60.0, "sky": 20.0, "train": None},
                        "b": {"road": 80.0, "sky": 40.0, "train": float("nan")}}, names,
                       errors={"a": {"mIoU": 2.0, "road": 1.0, "sky": None, "train": None}})
    ax = fig.axes[0]
    a, b = bars(ax)
    assert a[:3] == [40.0, 60.0, 20.0] and math.isnan(a[3])
    assert b[:3] == [60.0, 80.0, 40.0] and math.isnan(b[3])  # the mIoU of b: mean of its scored classes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["mIoU", *names]
    errorbar = next(c for c in ax.containers if isinstance(c, BarContainer)).errorbar
    segments = errorbar.lines[2][0].get_segments()
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(4.0)  # ± 2 around the mIoU


def test_confusion_matrix_figure_is_row_normalised_and_written_as_a_png(tmp_path):
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    fig = viz.confusion_matrix_figure(cm, ["x", "y", "z"], title="t")
    shown = images(fig)[0]
    np.testing.assert_allclose(shown, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["50", "75"]  # recall of the classes present
    viz.confusion_matrix_figure(cm, ["x", "y", "z"], tmp_path / "cm.png")
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"


def _row(group, miou, std, ious, run_dirs=(), label=None, setting=None):
    row = {"group": group, "mIoU": miou, "mIoU_std": std, "run_dirs": list(run_dirs), "seeds": [],
           "setting": setting or {}, **{f"IoU/{k}": v for k, v in ious.items()}}
    if label:
        row["label"] = label
    return row


def test_miou_bars_draw_the_means_the_stds_and_every_run():
    rows = [_row("adaptation=a", 30.0, 2.0, {}, ["r1", "r2"], label="A"), _row("adaptation=b", 50.0, None, {}, ["r3"])]
    runs = [{"run_dir": "r1", "mIoU": 0.28}, {"run_dir": "r2", "mIoU": 0.32}, {"run_dir": "r3", "mIoU": 0.5}]
    fig = viz.miou_bars(rows, runs)
    ax = fig.axes[0]
    assert [h for c in bars(ax) for h in c] == [30.0, 50.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "adaptation=b"]
    dots = [tuple(p) for coll in ax.collections if isinstance(coll, PathCollection) for p in coll.get_offsets()]
    assert sorted(y for _, y in dots) == pytest.approx([28.0, 32.0, 50.0])


def test_recovery_is_the_drop_and_the_share_won_back_per_class():
    oracle = _row("o", 60.0, None, {"road": 90.0, "sky": 80.0, "train": None})
    source = _row("s", 30.0, None, {"road": 70.0, "sky": 20.0, "train": 5.0})
    fda = _row("f", 40.0, None, {"road": 60.0, "sky": 50.0, "train": 7.0})
    rec = compare.class_recovery(oracle, source, {"FDA": fda}, ["road", "sky", "train"])
    assert rec["drop"] == [20.0, 60.0, None]
    assert rec["recovered"]["FDA"] == [-10.0, 30.0, 2.0]
    assert rec["mIoU_drop"] == 30.0 and rec["mIoU_recovered"] == {"FDA": 10.0}
    fig = viz.recovery_bars(rec)
    drop, fda_bars = bars(fig.axes[0])
    assert drop[:2] == [20.0, 60.0] and math.isnan(drop[2])
    assert fda_bars == [-10.0, 30.0, 2.0]
    assert "recovered by FDA (mIoU +10.0)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_accuracy_vs_fps_places_each_setting_at_its_networks_speed():
    points = [{"label": "source-only", "model": "bisenet_r18", "fps": 100.0, "mIoU": 34.0, "mIoU_std": 1.5},
              {"label": "FDA", "model": "bisenet_r18", "fps": 100.0, "mIoU": 42.0, "mIoU_std": None},
              {"label": "DeepLab", "model": "deeplabv2_r101", "fps": 3.5, "mIoU": 40.0}]
    fig = viz.accuracy_vs_fps(points, real_time_fps=30)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    centres = [(c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0]) for c in ax.containers
               if isinstance(c, ErrorbarContainer)]
    assert centres == [(100.0, 34.0), (100.0, 42.0), (3.5, 40.0)]
    assert any(list(line.get_xdata()) == [30, 30] for line in ax.lines)  # the real-time line
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["source-only [bisenet_r18]", "FDA [bisenet_r18]",
                                                                    "DeepLab [deeplabv2_r101]"]


def test_class_legend_names_every_class_in_its_colour():
    fig = viz.class_legend(CLASS_NAMES)
    legend = fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(CLASS_NAMES)
    colours = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    assert colours == [tuple(int(v) for v in TRAIN_ID_PALETTE[i]) for i in range(19)]
