"""``rtda-bench bench.mode=train``: seconds per training iteration of each method, against a plain PyTorch loop.

    rtda-bench bench.mode=train                                         # source-only + the plain loop
    rtda-bench bench.mode=train bench.methods=[source_only,advent,fda,dacs,mic]   # one interleaved table
    rtda-bench bench.mode=train model=deeplabv2_r101 bench.device=cuda bench.precision=bf16 bench.train_batch_size=2

Every method row runs rtda's real training path: the method's LightningModule built from its config
(``conf/adaptation/<name>.yaml``, with ``optimizer=``/``model=``) and fitted by a Lightning ``Trainer``
(logging, the per-iteration non-finite check, the batch hooks: FDA's swap, DACS's mixing, normalisation on
the device) on synthetic batches held in memory — ``{"source": {image, label}, "target": {image, label}}``,
uint8 images of ``bench.train_batch_size x 3 x bench.height x bench.width`` as the data loaders deliver them and
blocky random labels — so data loading is not what is timed (``bench.mode=data`` measures that). The
``plain`` row is source-only as one would write it by hand: the same network, memory format, loss (cross-entropy
plus the deep-supervision heads), SGD with the same parameter groups and a poly ``LambdaLR``, the same
batches, in a bare ``for`` loop. Its ratio to the source-only row is the framework's overhead.

One iteration is the time between the starts of two consecutive iterations (all of it: batch fetch,
transfer hooks, forward, backward, optimizer steps, logging, Lightning's loop), synchronised on CUDA. Rows
are interleaved: every round runs each row for ``bench.train_iterations`` timed iterations (after one
warm-up iteration per round; a new ``Trainer`` per round, its set-up not timed), so a noisy machine slows
all rows alike; median and p90 are over every timed iteration. FLOPs are those of whole iterations
(forward and backward of every network the method runs; the teacher's no-grad passes, DACS's blur too)
counted by ``torch.utils.flop_counter`` over iterations 2-5 of a separate short fit and averaged (methods
draw random branches); FFTs, EMA updates, element-wise ops and optimizer updates count no FLOPs.
``images_per_s`` counts source images (a method reading the target takes as many target images again).
Networks start from random initialisation, so that training on random labels stays finite every rate is
multiplied by ``bench.lr_scale`` (1e-3: at its real rate DeepLabV2's gradient norm is ~6e3 at the first
iteration and the loss is NaN by the fourth; the arithmetic is the same at any rate) and frozen BatchNorm
(DeepLabV2) is calibrated on a synthetic batch (:func:`calibrate_frozen_batchnorm`). ``adaptation.<key>=…`` overrides apply
to the methods that have the key (listed in the row's ``note``). ``time_ratio`` is a row's median over source-only's,
``flop_ratio`` its FLOPs over source-only's, ``overhead`` their quotient: the share of a method's extra time that
its extra arithmetic does not explain. ``peak_mem_MB`` is what a row needs: its networks' weights, buffers and
optimizer state plus the peak of what its iterations allocate above that (activations, gradients,
temporaries) — the CUDA allocator's peak on the GPU; on the CPU the growth of the process's peak resident
memory (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) over the round.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

from rtda.adaptation.base import build_method, method_class, poly_lambda, trains_segmenter
from rtda.data.normalization import normalize
from rtda.models.frozen_bn import FrozenBatchNorm2d
from rtda.models.losses import loss_terms, total_loss
from rtda.run.errors import ConfigValueError, TrainingDiverged, one_line

log = logging.getLogger("rtda")

#: bench.precision -> Lightning's trainer.precision
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
#: method options that save pictures or log images: off while timing
TRAIN_COLUMNS = ["method", "variant", "model", "device", "precision", "input", "params_M", "GFLOPs_per_it",
                 "median_s", "mean_s", "p90_s", "images_per_s", "time_ratio", "flop_ratio", "overhead", "vs_plain",
                 "peak_mem_MB", "iterations", "note"]


# -- synthetic batches ------------------------------------------------------------------------------
def _blocky_labels(n: int, height: int, width: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Random class regions (16x16-pixel blocks, ~5 % ignore), as a segmentation label looks to ClassMix."""
    bh, bw = -(-height // 16), -(-width // 16)
    coarse = torch.randint(0, num_classes, (n, bh, bw), generator=generator)
    coarse[torch.rand(n, bh, bw, generator=generator) < 0.05] = 255
    return coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :height, :width].contiguous()


class SyntheticBatches(torch.utils.data.Dataset):
    """``length`` copies of one training sample (uint8 images, int64 labels), collated by a DataLoader as
    the real datasets are."""

    def __init__(self, height: int, width: int, num_classes: int, length: int, seed: int = 0,
                 target: bool = True, target_label: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.length = length
        self.sample = {
            domain: {"image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g),
                     "label": _blocky_labels(1, height, width, num_classes, g)[0]}
            for domain in ("source", "target")
        }
        # what the data module would deliver: no target loader for source-only, target labels only for a method
        # training on (pseudo-)labelled target images; the same pixels whatever is kept
        if not target:
            del self.sample["target"]
        elif not target_label:
            del self.sample["target"]["label"]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {d: {k: v.clone() for k, v in s.items()} for d, s in self.sample.items()}


def synthetic_loader(b: DictConfig, num_classes: int, iterations: int, module=None) -> torch.utils.data.DataLoader:
    """``iterations`` batches of ``bench.train_batch_size`` synthetic samples, with a target batch (and target
    labels) only when ``module`` reads them."""
    dataset = SyntheticBatches(b.height, b.width, num_classes, iterations * b.train_batch_size,
                               target=bool(getattr(module, "uses_target_images", False)),
                               target_label=bool(getattr(module, "uses_target_labels", False)))
    return torch.utils.data.DataLoader(dataset, batch_size=b.train_batch_size, shuffle=False, num_workers=0,
                                       pin_memory=torch.device(b.device).type == "cuda")


@torch.no_grad()
def calibrate_frozen_batchnorm(net: torch.nn.Module, image: torch.Tensor) -> None:
    """Set every frozen BatchNorm's statistics to those of its input on ``image``, layer after layer (one
    forward pass). DeepLabV2 freezes its BatchNorm on ImageNet statistics; from random initialisation (the
    benchmark downloads nothing) unnormalised activations overflow within a few iterations, and training on
    inf/NaN is neither what a run computes nor timed alike. A no-op for networks without frozen BatchNorm."""
    def set_stats(layer, inputs):
        x = inputs[0].float()
        layer.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        layer.running_var.copy_(x.var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(set_stats) for m in net.modules() if isinstance(m, FrozenBatchNorm2d)]
    if not hooks:
        return
    was_training = net.training
    try:
        net.eval()(image)
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()


def build_net(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """``model=`` from random initialisation, frozen BatchNorm calibrated on a synthetic batch."""
    net = hydra.utils.instantiate(cfg.model, pretrained=False)
    sample = SyntheticBatches(cfg.bench.height, cfg.bench.width, cfg.data.num_classes, 1, target=False)[0]
    calibrate_frozen_batchnorm(net, normalize(sample["source"]["image"][None].repeat(2, 1, 1, 1)))
    return net.to(device)


# -- clocks -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak memory over a stretch of work: the CUDA allocator's peak, or the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs; without it, the process's lifetime peak, marked so)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = True
        self.at_start = 0.0

    def start(self) -> None:
        """Begin a stretch: reset the peak and note what is in use already (the other rows' networks). On the
        CPU, memory the C allocator keeps from earlier rows goes back to the system first (``malloc_trim``),
        so that this row's allocations show as resident memory it adds."""
        import gc

        gc.collect()  # the previous round's trainer, optimizers and graphs (reference cycles)
        if self.device.type == "cpu":
            _malloc_trim()
        self.reset()
        self.at_start = self.current_mb()

    def increase_mb(self) -> float | None:
        """Peak since :meth:`start` above what was in use then: the stretch's working memory (activations,
        gradients, temporaries)."""
        peak = self.peak_mb()
        if peak is None or not self.resettable:  # a lifetime peak says nothing of this stretch
            return None
        return max(peak - self.at_start, 0.0)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def current_mb(self) -> float:
        """Memory in use now (allocated on CUDA, resident on the CPU)."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        resident = _proc_status_mb("VmRSS")
        return 0.0 if resident is None else resident

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_status_mb("VmHWM")
        if peak is not None:
            return peak
        import resource

        self.resettable = False
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class IterationClock(pl.Callback):
    """Start time of every training iteration and the end of training; the memory peak over the round."""

    def __init__(self, device: torch.device, memory: PeakMemory):
        self.device, self.memory = device, memory
        self.stamps: list[float] = []
        self.peak: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        if len(self.stamps) == 1:  # at the warm-up iteration: it pays for the pages the trim gives back
            self.memory.start()

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        self.peak = self.memory.increase_mb()


#: iterations whose FLOPs are averaged (after a first one): methods draw random branches (DACS's blur, jitter)
FLOP_ITERATIONS = 4


class CountFlops(pl.Callback):
    """FLOPs per training iteration, averaged over :data:`FLOP_ITERATIONS` whole iterations (from the end of
    the first to the end of the last: batch transfer, the method's batch transform, forward, backward, steps)."""

    def __init__(self):
        self.counter: FlopCounterMode | None = None
        self.flops = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()
        elif batch_idx == FLOP_ITERATIONS:
            self.close()

    def close(self) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops = int(self.counter.get_total_flops()) // FLOP_ITERATIONS
            self.counter = None


def _tensor_mb(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / 2**20


# -- rows -------------------------------------------------------------------------------------------
def _timed_intervals(stamps: list[float]) -> list[float]:
    """Iteration times from start stamps (+ the end): the first (warm-up) and the last (it ends with the
    fit's tear-down) left out."""
    return [b - a for a, b in zip(stamps[1:-2], stamps[2:-1])]


class MethodRow:
    """One method fitted by Lightning for a few iterations at a time: its networks keep their weights from
    round to round; each round is a new ``Trainer`` fit, so its optimizers, schedules (and DACS's EMA
    weight) restart, as the plain loop's do."""

    variant = "lightning"

    def __init__(self, name: str, cfg: DictConfig, device: torch.device, precision: str, root: str):
        for noisy in ("pytorch_lightning", "lightning.pytorch"):  # a Trainer per round: its banner each time
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.name, self.device, self.precision, self.root = name, device, precision, root
        self.cfg = cfg
        method = method_class(cfg.adaptation)
        self.segmenter = trains_segmenter(cfg.adaptation)
        net = build_net(cfg, device) if self.segmenter else None
        adaptation = OmegaConf.to_container(cfg.adaptation, resolve=True)
        # what the method declares: options that only save pictures (off), its own learning rates (scaled)
        adaptation.update({k: 0 for k in getattr(method, "picture_options", ()) if k in adaptation})
        optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
        scale = float(cfg.bench.get("lr_scale", 1.0))
        optimizer["lr"] = optimizer["lr"] * scale
        for key in getattr(method, "learning_rate_options", ()):
            if isinstance(adaptation.get(key), (int, float)):
                adaptation[key] = adaptation[key] * scale
        try:
            self.module = build_method(adaptation, net=net, optimizer=hydra.utils.instantiate(optimizer))
        except Exception as err:  # noqa: BLE001 -- one line naming the method
            raise ConfigValueError(f"bench.methods: {name}: could not be built: {err}") from err
        self.params = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.times: list[float] = []
        self.peaks: list[float] = []

    def _fit(self, iterations: int, callbacks: list[pl.Callback]) -> None:
        b = self.cfg.bench
        if self.precision == "fp16" and self.device.type == "cpu":
            # Lightning turns 16-mixed into bf16-mixed on the CPU; the plugin itself runs float16 with its scaler
            from pytorch_lightning.plugins.precision import MixedPrecision

            precision = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
        else:
            precision = {"precision": LIGHTNING_PRECISION[self.precision]}
        with warnings.catch_warnings():  # Lightning's notices about a loop that is not a training run
            warnings.filterwarnings("ignore", ".*(does not have many workers|has `shuffle=True`|"
                                    "Trying to infer the `batch_size`|no `val_dataloader`|exceeds the|"
                                    "ModelCheckpoint|LeafSpec|in eval mode at the start|`srun` command is available).*")
            trainer = pl.Trainer(accelerator="gpu" if self.device.type == "cuda" else "cpu",
                                 devices=[self.device.index or 0] if self.device.type == "cuda" else 1,
                                 **precision, max_steps=iterations, max_epochs=-1,
                                 logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                                 default_root_dir=self.root, callbacks=callbacks, log_every_n_steps=10**9)
            loader = synthetic_loader(b, self.cfg.data.num_classes, iterations, self.module)
            try:
                trainer.fit(self.module, train_dataloaders=loader)
            except TrainingDiverged as err:
                raise ConfigValueError(
                    f"bench.methods: {self.name} diverged on the synthetic batches at optimizer.lr="
                    f"{self.cfg.optimizer.get('lr')} ({err}); give the network's own rate, e.g. optimizer.lr=2.5e-4 "
                    "for model=deeplabv2_r101 as its experiments do") from err

    def state_mb(self) -> float:
        """Weights and buffers of every network of the method (optimizer state is made in each round)."""
        return _tensor_mb(self.module)

    def count_flops(self) -> int:
        counter = CountFlops()
        try:
            self._fit(FLOP_ITERATIONS + 1, [counter])
        finally:
            counter.close()
        return counter.flops

    def run_round(self, timed: int, memory: PeakMemory) -> None:
        clock = IterationClock(self.device, memory)
        self._fit(timed + 2, [clock])
        self.times += _timed_intervals(clock.stamps)
        if clock.peak is not None:
            self.peaks.append(clock.peak)


class PlainLoopRow:
    """Source-only in a bare PyTorch loop: what rtda's source-only row is measured against."""

    name = "source_only"
    variant = "plain"
    segmenter = True

    def __init__(self, source_only: MethodRow):
        self.cfg, self.device, self.precision = source_only.cfg, source_only.device, source_only.precision
        ref = source_only.module
        self.net = build_net(self.cfg, self.device)
        self.channels_last = bool(ref.hparams.channels_last)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.net.train()
        compile_options = ref.hparams.get("compile")
        if compile_options:  # as rtda's rows compile theirs: vs_plain compares like with like
            self.net.compile(**(dict(compile_options) if isinstance(compile_options, dict) else {}))
        self.normalize = normalize
        self.params = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        net = self.net

        def loss_fn(outputs, label):  # the network's own terms (cross-entropy + aux heads, or OHEM, boundary ...)
            return total_loss(loss_terms(net, outputs, label))[0]

        self.loss_fn = loss_fn
        lr = ref.optimizer_factory.keywords.get("lr")
        mult = ref.hparams.head_lr_mult if ref.hparams.head_lr_mult is not None else getattr(self.net, "head_lr_mult", 1.0)
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        if mult != 1.0 and hasattr(self.net, "backbone_parameters"):
            backbone = {id(p) for p in self.net.backbone_parameters()}
            self.groups = [{"params": [p for p in trainable if id(p) in backbone], "lr": lr},
                           {"params": [p for p in trainable if id(p) not in backbone], "lr": lr * mult}]
        else:
            self.groups = [{"params": trainable, "lr": lr}]
        self.make_optimizer = lambda: ref.optimizer_factory(params=self.groups)
        self.poly = poly_lambda(10**6, ref.hparams.poly_power)
        self.new_optimizer()
        self.times: list[float] = []
        self.peaks: list[float] = []

    def new_optimizer(self) -> None:
        """A fresh optimizer, schedule and scaler: what each round's Lightning fit makes for its rows."""
        self.optimizer = self.make_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.poly)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def _autocast(self):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def _loop(self, iterations: int, before: Callable[[int], None], after: Callable[[], None]) -> None:
        loader = synthetic_loader(self.cfg.bench, self.cfg.data.num_classes, iterations)
        for i, batch in enumerate(loader):
            before(i)
            source = batch["source"]
            image = source["image"].to(self.device, non_blocking=True)
            label = source["label"].to(self.device, non_blocking=True)
            image = self.normalize(image)
            if self.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                loss = self.loss_fn(self.net(image), label)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.scheduler.step()
            if not torch.isfinite(loss.detach()):  # the same one host sync per iteration as rtda's check
                raise RuntimeError("the plain loop diverged")
        after()

    def count_flops(self) -> int:
        counter = FlopCounterMode(display=False)
        entered = []

        def before(i):  # iteration i starts: iteration i - 1 has ended
            if i == 1:
                counter.__enter__()
                entered.append(True)
            elif i == FLOP_ITERATIONS + 1 and entered:
                counter.__exit__(None, None, None)
                entered.clear()

        try:
            self._loop(FLOP_ITERATIONS + 2, before, lambda: None)
        finally:
            if entered:
                counter.__exit__(None, None, None)
        return int(counter.get_total_flops()) // FLOP_ITERATIONS

    def run_round(self, timed: int, memory: PeakMemory) -> None:
        stamps: list[float] = []
        self.new_optimizer()

        def before(i):
            _sync(self.device)
            stamps.append(time.perf_counter())
            if i == 0:
                memory.start()

        def after():
            _sync(self.device)
            stamps.append(time.perf_counter())

        self._loop(timed + 2, before, after)
        self.times += _timed_intervals(stamps)
        peak = memory.increase_mb()
        if peak is not None:
            self.peaks.append(peak)

    def state_mb(self) -> float:
        return _tensor_mb(self.net)


# -- the benchmark ----------------------------------------------------------------------------------
def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def method_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """``bench.methods`` (adaptation config names; null: the run's own ``adaptation=``), source-only first
    whatever the list (the ratios are to it), each composed with this run's other overrides. An
    ``adaptation.<key>=…`` override applies to the methods that have the key and must fit at least one:
    ``+adaptation.switch_to_entropy=0`` sets FDA's rows only (``+`` because the run's own ``adaptation=``,
    source-only by default, lacks the key)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    methods = cfg.bench.get("methods") or [HydraConfig.get().runtime.choices.get("adaptation", "source_only")]
    names = [str(m) for m in ([methods] if isinstance(methods, str) else methods)]
    names = ["source_only", *[n for n in dict.fromkeys(names) if n != "source_only"]]
    task = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(("adaptation=", "bench.methods="))]
    specific = [o for o in task if o.lstrip("+~").startswith("adaptation.")]
    generic = [o for o in task if o not in specific]
    out, used = {}, set()
    absent = object()  # tells an absent key from a null one (distill's adaptation.teacher.ckpt_path: null), as check_values
    for name in names:
        try:
            base = compose(config_name="bench", overrides=[*generic, f"adaptation={name}"])
            mine = [o for o in specific if OmegaConf.select(base, _key(o), default=absent) is not absent]
            used.update(mine)
            forced = ["++" + o.lstrip("+") for o in mine]  # set, whether or not the primary config needed '+'
            out[name] = compose(config_name="bench", overrides=[*generic, f"adaptation={name}", *forced]) if mine else base
            with open_dict(out[name]):
                out[name].bench.overrides = [o.lstrip("+") for o in mine]
        except Exception as err:  # noqa: BLE001 -- Hydra lists the choices
            raise ConfigValueError(f"bench.methods: {name}: {one_line(err)}") from err
    unused = [o for o in specific if o not in used]
    if unused:
        raise ConfigValueError(f"{unused[0]}: no method of bench.methods={names} has this key")
    return out


def train_benchmark(cfg: DictConfig) -> list[dict]:
    """Interleaved training-speed rows: every method of ``bench.methods`` and the plain loop."""
    b = cfg.bench
    device = torch.device(b.device)
    if b.precision not in LIGHTNING_PRECISION:
        raise ConfigValueError(f"bench.precision={b.precision!r}: expected one of {sorted(LIGHTNING_PRECISION)}")
    if device.type == "cpu" and b.precision == "fp16":
        raise ConfigValueError("bench.precision=fp16 needs bench.device=cuda (use bf16 on the CPU)")
    if b.threads:
        torch.set_num_threads(int(b.threads))
    if int(b.train_batch_size) < 2:
        raise ConfigValueError(f"bench.train_batch_size={b.train_batch_size}: expected 2 or more (training BatchNorm "
                               "needs more than one value per channel)")
    timed = int(b.train_iterations)
    if timed < 1:
        raise ConfigValueError(f"bench.train_iterations={timed}: expected at least 1 timed iteration per round")
    if int(b.min_rounds) < 1 or int(b.max_rounds) < int(b.min_rounds):
        raise ConfigValueError(f"bench.min_rounds={b.min_rounds}, bench.max_rounds={b.max_rounds}: expected "
                               "1 <= min_rounds <= max_rounds")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as trainer=gpu runs
    configs = method_configs(cfg)
    pl.seed_everything(0, verbose=False)
    root = tempfile.mkdtemp(prefix="rtda-bench-train-")
    rows: list = [MethodRow(name, c, device, b.precision, root) for name, c in configs.items()]
    if b.plain_loop:
        rows.append(PlainLoopRow(rows[0]))
    flops = {id(r): r.count_flops() for r in rows}  # also each row's first warm-up
    memory = PeakMemory(device)
    start, rounds = time.perf_counter(), 0
    while rounds < b.min_rounds or (rounds < b.max_rounds and time.perf_counter() - start < b.max_seconds * len(rows)):
        order = rows[rounds % len(rows):] + rows[:rounds % len(rows)]  # rotate: no row always runs first
        for row in order:
            row.run_round(timed, memory)
        rounds += 1
    return _rows(rows, flops, cfg, memory, rounds)


def _rows(rows: list, flops: dict, cfg: DictConfig, memory: PeakMemory, rounds: int) -> list[dict]:
    from hydra.core.hydra_config import HydraConfig

    b = cfg.bench
    model = HydraConfig.get().runtime.choices.get("model", "")
    out = []
    for row in rows:
        times = np.asarray(row.times)
        median = float(np.median(times))
        note = [" ".join(getattr(row.cfg.bench, "overrides", None) or [])] if row.variant == "lightning" else []
        if not row.segmenter:
            note.append("no segmenter: its own networks only")
        if not memory.resettable and torch.device(b.device).type == "cpu":
            note.append("no peak memory: /proc/self/clear_refs not writable")
        out.append({
            "method": row.name, "variant": row.variant, "model": model if row.segmenter else "-",
            "device": b.device, "precision": b.precision, "input": f"{b.train_batch_size}x3x{b.height}x{b.width}",
            "params_M": row.params / 1e6, "GFLOPs_per_it": flops[id(row)] / 1e9,
            "median_s": median, "mean_s": float(times.mean()), "p90_s": float(np.percentile(times, 90)),
            "images_per_s": b.train_batch_size / median,  # source images (a method reading the target uses as many again)
            "peak_mem_MB": (max(row.peaks) + row.state_mb()) if row.peaks else None, "iterations": len(times), "rounds": rounds,
            "note": "; ".join(n for n in note if n),
        })
    ref = next((r for r in out if r["method"] == "source_only" and r["variant"] == "lightning"), None)
    plain = next((r for r in out if r["variant"] == "plain"), None)
    for r in out:
        if ref is not None:
            r["time_ratio"] = r["median_s"] / ref["median_s"]
            r["flop_ratio"] = r["GFLOPs_per_it"] / ref["GFLOPs_per_it"] if ref["GFLOPs_per_it"] else None
            r["overhead"] = r["time_ratio"] / r["flop_ratio"] if r["flop_ratio"] else None
        if plain is not None and r is not plain and r["method"] == "source_only":
            r["vs_plain"] = r["median_s"] / plain["median_s"]
    return out
