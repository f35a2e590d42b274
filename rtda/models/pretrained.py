"""Pretrained weights the way users expect: torchvision's weight registry, or a local file.

Nothing is fetched unless the user asked for ``pretrained=true``; when the registry cannot be reached
the error says which file to download and how to pass it. A network records what initialised it in its
``pretrained_weights`` attribute (a weights name or file; None: random initialisation), which methods read
(DACS's feature distance refuses a random reference).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rtda.run.errors import PretrainedWeightsError

__all__ = ["PretrainedWeightsError", "file_state_dict", "key_mismatches", "load_matching", "registry_state_dict"]


def registry_state_dict(weights) -> dict:
    """State dict of a torchvision ``WeightsEnum`` member (from the hub cache, else downloaded)."""
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # no network, proxy, corrupt cache ...
        file = weights.url.rsplit("/", 1)[-1]
        raise PretrainedWeightsError(
            f"could not fetch torchvision weights {weights} ({weights.url}): {err}\n"
            f"Download {file} on a machine with network access and either put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass model.pretrained=/path/to/{file}"
        ) from err


def _is_safetensors(path: Path) -> bool:
    """A safetensors file begins with its header's length (8 bytes, little-endian) and the header's JSON ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def file_state_dict(path: str | Path) -> dict:
    """A state dict from a weights file: safetensors (Hugging Face; told by its header, whatever the suffix), or
    a torch file (``.pth``/``.tar``/``.bin``/``.ckpt``) plain or nested under ``state_dict``/``model``; a DDP
    ``module.`` prefix dropped. An unreadable file is one PretrainedWeightsError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path} (model.pretrained expects true, false or a file)")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise PretrainedWeightsError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, a pickle weights_only refuses ...
        reason = str(err).splitlines()[0].split(". ")[0]
        raise PretrainedWeightsError(f"{path}: not a readable weights file (torch.load: {reason}); "
                                     "model.pretrained expects a state dict (.pth/.tar/.bin/.ckpt) or a .safetensors file") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors "
                                     "(name -> tensor, or one under 'state_dict' / 'model')")
    return {k.removeprefix("module."): v for k, v in state.items()}


def key_mismatches(own: dict, state: dict, expected: set | None = None, dropped: set = frozenset(),
                   shape_hint: str = "") -> list[str]:
    """What keeps ``state`` (a file's, names mapped) from loading strictly into the ``expected`` keys of ``own`` (a
    network's state dict; default all): one phrase each for missing tensors (``num_batches_tracked`` optional),
    unexpected ones (``dropped`` excepted) and shape mismatches, with examples. Empty: it fits."""
    expected = set(own) if expected is None else expected
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected - set(dropped))
    wrong = sorted(k for k in expected & set(state) if own[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors of the network are not in the file, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the file are not in the network, e.g. {unexpected[:3]}")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} tensors differ in shape, e.g. {k}: file {tuple(state[k].shape)}, "
                        f"network {tuple(own[k].shape)}{shape_hint}")
    return problems


def load_matching(module: nn.Module, state: dict, source: str, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Load the entries of ``state`` that fit ``module`` (after stripping one of ``prefixes``).

    Returns the module's keys that stayed uninitialised. Raises if nothing matched, so a wrong file
    never silently leaves a network at random init.
    """
    own = module.state_dict()
    loaded = {}
    for key, value in state.items():
        for prefix in prefixes:
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name in own and own[name].shape == value.shape:
                loaded[name] = value
                break
    if not loaded:
        raise PretrainedWeightsError(f"no tensor of {source} matches {type(module).__name__}: wrong file?")
    module.load_state_dict(loaded, strict=False)
    return [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")]
