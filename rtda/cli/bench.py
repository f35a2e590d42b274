"""``rtda-bench``: parameters, FLOPs, latency and FPS of a network (:mod:`rtda.bench.inference`), seconds per
training iteration of a method (``bench.mode=train``, :mod:`rtda.bench.training`), the data pipeline
(``bench.mode=data``, :mod:`rtda.bench.data`); ``rtda-bench --collect FOLDER``: one table of the results below it."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rtda.bench.data import data_benchmark
from rtda.bench.inference import benchmark, collect, format_tables, machine_line, machine_record, write_rows
from rtda.bench.training import train_benchmark
from rtda.run import config as rtda_config
from rtda.run.errors import ConfigValueError, exit_on_user_error, run_cli
from rtda.run.files import check_writable


@hydra.main(version_base="1.3", config_path=str(rtda_config.CONFIG_DIR), config_name="bench")
@exit_on_user_error
@rtda_config.closes_wandb
def _hydra_main(cfg: DictConfig) -> float:
    rtda_config.check_values(cfg)
    check_writable(cfg.paths.output_dir, "the benchmark's results")
    mode = cfg.bench.get("mode", "infer")
    if mode == "train":
        rows = train_benchmark(cfg)
    elif mode == "data":
        rows = data_benchmark(cfg)
    elif mode == "infer":
        rows = benchmark(cfg)
    else:
        raise ConfigValueError(f"bench.mode={mode!r}: expected infer, train or data")
    for r in rows:
        r.setdefault("mode", mode)
        r.setdefault("machine", machine_record(cfg))
    folder = Path(cfg.paths.output_dir)
    write_rows(rows, folder)
    print(f"\nrtda-bench ({machine_line(rows)})\n{format_tables(rows)}\nwritten to {folder / 'bench.csv'}")
    eager = next((r for r in rows if r.get("variant") in ("eager", "lightning") and ("median_ms" in r or "median_s" in r)), rows[0])
    return eager.get("median_ms", eager.get("median_s", float("nan")))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--collect":  # one table of the bench.json files below a folder
        rows = collect(sys.argv[2])
        if not rows:
            raise SystemExit(f"rtda: error: no bench.json below {sys.argv[2]}")
        write_rows(rows, Path(sys.argv[2]), "comparison")
        print(f"{machine_line(rows)}\n{format_tables(rows)}")
        return
    run_cli(_hydra_main)


if __name__ == "__main__":
    main()
