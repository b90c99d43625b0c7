"""`linearsr analyze RUN`: the ESGF decision, or why there is none yet.

    linearsr analyze runs/tiny                 one look: prints the decision (or why not yet), the
                                               knee of every log-SNR interval, and rewrites
                                               RUN/analysis/curve.png
    linearsr analyze runs/tiny --json          the same as one JSON object
    linearsr analyze runs/tiny --watch [--pretrain-job ID]
                                               the sidecar: poll, decide once, stop the pretrain
                                               job (at the knee, or diverged), run the expert
                                               tree, write the bundle
"""

from __future__ import annotations

import argparse

from linearsr.ckpt_analysis.decision import Analysis
from linearsr.ckpt_analysis.sidecar import Sidecar, wait_for_run
from linearsr.core.storage import dumps
from linearsr.model.flow import Interval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run dir (local folder or s3://bucket/prefix/NAME)")
    parser.add_argument("--watch", action="store_true", help="run as the sidecar: poll, decide once, act")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (one-shot mode)")
    parser.add_argument("--finished", action="store_true",
                        help="treat the pretrain run as finished: decide with the validations there are")
    parser.add_argument("--pretrain-job", default=None,
                        help="Ray submission id of the pretrain job (stopped at the knee or on divergence; remembered in state.json)")
    parser.add_argument("--ray-address", default=None, help="Ray Jobs API URL (default: esgf.ray_address, RAY_ADDRESS, `make ray-up`)")
    parser.add_argument("--poll", type=float, default=None, help="seconds between polls (default: esgf.poll_seconds)")


def _summary(sidecar: Sidecar, finished: bool) -> tuple[dict, Analysis]:
    analysis = sidecar.analyze(finished=True if finished else None)
    taken = sidecar.decision()
    return {
        "run": sidecar.run.url,
        "validations": len(analysis.curve),
        "last_step": analysis.curve.steps[-1] if analysis.curve else None,
        "knee_step": analysis.knee_step,
        "diverged_at": analysis.divergence.step if analysis.divergence else None,
        "decided": taken is not None,
        "decision": taken,
        "would_decide": analysis.decision,
        "reason": taken["reason"] if taken else analysis.reason,
    }, analysis


def _print_text(s: dict) -> None:
    print(f"run {s['run']}: {s['validations']} validations" + (f", last step {s['last_step']}" if s["last_step"] is not None else ""))
    d = s["decision"] or s["would_decide"]
    if d is None:
        print(f"no decision yet: {s['reason']}")
        return
    head = "decision" if s["decided"] else "decision due (the sidecar takes it on its next poll)"
    print(f"{head}: {d['checkpoint']} (step {d.get('checkpoint_step')})")
    print(f"  knee step {d.get('knee_step')} (confirmed at step {d.get('confirmed_at')}), "
          f"{'diverged at ' + str(d['diverged_at']) if d.get('diverged_at') is not None else 'no divergence'}, method {d['method']}")
    for key, k in sorted((d.get("intervals") or {}).items(), key=lambda kv: Interval.parse(kv[0])):
        print(f"  interval {key:>14s}: knee step {k['knee_step']}, checkpoint step {k['checkpoint_step']}")
    print(f"  {d['reason']}")


def run(args: argparse.Namespace) -> int:
    if args.watch:
        wait_for_run(args.run, args.pretrain_job, args.ray_address, args.poll or 5.0)
    sidecar = Sidecar(args.run, pretrain_job=args.pretrain_job, ray_address=args.ray_address, poll_seconds=args.poll)
    if args.watch:
        return sidecar.watch()
    summary, analysis = _summary(sidecar, args.finished)
    from linearsr.ckpt_analysis.report import save_curve

    if analysis.curve:
        save_curve(sidecar.run, analysis)
    if args.json:
        print(dumps(summary, indent=2, sort_keys=True))
    else:
        _print_text(summary)
    return 0
