"""CycleGAN (Zhu et al., ICCV 2017) as the first stage of a two-stage adaptation: learn the source → target
image translation, write a translated copy of the source (``rtda-translate method=cyclegan``), then train
any segmenter and method on it (``data.source.root=<copy>``; Transfer-Learning-Library's GTA5 recipe:
47.0 mIoU with DeepLabV2-R101 against 36.6 source-only).

**No segmenter.** :class:`CycleGANModule` trains two generators (``g_s2t``: source → target, ``g_t2s``) and
two PatchGAN discriminators (``d_s`` on source-domain images, ``d_t`` on target-domain ones) on unpaired
source / target images; nothing is segmented. It is a :class:`rtda.adaptation.base.TrainingModule` that does not train a segmenter (``trains_segmenter``
is False), which ``rtda-train`` reads:
it builds no network from the ``model`` group (that group and ``optimizer`` are unused: the translator's
Adam settings live here), runs no validation or test (the target labels have nothing to score), keeps
checkpoints every ``trainer.val_check_interval`` iterations without a monitor, and its ``results.json`` lists
what the run leaves instead of a mIoU: checkpoints, sample translations, the final losses.

**Losses** (the authors' ``cycle_gan_model.py``; A = source, B = target): generators, discriminators frozen —
``LS(D_t(G_s2t(s)), 1) + LS(D_s(G_t2s(t)), 1) + λ·|G_t2s(G_s2t(s)) − s|₁ + λ·|G_s2t(G_t2s(t)) − t|₁ +
λ·λ_idt·(|G_s2t(t) − t|₁ + |G_t2s(s) − s|₁)`` with LS the least-squares GAN loss (mean squared error to the
label on raw PatchGAN scores), λ = 10 (``lambda_A = lambda_B``), λ_idt = 0.5; then discriminators on
detached fakes drawn through a 50-image :class:`ImagePool` each: ``½·(LS(D_t(t), 1) + LS(D_t(pool_t(fake_t)), 0))``
and the same for ``D_s``. One iteration = the generators' Adam step, then the discriminators' — two
optimizers stepped with :meth:`TrainingModule.step_optimizer`, so ``trainer.max_steps`` and every
interval count iterations.

**Schedule**: Adam lr 2e-4, betas (0.5, 0.999) for both; the learning rate is constant, then decays linearly
to 0. The authors count epochs (``n_epochs`` 100 constant + ``n_epochs_decay`` 100 on 1–2k-image sets;
Transfer-Learning-Library: 20 + 20 epochs of 5,000 iterations); rtda counts iterations: constant for
``max_steps − decay_iters``, then ``lr·(1 − k / decay_iters)`` over the last ``decay_iters`` (null: half the
run, as both references), reaching 0 after the last iteration (the authors' epoch rule stops at 1/101).

**Images in [-1, 1]**: the authors' ``Normalize((0.5,)*3, (0.5,)*3)``; this method's :meth:`normalize`
replaces the ImageNet normalisation of the segmentation methods (batches still arrive as 0–255 uint8).

**Differences on purpose**: the pool is not saved in checkpoints: a resumed run (``ckpt_path=auto``) restarts
with empty pools, which refill within 50 iterations (at batch 1) — the authors' ``--continue_train`` does the
same. Under DDP each process keeps its own pools (the authors run one process). The authors zero the
discriminators' gradients before their phase only; here each phase zeroes its own optimizer, the same updates.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rtda.adaptation.base import TrainingModule
from rtda.adaptation.gan_losses import ls_gan_loss
from rtda.models.cyclegan import PatchDiscriminator, ResnetGenerator, to_uint8
from rtda.run.checkpoints import load_checkpoint
from rtda.run.errors import CheckpointError, ConfigValueError

log = logging.getLogger("rtda")


class ImagePool:
    """The authors' history of generated images (Shrivastava et al., 2017): the discriminator sees a mix of
    the newest fakes and older ones, which damps the oscillation of the adversarial game.

    :meth:`query` takes a batch; per image: while fewer than ``size`` images are stored, the image is stored
    and returned; once full, with probability ½ a random stored image is returned and replaced by the new one,
    otherwise the new one is returned (and not stored). ``size`` 0 returns the batch as it is. Draws come from
    ``generator`` (a ``torch.Generator``; seeded by ``seed_everything`` through the global RNG when None).
    """

    def __init__(self, size: int = 50, generator: torch.Generator | None = None):
        if size < 0:
            raise ConfigValueError(f"adaptation.pool_size={size}: expected an integer >= 0")
        self.size = size
        self.generator = generator
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif float(torch.rand((), generator=self.generator)) > 0.5:
                index = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[index])
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)


def linear_decay_lambda(total_iters: int, decay_iters: int):
    """LR factor after ``k`` iterations: 1 for the first ``total − decay`` iterations, then ``1 − (k − start) / decay``,
    0 after the last."""
    start = total_iters - decay_iters

    def factor(k: int) -> float:
        return max(0.0, 1.0 - max(0, k - start) / decay_iters)

    return factor


class CycleGANModule(TrainingModule):
    """Two generators and two discriminators trained on unpaired source and target images (no segmenter).

    Args:
        ngf, ndf: widths of the generators and the discriminators (64, 64).
        n_blocks: the generators' residual blocks (the authors: 9 for ≥256 px training images, 6 for 128 px).
        n_layers_d: the PatchGAN's stride-2 layers (3: 70×70 patches).
        lambda_cycle: λ of both cycle-consistency terms (the authors' ``lambda_A = lambda_B = 10``).
        lambda_identity: the identity term's weight relative to λ (0.5; 0 switches it off).
        pool_size: images kept per discriminator's :class:`ImagePool` (50; 0: no history).
        lr, betas: Adam of the generators and of the discriminators (2e-4, (0.5, 0.999)).
        decay_iters: iterations of the final linear decay to 0 (null: half of ``trainer.max_steps``).
        init_gain: σ of the N(0, σ) weight initialisation (0.02).
        num_samples: source images whose translations are saved as ``source | translated | cycled`` rows.
        sample_interval: save them every this many iterations (null: ``trainer.val_check_interval``) and at the end.
        channels_last: NHWC memory format for the four networks and their inputs.
        gradient_clip_val: clip each optimizer's gradient norm (:class:`rtda.adaptation.base.TrainingModule`).
    """

    uses_target_images = True
    picture_options = ("num_samples",)
    learning_rate_options = ("lr",)
    checkpoint_hint = ("it is a CycleGAN translator: rtda-translate method=cyclegan ckpt_path={path} out=<folder> "
                       "writes the translated source")
    # each phase leaves the other phase's networks without gradients: DDP must not wait for them
    strategy_options = {"find_unused_parameters": True}

    def __init__(self, ngf: int = 64, ndf: int = 64, n_blocks: int = 9,
                 n_layers_d: int = 3, lambda_cycle: float = 10.0, lambda_identity: float = 0.5, pool_size: int = 50,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), decay_iters: int | None = None,
                 init_gain: float = 0.02, num_samples: int = 4, sample_interval: int | None = None,
                 channels_last: bool = False, gradient_clip_val: float | None = None):
        for key, value in (("ngf", ngf), ("ndf", ndf), ("n_layers_d", n_layers_d)):
            if not isinstance(value, int) or value < 1:
                raise ConfigValueError(f"adaptation.{key}={value!r}: expected a positive integer")
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise ConfigValueError(f"adaptation.n_blocks={n_blocks!r}: expected an integer >= 0 (the authors: 9, or 6 for 128 px)")
        if lr <= 0 or lambda_cycle < 0 or lambda_identity < 0:
            raise ConfigValueError(f"adaptation: lr={lr}, lambda_cycle={lambda_cycle}, lambda_identity={lambda_identity}: "
                                   "expected lr > 0 and non-negative weights")
        if decay_iters is not None and (not isinstance(decay_iters, int) or decay_iters < 1):
            raise ConfigValueError(f"adaptation.decay_iters={decay_iters!r}: expected a positive number of iterations or null")
        super().__init__(gradient_clip_val=gradient_clip_val, channels_last=channels_last)
        self.configure_models()
        self.automatic_optimization = False
        self.pool_s = ImagePool(pool_size)  # fake source-domain images (G_t2s(t)) for D_s
        self.pool_t = ImagePool(pool_size)  # fake target-domain images (G_s2t(s)) for D_t
        self.sample_images: list[torch.Tensor] = []  # the first num_samples source images, kept on the CPU
        self.sample_files: list[str] = []
        self._sampled_at = -1

    def configure_models(self) -> None:
        hp = self.hparams
        self.g_s2t = ResnetGenerator(3, 3, hp.ngf, hp.n_blocks, hp.init_gain)
        self.g_t2s = ResnetGenerator(3, 3, hp.ngf, hp.n_blocks, hp.init_gain)
        self.d_s = PatchDiscriminator(3, hp.ndf, hp.n_layers_d, hp.init_gain)
        self.d_t = PatchDiscriminator(3, hp.ndf, hp.n_layers_d, hp.init_gain)
        if hp.channels_last:
            for m in (self.g_s2t, self.g_t2s, self.d_s, self.d_t):
                m.to(memory_format=torch.channels_last)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Source-domain images in [-1, 1] → their target-style translations in [-1, 1]."""
        return self.g_s2t(image)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """0–255 → [-1, 1] (the authors' normalisation), in the networks' memory format."""
        return self.to_memory_format(image.float() / 127.5 - 1.0)

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> dict:
        real_s, real_t = batch["source"]["image"], batch["target"]["image"]
        opt_g, opt_d = self.optimizers()
        hp = self.hparams
        self.keep_samples(real_s)

        # (a) the generators, discriminators frozen
        with self.toggled_optimizer(opt_g):
            opt_g.zero_grad()
            fake_t = self.g_s2t(real_s)
            rec_s = self.g_t2s(fake_t)
            fake_s = self.g_t2s(real_t)
            rec_t = self.g_s2t(fake_s)
            parts = {
                "loss_gan/s2t": ls_gan_loss(self.d_t(fake_t), True),
                "loss_gan/t2s": ls_gan_loss(self.d_s(fake_s), True),
                "loss_cycle/s": F.l1_loss(rec_s, real_s) * hp.lambda_cycle,
                "loss_cycle/t": F.l1_loss(rec_t, real_t) * hp.lambda_cycle,
            }
            if hp.lambda_identity > 0:
                parts["loss_idt/t"] = F.l1_loss(self.g_s2t(real_t), real_t) * hp.lambda_cycle * hp.lambda_identity
                parts["loss_idt/s"] = F.l1_loss(self.g_t2s(real_s), real_s) * hp.lambda_cycle * hp.lambda_identity
            loss_g = sum(parts.values())
            self.manual_backward(loss_g)
        self.step_optimizer(opt_g)

        # (b) the discriminators on real images and pooled, detached fakes
        with self.toggled_optimizer(opt_d):
            opt_d.zero_grad()
            pooled_s = self.pool_s.query(fake_s.detach())
            pooled_t = self.pool_t.query(fake_t.detach())
            parts["loss_d/s"] = 0.5 * (ls_gan_loss(self.d_s(real_s), True) + ls_gan_loss(self.d_s(pooled_s), False))
            parts["loss_d/t"] = 0.5 * (ls_gan_loss(self.d_t(real_t), True) + ls_gan_loss(self.d_t(pooled_t), False))
            loss_d = parts["loss_d/s"] + parts["loss_d/t"]
            self.manual_backward(loss_d)
        self.step_optimizer(opt_d)

        losses = {k: v.detach() for k, v in parts.items()}
        losses["loss_g"], losses["loss_d"] = loss_g.detach(), loss_d.detach()
        losses["loss"] = losses["loss_g"] + losses["loss_d"]
        return losses

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)  # stops at a non-finite loss first
        if self.iteration % self.sample_every() == 0 or self.iteration >= self.max_iterations():
            self.save_samples()

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._sampled_at != self.iteration:  # stopped between two intervals
            self.save_samples()

    # -- optimisation ---------------------------------------------------------------------------
    def decay_iterations(self) -> int:
        total = self.max_iterations()
        decay = self.hparams.decay_iters or max(total // 2, 1)
        if decay > total:
            raise ConfigValueError(f"adaptation.decay_iters={decay} exceeds the run's {total} iterations (trainer.max_steps)")
        return decay

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.Adam(itertools.chain(self.g_s2t.parameters(), self.g_t2s.parameters()), lr=hp.lr,
                                 betas=tuple(hp.betas))
        opt_d = torch.optim.Adam(itertools.chain(self.d_s.parameters(), self.d_t.parameters()), lr=hp.lr,
                                 betas=tuple(hp.betas))
        factor = linear_decay_lambda(self.max_iterations(), self.decay_iterations())
        return [{"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                    "interval": "step", "frequency": 1}} for opt in (opt_g, opt_d)]

    # -- sample translations ----------------------------------------------------------------------
    def sample_every(self) -> int:
        if self.hparams.sample_interval:
            return int(self.hparams.sample_interval)
        interval = getattr(self.trainer, "val_check_interval", None)
        if isinstance(interval, int) and interval > 0:
            return interval
        return max(int(getattr(self.trainer, "val_check_batch", 0) or 0), 1) if interval else self.max_iterations()

    def keep_samples(self, images: torch.Tensor) -> None:
        """Keep the first ``num_samples`` source images seen (normalised, on the CPU): the rows every sample
        panel of the run shows, so panels of successive intervals compare the same images."""
        for image in images[: max(self.hparams.num_samples - len(self.sample_images), 0)]:
            self.sample_images.append(image.detach().float().cpu().contiguous())

    @torch.no_grad()
    def sample_panel(self) -> np.ndarray | None:
        """``source | translated | cycled`` rows (uint8 H×W×3) of the kept source images."""
        if not self.sample_images:
            return None
        rows = []
        for image in self.sample_images:
            real = self.to_memory_format(image[None].to(self.device))
            fake = self.g_s2t(real)
            rec = self.g_t2s(fake)
            row = torch.cat([to_uint8(x[0]) for x in (real, fake, rec)], dim=-1)  # side by side
            rows.append(row.permute(1, 2, 0).cpu().numpy())
        width = max(r.shape[1] for r in rows)
        return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)

    def save_samples(self) -> None:
        """The panel as ``<run>/samples/translations_step<N>.png``, and to W&B when it logs (global rank 0)."""
        self._sampled_at = self.iteration
        if self.trainer is None or not self.trainer.is_global_zero or not self.hparams.num_samples:
            return
        grid = self.sample_panel()
        if grid is None:
            return
        folder = Path(self.trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"translations_step{self.iteration:06d}.png"
        Image.fromarray(grid).save(path)
        if str(path) not in self.sample_files:
            self.sample_files.append(str(path))
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="train/translations", images=[grid], step=self.global_step,
                                 caption=["source | translated | cycled"])

    def run_results(self, trainer) -> dict:
        """What the run leaves, for ``results.json`` (in place of a mIoU), and the summary's lines about it."""
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        note = ("no segmenter: no mIoU. This run trained a CycleGAN translator; write the translated source with "
                "rtda-translate method=cyclegan ckpt_path=<checkpoint> out=<folder>, then train on it with "
                "data.source.root=<folder>")
        summary = [note] + ([f"sample translations: {self.sample_files[-1]}"] if self.sample_files else [])
        return {"note": note, "summary": summary, "samples": self.sample_files, "final_losses": losses}


#: the source → target generator's keys in the module's state dict
GENERATOR_KEY = "g_s2t."


def load_generator(path: str, device: torch.device) -> torch.nn.Module:
    """The source → target generator of an ``adaptation=cyclegan`` checkpoint (loaded with ``weights_only``)."""
    ckpt = load_checkpoint(path)
    state = {k[len(GENERATOR_KEY):]: v for k, v in ckpt["state_dict"].items() if k.startswith(GENERATOR_KEY)}
    adaptation = ckpt["rtda"]["config"].get("adaptation", {})
    if not state:
        method = str(adaptation.get("_target_", "?")).rsplit(".", 1)[-1]
        raise CheckpointError(f"ckpt_path={path} holds no CycleGAN generator (it was trained by {method}): "
                              "train a translator with rtda-train adaptation=cyclegan")
    generator = ResnetGenerator(3, 3, ngf=int(adaptation.get("ngf", 64)), n_blocks=int(adaptation.get("n_blocks", 9)))
    try:
        generator.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"ckpt_path={path}: its generator weights do not fit the generator its config describes "
                              f"(ngf {adaptation.get('ngf')}, n_blocks {adaptation.get('n_blocks')}): "
                              f"{str(err).splitlines()[1].strip()}") from None
    return generator.to(device).eval()
