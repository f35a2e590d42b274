"""Reading rtda checkpoints safely: never unpickling code, and saying plainly what is wrong with a file.

Every checkpoint rtda writes holds tensors and plain values only, so it loads with ``weights_only=True``;
a file that needs more is refused as unsafe (rtda never suggests loading it unsafely). A file that is not a
checkpoint, a truncated one, and one of another network or class count are each a one-line error.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import hydra
import torch
from torch import nn

from rtda.run.errors import CheckpointError, disk_full_error, no_space_left
from rtda.run.files import atomic_write


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by rtda-train, loaded without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path: no such checkpoint file: {path}")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a torch.save archive, or truncated)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path} was refused as unsafe: it holds pickled Python objects{what} that could run "
                              "code when loaded; rtda loads checkpoints with weights_only=True only") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is a corrupt or truncated checkpoint: {str(err).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no state_dict)")
    if not isinstance(ckpt.get("rtda"), dict) or "config" not in ckpt["rtda"]:
        raise CheckpointError(f"{path} has no rtda run record (ckpt['rtda']): was it written by rtda-train?")
    return ckpt


def describe_net(model_cfg: dict) -> str:
    return f"{str(model_cfg.get('_target_', '?')).rsplit('.', 1)[-1]} with {model_cfg.get('num_classes', '?')} classes"


def build_net(ckpt: dict, path: str | Path = "checkpoint") -> nn.Module:
    """The checkpoint's network, as its run configured it, with its trained weights."""
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not state:  # a method without a segmenter (CycleGAN's translator): what to do with it, as it declares
        target = str(ckpt["rtda"]["config"].get("adaptation", {}).get("_target_", "?"))
        try:
            hint = getattr(hydra.utils.get_class(target), "checkpoint_hint", "")
        except Exception:  # noqa: BLE001 -- a method that no longer imports: no hint
            hint = ""
        hint = f"; {hint.format(path=path)}" if hint else ""
        raise CheckpointError(f"{path} holds no segmentation network (trained by {target.rsplit('.', 1)[-1]}){hint}")
    model_cfg = dict(ckpt["rtda"]["config"]["model"])
    model_cfg["pretrained"] = False  # the checkpoint holds the weights; fetch nothing
    net = hydra.utils.instantiate(model_cfg)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: its weights do not fit the network its config describes "
                              f"({describe_net(model_cfg)}): {str(err).splitlines()[1].strip()}") from None
    return net.eval()


def check_checkpoint_fits(path: str | Path, module: nn.Module) -> None:
    """Refuse, before training starts, a checkpoint whose weights do not fit ``module`` (another network,
    class count or method): names, then shapes, compared with the module's own state."""
    ckpt = load_checkpoint(path)
    theirs = ckpt["state_dict"]
    ours = module.state_dict()
    saved = ckpt["rtda"]["config"]
    now = getattr(module, "run_config", None) or {}
    what = f"it holds {describe_net(saved.get('model', {}))} trained by adaptation " \
           f"{str(saved.get('adaptation', {}).get('_target_', '?')).rsplit('.', 1)[-1]}"
    if now.get("config"):
        cfg = now["config"]
        what += f"; this run builds {describe_net(cfg['model'])} with " \
                f"{str(cfg['adaptation']['_target_']).rsplit('.', 1)[-1]}"
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise CheckpointError(f"ckpt_path={path} does not fit this run ({what}): {len(missing)} weights missing, "
                              f"{len(unexpected)} unexpected, e.g. {example}")
    for key, tensor in ours.items():
        if tuple(theirs[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"ckpt_path={path} does not fit this run ({what}): {key} is "
                                  f"{tuple(theirs[key].shape)} in the checkpoint, {tuple(tensor.shape)} here")


def _checkpoint_io_base():
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):
    """Lightning's checkpoint writer, made whole-or-nothing on a local disk: ``torch.save`` into a temporary file
    beside the checkpoint, renamed over it once complete (:func:`rtda.run.files.atomic_write`). A full disk leaves no
    partial file in ``checkpoints/`` (``ckpt_path=auto`` would otherwise find a truncated ``last.ckpt``) and stops
    the run with one line naming the folder, instead of a traceback. Remote paths (``s3://``…) go to Lightning's
    own writer."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__
            if no_space_left(cause) or "No space left" in str(err) or "quota" in str(err).lower():
                raise disk_full_error(cause if isinstance(cause, OSError) else OSError(28, "No space left on device"),
                                      f"{path.parent} (checkpoint {path.name})") from None
            raise
