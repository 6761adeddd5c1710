"""The ``compass-monitor`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .store.schema import StoreError  # light: the store's reader (zarr) is imported by the commands that read

__all__ = ["main", "build_parser"]


def _cmd_summary(args: argparse.Namespace) -> int:
    from .store import open_run
    from .summary import summary_text

    run = open_run(args.run_dir)
    print(summary_text(run, max_rows=args.rows))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from .report.compare_table import compare_json, compare_text
    from .report.crossrun import cross_run_stats

    if len(args.runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(args.runs)}")
    if args.tui:
        from .tui.launch import run_compare_tui  # Textual only for --tui

        return run_compare_tui(args.runs)
    from .store import open_run

    runs = [open_run(path) for path in args.runs]
    stats = cross_run_stats(runs, step=args.step)
    print(json.dumps(compare_json(stats, runs), indent=2) if args.json else compare_text(stats, runs))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        from .report.build import ReportConfig, build_report  # matplotlib only for this command
    except ImportError as exc:
        print(f"compass-monitor report: error: the figures need matplotlib ({exc}); install the report extra: "
              "pip install -e '.[report]' from the source tree", file=sys.stderr)
        return 2
    config = ReportConfig(matrices=tuple(args.matrix or ()), head_dim=args.head_dim, max_image_side=args.max_image_side)
    report = build_report(args.runs, args.out, config=config)
    for number, fig in enumerate(report.figures, start=1):
        print(f"{number:>2}. {fig.files[0].name}: {fig.reading}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"index: {report.index[1]} (and {report.index[0].name})")
    return 0


def _add_report_commands(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report",
        help="draw a run's figures (PNG + SVG) and an index page; with several runs of one base, cross-run figures too",
        description="Figures of one or more runs (paper Fig. 2-5, 8): update sparsity and flips over steps (global and per "
        "module type), the three overlaps vs random baseline and precision null, row/column update-ratio profiles per "
        "module type and for chosen matrices with attention-head boundaries, mask images, spectral drift when stored, "
        "and with two or more runs of one base the pairwise Jaccard vs the independent baseline and the consensus ratio. "
        "Writes DIR/index.html and DIR/index.md with a one-line reading per figure.",
    )
    report.add_argument("runs", metavar="RUN", nargs="+", help="one or more run store directories")
    report.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and the index (created if needed)")
    report.add_argument("--matrix", action="append", metavar="NAME", help="a matrix to draw profiles and masks of (repeatable; default: the most changed q, o and down)")
    report.add_argument("--head-dim", type=int, default=None, help="attention head size when a run's metadata has none (default: no head lines)")
    report.add_argument("--max-image-side", type=int, default=256, help="mask images at most this many pixels a side (default 256)")
    report.set_defaults(func=_cmd_report)

    compare = sub.add_parser(
        "compare",
        help="compare runs of one base model: mask Jaccard per module type vs the independent baseline, consensus",
        description="Cross-run numbers at the last optimizer step all runs stored (Sec. 2.2, Fig. 2, Fig. 8): "
        "changed fraction per module type, pairwise Jaccard |A∩B|/|A∪B| of the final masks pooled per module type "
        "beside the independent-Bernoulli baseline pq/(p+q-pq), and the consensus ratio's histogram. Runs of "
        "different base models are refused. Snapshots are paired by optimizer step; if the runs share no step, "
        "as of each step of the run with fewest snapshots (latest snapshot at or before it).",
    )
    compare.add_argument("runs", metavar="RUN", nargs="+", help="two or more run store directories")
    compare.add_argument("--step", type=int, default=None, help="compare at this aligned optimizer step (default: the last)")
    compare.add_argument("--json", action="store_true", help="print JSON instead of tables")
    compare.add_argument("--tui", action="store_true", help="open the terminal UI's compare screen on these runs (consensus view for three or more)")
    compare.set_defaults(func=_cmd_compare)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .store.inspect import inspect_text

    print(inspect_text(args.run_dir, verify=not args.no_verify))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # heavy imports (transformers) only for this command

    return run_demo(run_dir=args.run_dir, steps=args.steps, every_n_steps=args.every, seed=args.seed)


def _cmd_tui(args: argparse.Namespace) -> int:
    from .tui.launch import run_tui  # Textual only when the app starts

    if args.command == "replay" and not (Path(args.path) / "zarr.json").is_file():
        # replay plays one run; a folder of runs is for `tui` (its run list).
        from .tui.data import discover_runs

        found = discover_runs(Path(args.path))
        hint = f"; runs under it: {', '.join(str(p) for p in found[:3])}{', ...' if len(found) > 3 else ''}" if found else ""
        print(f"compass-monitor replay: error: {args.path} is not a run store (no zarr.json){hint}; "
              f"pass one run's directory, or pick one with: compass-monitor tui {args.path} --replay", file=sys.stderr)
        return 2
    replay = args.command == "replay" or args.replay
    return run_tui(args.path, replay=replay, speed=args.speed, head_dim=args.head_dim, stale_after=args.stale_after)


def _add_tui_commands(sub: argparse._SubParsersAction) -> None:
    tui = sub.add_parser(
        "tui",
        help="watch a run (or a folder of runs) live in the terminal; scrub, filter, drill down, compare",
        description="Terminal UI: run list, a matrices-by-snapshots heatmap of update density, matrix drill-down "
        "(mask density map, row/column profiles with head boundaries, overlaps vs baselines), run comparison. "
        "Press ? in the app for every key.",
    )
    replay = sub.add_parser("replay", help="open a finished run at its first snapshot and play it forward",
                            description="Replay a run: open it at snapshot 0 and play forward (space pauses, +/- change speed).")
    for parser, target in ((tui, "PATH"), (replay, "RUN_DIR")):
        parser.add_argument("path", metavar=target, help="a run directory" + (", or a folder of runs" if target == "PATH" else ""))
        parser.add_argument("--speed", type=float, default=2.0, help="replay speed in snapshots per second (default 2)")
        parser.add_argument("--head-dim", type=int, default=None, help="attention head size for runs that did not record their model's geometry (default: draw no head boundaries for them)")
        parser.add_argument("--stale-after", type=float, default=120.0, help="seconds without a commit before a running run shows STALE (default 120, at least 3x its snapshot interval)")
        parser.set_defaults(func=_cmd_tui, replay=False)
    tui.add_argument("--replay", action="store_true", help="start in replay mode (like the replay command)")


# -- diff: post hoc, a base and checkpoints become a run store (compass_monitor/checkpoints) ------------------
def _cmd_diff(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoints import diff_checkpoints, discover_series, resolve_steps
    from .checkpoints.table import table_row
    from .config import MonitorConfig

    logging.getLogger("compass_monitor.checkpoints").setLevel(logging.INFO)  # the per-checkpoint lines off a terminal
    paths = [Path(p) for p in args.checkpoints]
    if len(paths) == 1 and paths[0].is_dir() and not any(paths[0].glob("*.safetensors")) and not (paths[0] / "adapter_config.json").is_file():
        paths = discover_series(paths[0])  # a run folder of checkpoint-N sub-folders
    refs = resolve_steps(paths, args.steps)
    include = {r.strip() for r in args.include.split(",") if r.strip()}
    roles = {"linear", "embedding", "lm_head", "norm", "bias"}
    if not include <= roles:
        raise ValueError(f"--include takes roles from {sorted(roles)}, got {sorted(include - roles)}")
    config = MonitorConfig(
        every_n_steps=max(1, refs[0].step),
        principal_rank=args.rank,
        alpha=args.alpha,
        include_linear="linear" in include,
        include_embeddings="embedding" in include,
        include_lm_head="lm_head" in include,
        include_norms="norm" in include,
        include_biases="bias" in include,
        name_pattern=args.name_pattern,
        snapshot_on_close=False,
        spectral_every=1 if args.spectral else 0,
        spectral_k=args.spectral_k,
    )
    try:
        result = diff_checkpoints(args.base, refs, args.out, config=config, run_name=args.run_name,
                                  progress=None if not args.no_progress else False, device=args.device,
                                  allow_unrelated_base=args.allow_unrelated_base, hold_base=args.hold_base)
    except KeyboardInterrupt:
        print(f"compass-monitor diff: interrupted; {args.out} keeps every committed snapshot", file=sys.stderr)
        return 130
    from .store import open_run
    from .summary import summary_text

    run = open_run(result.run_dir)
    if len(refs) == 1:
        print(table_row(run, spectral=args.spectral))
    else:
        print(summary_text(run))
    print(f"run store: {result.run_dir} ({len(refs)} snapshot(s); open it with compass-monitor tui {result.run_dir})")
    return 0


def _add_diff_command(sub: argparse._SubParsersAction) -> None:
    diff = sub.add_parser(
        "diff",
        help="post hoc: measure checkpoints against their base and write a run store (one snapshot per checkpoint)",
        description="Compare a base model with one or more checkpoints (Hugging Face safetensors folders, sharded or "
        "not, PEFT LoRA adapter folders, or model ids in the local HF cache) and write an ordinary run store with one "
        "snapshot per checkpoint at its training step (from trainer_state.json, the checkpoint-N folder name, or "
        "--steps). CKPT may also be a run folder of checkpoint-N sub-folders. For a single pair it prints the "
        "Table-1 row. Pickle formats (.bin, .pt, DCP) are refused, never unpickled.",
    )
    diff.add_argument("base", metavar="BASE", help="the base model: folder, .safetensors file, or model id in the local HF cache")
    diff.add_argument("checkpoints", metavar="CKPT", nargs="+", help="checkpoints in step order, or one run folder of checkpoint-N sub-folders")
    diff.add_argument("--out", required=True, metavar="RUN_DIR", help="a new or empty folder for the run store")
    diff.add_argument("--steps", type=int, nargs="+", metavar="N", help="the training step of each checkpoint (default: trainer_state.json or checkpoint-N)")
    diff.add_argument("--spectral", action="store_true", help="also compute NSS, principal angles and top-k energy (Sec. 4.1; costly)")
    diff.add_argument("--spectral-k", type=int, default=64, help="rank of the compared subspaces (default 64)")
    diff.add_argument("--rank", type=int, default=64, help="k of the principal mask (default 64)")
    diff.add_argument("--alpha", type=float, default=0.5, help="fraction in the principal and low masks (default 0.5)")
    diff.add_argument("--include", default="linear", help="roles to monitor, comma-separated: linear,embedding,lm_head,norm,bias (default linear)")
    diff.add_argument("--name-pattern", default=None, metavar="REGEX", help="only tensors whose name matches this regular expression")
    diff.add_argument("--run-name", default=None, help="the run's label (default: the folder name)")
    diff.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the probe runs (default auto: cuda when available)")
    diff.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    diff.add_argument("--allow-unrelated-base", action="store_true",
                      help="compare checkpoints with a base they were not trained from (refused by default: median weight cosine below 0.5)")
    diff.add_argument("--hold-base", action="store_true",
                      help="keep the base in memory (2.5 bytes per weight) instead of rereading it for every checkpoint")
    diff.set_defaults(func=_cmd_diff)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compass-monitor",
        description="Live bf16 update masks and RLVR/SFT diagnostics for training runs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (default: one line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    summary = sub.add_parser(
        "summary",
        help="print a run's table: sparsity per module type and overlaps vs baselines",
        description="Print step, global update sparsity, sparsity per module type, and overlaps with the "
        "principal / low-magnitude / principal-not-low masks against their random and precision-null baselines.",
    )
    summary.add_argument("run_dir", metavar="RUN_DIR", help="a run store directory")
    summary.add_argument("--rows", type=int, default=20, help="at most this many snapshot rows (default 20)")
    summary.set_defaults(func=_cmd_summary)

    inspect = sub.add_parser(
        "inspect",
        help="print a run store's schema, status, heartbeat, snapshots, gaps, truncations and sizes",
        description="Describe a run store: schema, status and heartbeat age (is the writer alive?), committed "
        "snapshots, gaps (snapshots skipped because the writer was behind), truncations (resumes), and bytes on "
        "disk per group of arrays with the compression ratio against the plain arrays.",
    )
    inspect.add_argument("run_dir", metavar="RUN_DIR", help="a run store directory")
    inspect.add_argument("--no-verify", action="store_true", help="skip decoding and checking every committed snapshot")
    inspect.set_defaults(func=_cmd_inspect)

    demo = sub.add_parser(
        "demo",
        help="train a pretrained MiniLM with GRPO on a generated task, monitored, then summarise",
        description="Run the embedded demo: GRPO-style RL fine-tuning of all-MiniLM-L6-v2 on a generated "
        "sentiment task with negations, with the monitor writing to RUN_DIR; then print the summary.",
    )
    demo.add_argument("--run-dir", default="runs/demo", help="run store directory (default runs/demo; replaced if it holds an earlier demo)")
    demo.add_argument("--steps", type=int, default=30, help="GRPO steps, two optimizer steps each (default 30)")
    demo.add_argument("--every", type=int, default=5, help="snapshot every N optimizer steps (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_cmd_demo)
    _add_tui_commands(sub)
    _add_report_commands(sub)
    _add_diff_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # one line, what is wrong; the traceback with --debug
        if args.debug:
            raise
        print(f"compass-monitor {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The error as one line: the store's own errors as they are, anything else with its type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) and exc.args:  # str(KeyError) quotes its key
        text = str(exc.args[0])
    if isinstance(exc, StoreError):
        return text
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
    return f"{type(exc).__name__}: {text}" + (" (rerun with --debug for the traceback)" if not isinstance(exc, (ValueError, KeyError)) else "")


if __name__ == "__main__":
    sys.exit(main())
