"""The results of a run or an evaluation: what goes into ``results.json`` and the printed summary."""

from __future__ import annotations

import math


def test_summary(metrics: dict, class_names: list[str]) -> dict | None:
    """``test/*`` values logged by the module (present in the main process under every strategy)."""
    if "test/mIoU" not in metrics:
        return None

    def value(key):
        v = float(metrics[key])
        return None if math.isnan(v) else v

    return {
        "mIoU": value("test/mIoU"),
        "acc": value("test/acc"),
        "mAcc": value("test/mAcc"),
        "IoU": {name: value(f"test/IoU/{name}") for name in class_names},
    }


def format_summary(results: dict) -> str:
    lines = ["", "=" * 60, f"rtda: {results['experiment']}"]
    test = results.get("test")
    if test:
        lines.append(f"target test mIoU: {100 * test['mIoU']:.2f}   (pixel acc {100 * test['acc']:.2f})")
        lines.append("per-class IoU:")
        for name, iou in test["IoU"].items():
            lines.append(f"  {name:<14} {'   n/a' if iou is None else f'{100 * iou:6.2f}'}")
    if results.get("note"):  # a run without a score (CycleGAN's translator) says what it left instead
        lines.append(results["note"])
        if results.get("samples"):
            lines.append(f"sample translations: {results['samples'][-1]}")
    if results.get("best_val_mIoU") is not None:
        lines.append(f"best val mIoU: {100 * results['best_val_mIoU']:.2f}")
    lines.append(f"run folder: {results['run_dir']}")
    lines.append(f"checkpoint: {results.get('checkpoint') or 'none saved'}")
    failures = results.get("decode_failures") or {}
    if failures:
        lines.append(f"WARNING: {len(failures)} training files failed to decode and were replaced by the next sample "
                     "(listed in results.json):")
        lines += [f"  {path}  ({n}x)" for path, n in sorted(failures.items())[:10]]
        if len(failures) > 10:
            lines.append(f"  ... and {len(failures) - 10} more")
    for warning in results.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    lines.append("=" * 60)
    return "\n".join(lines)
