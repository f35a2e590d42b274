"""The results of a run or an evaluation: what goes into ``results.json`` and the printed summary; whether a
sweep's job already completed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from rtda.run.config import in_multirun, overrides
from rtda.run.errors import ConfigValueError

#: config keys (and prefixes, ending in ".") that do not change what a run measures: where it reads and writes,
#: how it logs (``rtda-compare`` does not group on them; a sweep job started again may change them)
NOT_EXPERIMENT_KEYS = ("hydra.", "paths.", "ckpt_path", "run_name", "logger", "logger.", "callbacks", "callbacks.",
                       "data.num_workers", "data.pin_memory", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
                       "trainer.enable_model_summary", "trainer.default_root_dir", "tags", "task_name")


def is_experiment_key(key: str, ignore=()) -> bool:
    for pattern in (*NOT_EXPERIMENT_KEYS, *ignore):
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)) or key.startswith(pattern + "."):
            return False
    return True


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_differences(old: dict, new: dict, limit: int = 3) -> list[str]:
    """``key: old -> new`` for the experiment keys where two resolved configs differ (at most ``limit``, then a count)."""
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if is_experiment_key(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))
    out = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    return out + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])


def completed_job(cfg) -> dict | None:
    """A ``-m`` sweep started again with the same ``hydra.sweep.dir``: the ``results.json`` of this job's folder when
    the job completed there (it is skipped), None when it has to run (a new job, or one interrupted: it resumes from
    its checkpoints). A folder holding a run of another config (a completed one, or checkpoints to resume from) is
    refused with the keys that differ: a job never mixes two experiments. Outside a sweep: None."""
    from omegaconf import OmegaConf

    if not in_multirun():
        return None
    folder = Path(cfg.paths.output_dir)
    path = folder / "results.json"
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a new job (or a results.json cut short: the job runs, and resumes from its checkpoints)
    completed = previous.get("status") == "completed"
    if completed or any((folder / "checkpoints").glob("*.ckpt")):
        if previous.get("config") is not None:
            differences = config_differences(previous["config"], OmegaConf.to_container(cfg, resolve=True))
        else:  # written before results.json held the config: the command lines must agree

            differences = [] if sorted(previous.get("overrides", [])) == sorted(overrides()) else [
                f"overrides {previous.get('overrides')} -> {overrides()}"]
        if differences:
            raise ConfigValueError(
                f"sweep job {folder.name}: {folder} holds a run of another config ({'; '.join(differences)}); it is not "
                "continued with this one. Give the sweep another folder (hydra.sweep.dir=...) or remove that job's folder")
    return previous if completed else None


def test_scores(metrics: dict, class_names: list[str]) -> dict | None:
    """``test/*`` values logged by the module (present in the main process under every strategy)."""
    if "test/mIoU" not in metrics:
        return None

    def value(key):
        v = float(metrics[key])
        return None if math.isnan(v) else v

    return {
        "mIoU": value("test/mIoU"),
        # the class subsets of data.eval_classes (a SYNTHIA run: mIoU16, mIoU13, mIoU19)
        **{key[len("test/"):]: value(key) for key in sorted(metrics, key=str) if _SUBSET_MIOU.fullmatch(str(key))},
        "acc": value("test/acc"),
        "mAcc": value("test/mAcc"),
        "IoU": {name: value(f"test/IoU/{name}") for name in class_names},
    }


_SUBSET_MIOU = re.compile(r"test/mIoU\d+")


def subset_mious(test: dict) -> dict:
    """The ``mIoU<n>`` scores of a test result (``{"mIoU16": …, "mIoU13": …}``), in descending n."""
    keys = [k for k in test if re.fullmatch(r"mIoU\d+", k)]
    return {k: test[k] for k in sorted(keys, key=lambda k: -int(k[4:]))}


def _pct(value, width: int = 0) -> str:
    return f"{'n/a' if value is None else f'{100 * value:.2f}':>{width}}"


def group_line(test: dict) -> str | None:
    """``per-condition mIoU: fog 41.20   night 12.30`` for a test set scored per group (ACDC), else None."""
    groups = test.get("groups")
    if not groups:
        return None
    return f"per-{test.get('group_by') or 'group'} mIoU: " + "   ".join(f"{g} {_pct(s.get('mIoU'))}" for g, s in groups.items())


def targets_table(rows: list[dict]) -> list[str]:
    """The lines of a multi-target evaluation (``rtda-eval 'data.test=[a,b]'``): one row per target (mIoU, the
    class subsets, pixel accuracy, images; a target scored per group adds a row per group), their mean, then the
    per-class IoU with one column per target."""
    subsets = list(dict.fromkeys(k for r in rows for k in subset_mious(r)))
    names = [str(r["target"]) for r in rows]
    width = max(12, *(len(n) for n in names), *(len(str(r["target"])) + len(g) + 3 for r in rows for g in r.get("groups") or {}))
    head = f"  {'target':<{width}} {'images':>6} {'mIoU':>7}" + "".join(f" {k:>7}" for k in subsets) + f" {'acc':>7}"
    lines = ["target test scores (%), one row per target:", head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        lines.append(f"  {r['target']:<{width}} {r.get('images', ''):>6} {_pct(r['mIoU'], 7)}"
                     + "".join(f" {_pct(r.get(k), 7)}" for k in subsets) + f" {_pct(r.get('acc'), 7)}")
        for group, scores in (r.get("groups") or {}).items():
            lines.append(f"  {'  ' + str(r['target']) + '/' + group:<{width}} {'':>6} {_pct(scores.get('mIoU'), 7)}"
                         + "".join(f" {_pct(scores.get(k), 7)}" for k in subsets) + f" {_pct(scores.get('acc'), 7)}")
    mious = [r["mIoU"] for r in rows if r.get("mIoU") is not None]
    if len(rows) > 1 and mious:
        lines.append(f"  {'mean':<{width}} {'':>6} {_pct(sum(mious) / len(mious), 7)}")
    classes = list(dict.fromkeys(c for r in rows for c in r.get("IoU") or {}))
    if classes:
        col = max(8, *(len(n) for n in names))
        lines.append("per-class IoU (%):")
        lines.append(f"  {'class':<14}" + "".join(f" {n:>{col}}" for n in names))
        for c in classes:
            lines.append(f"  {c:<14}" + "".join(f" {_pct((r.get('IoU') or {}).get(c), col)}" for r in rows))
    return lines


def format_summary(results: dict) -> str:
    lines = ["", "=" * 60, f"rtda: {results['experiment']}"]
    test = results.get("test")
    if test:
        lines.append(f"target test mIoU: {100 * test['mIoU']:.2f}   (pixel acc {100 * test['acc']:.2f})")
        subsets = subset_mious(test)
        if subsets:
            lines.append("   ".join(f"{k}: {'n/a' if v is None else f'{100 * v:.2f}'}" for k, v in subsets.items()))
        if group_line(test):
            lines.append(group_line(test))
        lines.append("per-class IoU:")
        for name, iou in test["IoU"].items():
            lines.append(f"  {name:<14} {'   n/a' if iou is None else f'{100 * iou:6.2f}'}")
    if results.get("targets"):
        lines += targets_table(results["targets"])
    lines += results.get("summary") or []  # the method's own lines (its run_results): what a run without a score left
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
