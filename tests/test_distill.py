"""Distillation (adaptation=distill): the KL and CWD losses against hand computations, the frozen teacher kept out
of the student's state and checkpoint (recorded by path and SHA-256), the errors before training, a short demo
run whose checkpoint rtda-eval's segmenter loader takes as any other, and resume refusing a changed teacher."""

import hashlib
import json
import math
import shutil
from functools import partial

import pytest
import torch
from helpers import rtda_eval, rtda_train, run_folder, tiny_overrides
from helpers.lightning import TinyData, trainer
from omegaconf import OmegaConf

from rtda.adaptation.distill import DistillModule, FrozenTeacher, channel_wise_divergence, pixel_kl
from rtda.adaptation.segmenter import SoftmaxEnsemble, segmenter_module
from rtda.data.labels import CLASS_NAMES
from rtda.models.bisenet import BiSeNet
from rtda.run.errors import CheckpointError, ConfigValueError

TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=2", "data.num_workers=0",
        "data.source_size=[36,64]", "data.target_size=[32,64]", "data.eval_batch_size=4", "trainer.log_every_n_steps=1"]


def _softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# -- the losses -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_pixel_kl_is_hintons_per_pixel_mean(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 2, 3, generator=g), torch.randn(2, 3, 2, 3, generator=g) * 2
    pixels = [(n, h, w) for n in range(2) for h in range(2) for w in range(3)]
    by_hand = sum(_kl(_softmax(t[n, :, h, w].tolist(), temperature), _softmax(s[n, :, h, w].tolist(), temperature))
                  for n, h, w in pixels) / len(pixels) * temperature ** 2
    assert pixel_kl(s, t, temperature).item() == pytest.approx(by_hand, rel=1e-5)
    assert pixel_kl(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    # the gradient reaches the student only
    s.requires_grad_(True)
    pixel_kl(s, t, temperature).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_channel_wise_divergence_is_mmrazors():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    tau = 4.0
    # each (n, c) map softmax-normalised over its 4 positions, KL summed, x tau^2, averaged over the N*C maps
    by_hand = sum(_kl(_softmax(t[n, c].flatten().tolist(), tau), _softmax(s[n, c].flatten().tolist(), tau))
                  for n in range(2) for c in range(3)) / 6 * tau ** 2
    assert channel_wise_divergence(s, t, tau).item() == pytest.approx(by_hand, rel=1e-5)
    assert channel_wise_divergence(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    # mmrazor's ChannelWiseDivergence.forward, term for term (loss_weight 1)
    soft_t = torch.softmax(t.view(-1, 4) / tau, dim=1)
    mmrazor = torch.sum(soft_t * torch.log_softmax(t.view(-1, 4) / tau, dim=1)
                        - soft_t * torch.log_softmax(s.view(-1, 4) / tau, dim=1)) * tau ** 2 / (3 * 2)
    assert channel_wise_divergence(s, t, tau).item() == pytest.approx(mmrazor.item(), rel=1e-6)
    # channels_last inputs (the student's memory format) give the same value
    assert channel_wise_divergence(s.to(memory_format=torch.channels_last), t, tau).item() == pytest.approx(by_hand, rel=1e-5)


# -- the teacher ------------------------------------------------------------------------------------------------------
def _student(num_classes=19, **kwargs):
    torch.manual_seed(0)
    opt = partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    return DistillModule(net=BiSeNet(num_classes), optimizer=opt, num_classes=num_classes, num_log_images=0, **kwargs)


@pytest.fixture(scope="module")
def teacher_ckpt(trained_run):
    """The shared trained run's checkpoint (BiSeNet-R18, 19 classes, source-only): the teacher of these tests."""
    return trained_run["folder"] / "checkpoints" / "last.ckpt"


def test_the_teacher_is_frozen_outside_the_state_and_recorded_by_reference(teacher_ckpt, tmp_path):
    module = _student(teacher={"ckpt_path": str(teacher_ckpt)}, lambda_cwd=3.0, mixing=True)
    teacher = module.teacher
    assert isinstance(teacher, FrozenTeacher) and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    assert set(module.state_dict()) == {f"net.{k}" for k in module.net.state_dict()}  # the student only
    assert all(id(p) not in {id(q) for q in teacher.parameters()} for p in module.parameters())
    fit = trainer(tmp_path, max_steps=3, limit_val_batches=0)
    fit.fit(module, datamodule=TinyData())
    assert not teacher.training and module.net.training  # Lightning switched the student, not the teacher
    after = teacher.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    fit.save_checkpoint(tmp_path / "student.ckpt")
    ckpt = torch.load(tmp_path / "student.ckpt", map_location="cpu", weights_only=True)
    assert all(k.startswith("net.") for k in ckpt["state_dict"]) and len(ckpt["state_dict"]) == len(module.state_dict())
    record = ckpt["distill_teacher"]
    assert [r["path"] for r in record] == [str(teacher_ckpt.resolve())]
    assert record[0]["sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()
    assert ckpt["hyper_parameters"]["teacher"]["ckpt_path"] == str(teacher_ckpt)


def test_the_teacher_forward_its_size_and_an_ensemble(teacher_ckpt):
    one = _student(teacher={"ckpt_path": str(teacher_ckpt), "size": [16, 32]}).teacher
    image = torch.randn(2, 3, 32, 64)
    logits = one.logits(image, (32, 64))
    assert logits.shape == (2, 19, 32, 64) and logits.dtype == torch.float32
    two = _student(teacher={"ckpt_path": [str(teacher_ckpt), str(teacher_ckpt)]}).teacher
    assert isinstance(two.net, SoftmaxEnsemble) and len(two.records) == 2
    # an ensemble of one network twice predicts what the network does: its log-probabilities
    plain_teacher = _student(teacher={"ckpt_path": str(teacher_ckpt)}).teacher
    expected = plain_teacher.logits(image, (32, 64)).log_softmax(dim=1)
    assert torch.allclose(two.logits(image, (32, 64)), expected, atol=1e-5)


def test_a_bad_teacher_is_one_clear_error_before_training(teacher_ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"adaptation.teacher.ckpt_path: no such teacher checkpoint: .*nope.ckpt"):
        _student(teacher={"ckpt_path": str(tmp_path / "nope.ckpt")})
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"adaptation.teacher.ckpt_path: .*junk.ckpt is not a PyTorch checkpoint"):
        _student(teacher={"ckpt_path": str(tmp_path / "junk.ckpt")})
    with pytest.raises(CheckpointError, match=r"the teacher is BiSeNet with 19 classes, but the student trains 4 classes"):
        _student(num_classes=4, teacher={"ckpt_path": str(teacher_ckpt)})
    names = list(CLASS_NAMES)
    names[0], names[1] = names[1], names[0]
    with pytest.raises(CheckpointError, match=r"another label space: its class 0 is 'road', the student's is 'sidewalk'"):
        _student(teacher={"ckpt_path": str(teacher_ckpt)}, class_names=names)
    with pytest.raises(ConfigValueError, match=r"adaptation.teacher.precision='fp8'"):
        _student(teacher={"ckpt_path": str(teacher_ckpt), "precision": "fp8"})
    with pytest.raises(ConfigValueError, match=r"adaptation.lambda_kd=-1"):
        _student(teacher={"ckpt_path": str(teacher_ckpt)}, lambda_kd=-1)
    # no teacher at all: the method builds (configs compose and instantiate), training refuses in one line
    module = _student()
    with pytest.raises(ConfigValueError, match=r"adaptation.teacher.ckpt_path is required for adaptation=distill"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=TinyData())


def test_the_command_line_names_a_missing_teacher_before_training(tiny_demo_dir, tmp_path):
    proc = rtda_train(["experiment=demo_distill", f"adaptation.teacher.ckpt_path={tmp_path / 'gone.ckpt'}",
                       *TINY, *tiny_overrides(tiny_demo_dir)], tmp_path)
    assert proc.returncode == 1
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("rtda: error:")]
    assert len(line) == 1 and "adaptation.teacher.ckpt_path: no such teacher checkpoint" in line[0] and "gone.ckpt" in line[0]
    assert not list(tmp_path.glob("outputs/train/runs/*/checkpoints/*.ckpt"))  # nothing trained


# -- end to end -------------------------------------------------------------------------------------------------------
def test_a_demo_distillation_trains_and_its_checkpoint_is_the_student(teacher_ckpt, trained_run, tiny_demo_dir, tmp_path):
    proc = rtda_train(["experiment=demo_distill", f"adaptation.teacher.ckpt_path={teacher_ckpt}", "adaptation.lambda_cwd=3",
                       "adaptation.mixing=true", *TINY, *tiny_overrides(tiny_demo_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_folder(proc.stdout)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["choices"]["adaptation"] == "distill"
    assert results["teacher"][0]["sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()
    metrics = (folder / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("train/loss_kd", "train/loss_cwd", "train/loss_pl", "train/loss_mix", "train/loss_src", "train/loss_seg"):
        assert name in metrics, name
    student = folder / "checkpoints" / "last.ckpt"
    ckpt = torch.load(student, map_location="cpu", weights_only=True)
    source_only = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    assert set(ckpt["state_dict"]) == set(source_only["state_dict"])  # exactly a BiSeNet's weights, no teacher's
    assert ckpt["distill_teacher"][0]["path"] == str(teacher_ckpt.resolve())
    # rtda-eval / rtda-bench's loader takes the student out of it, as out of any method's checkpoint
    paths, module = segmenter_module(OmegaConf.create({"ckpt_path": str(student), "data": {"num_classes": 19}}))
    assert paths == [str(student)] and type(module.net).__name__ == "BiSeNet"
    net_state = module.net.state_dict()
    assert all(torch.equal(net_state[k[len("net."):]], v) for k, v in ckpt["state_dict"].items())
    # rtda-eval scores the student alone (the run's adaptation overrides, the teacher's path, are not replayed)
    scored = rtda_eval([f"ckpt_path={student}", "plot_confusion_matrix=false"], tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads((run_folder(scored.stdout) / "results.json").read_text())["test/mIoU"] == results["test/mIoU"]


def test_resuming_with_a_changed_teacher_fails_clearly(teacher_ckpt, tiny_demo_dir, tmp_path):
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, teacher)
    common = ["experiment=demo_distill", f"adaptation.teacher.ckpt_path={teacher}", "run_name=R",
              *TINY, *tiny_overrides(tiny_demo_dir)]
    first = rtda_train(common, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = torch.load(teacher, map_location="cpu", weights_only=True)  # the teacher's run trained on meanwhile
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1
    torch.save(ckpt, teacher)
    resumed = rtda_train([*common, "trainer.max_steps=4"], tmp_path)
    assert resumed.returncode == 1
    line = [ln for ln in resumed.stderr.splitlines() if ln.startswith("rtda: error:")]
    assert len(line) == 1 and "adaptation.teacher.ckpt_path: the teacher changed since this run started" in line[0]
    shutil.copy(teacher_ckpt, teacher)  # the original teacher back: the run resumes
    again = rtda_train([*common, "trainer.max_steps=4"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "train" / "runs" / "R" / "results.json").read_text())
    assert results["resumed_from"]["iteration"] == 2 and results["status"] == "completed"
    teacher.unlink()  # a teacher gone: one line before anything resumes
    gone = rtda_train([*common, "trainer.max_steps=6"], tmp_path)
    assert gone.returncode == 1 and "no such teacher checkpoint" in gone.stderr
