"""The expert tree: fine-tune the nodes of [flow]'s log-SNR bisection tree level by level.

    level 0 (optional, esgf.experts.full_range_first)  the full range, from the decision's checkpoint
    level 1                                            two halves, from the decision's checkpoint
                                                       (init = "knee") or each from the pretrain
                                                       checkpoint best for its half ("per_interval")
    level k >= 2                                       each node from its parent's best checkpoint
    leaves                                             the bundle's experts

A level's jobs run in parallel and a level starts when the one above it is done. The optional
equal-compute control (esgf.experts.control: the decision's checkpoint fine-tuned once over the
full range with as many steps as all tree nodes together) runs beside the levels from the start.

Restart-safe: job keys ("L2-3", "control") and submission ids are deterministic, every node's
init is recomputed from finished runs (the same best checkpoint each time), and state.json
holds the jobs (attempts, init) and the tree ("tree": {split, edges, nodes: {id: {level,
interval, parent, init, status, best}}, control}). A killed sidecar reruns this and finds the
finished levels done, the running jobs running, and submits nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from linearsr.ckpt_analysis.config import ESGFConfig, shared_workers
from linearsr.ckpt_analysis.experts import Chosen, JobSpec, JobTracker, best_checkpoint
from linearsr.ckpt_analysis.state import State
from linearsr.model.flow import FULL_RANGE, FlowConfig, Node, format_bound
from linearsr.trainer.rundir import RunDir

log = logging.getLogger(__name__)

CONTROL = "control"


def run_dir_name(key: str, interval) -> str:
    return f"{key}_{format_bound(interval.lo)}_{format_bound(interval.hi)}"


def node_spec(run: RunDir, node: Node, init: str, steps: int, workers: tuple[int, int] | None) -> JobSpec:
    return JobSpec(node.id, f"{node.id} {node.interval}", node.interval,
                   run.path("experts", run_dir_name(node.id, node.interval)), init, steps, workers)


def control_spec(run: RunDir, init: str, steps: int, workers: tuple[int, int] | None, extra: tuple[str, ...]) -> JobSpec:
    return JobSpec(CONTROL, f"control {FULL_RANGE} ({steps} steps, equal compute)", FULL_RANGE,
                   run.path("experts", run_dir_name(CONTROL, FULL_RANGE)), init, steps, workers, extra)


class TreeRun:
    """One decision's tree: `run()` drives it to the leaves' best checkpoints (or a failure)."""

    def __init__(self, run: RunDir, config: dict, cfg: ESGFConfig, flow: FlowConfig, state: State,
                 tracker: JobTracker, poll: float, on_poll: Callable[[], None] | None = None):
        self.rundir, self.config, self.cfg, self.flow, self.state = run, config, cfg, flow, state
        self.tracker = tracker
        self.poll, self.on_poll = poll, on_poll
        self.levels = flow.tree()[0 if cfg.experts.full_range_first else 1:]
        self.steps = cfg.experts.steps or int((config.get("run") or {}).get("steps", 0))
        self.failed: list[str] = []

    @property
    def num_nodes(self) -> int:
        return sum(len(level) for level in self.levels)

    def workers(self, level: list[Node]) -> tuple[int, int] | None:
        """(num_workers, grad_accum) of each job beside this level's (the control counts), when shared."""
        if not self.cfg.experts.share_workers:
            return None
        return shared_workers(self.config, len(level) + int(self.cfg.experts.control))

    def control(self, decision: dict) -> JobSpec | None:
        if not self.cfg.experts.control:
            return None
        return control_spec(self.rundir, decision["checkpoint"], self.steps * self.num_nodes, self.workers(self.levels[0]),
                            self.cfg.experts.control_overrides)

    def _first_inits(self, decision: dict) -> dict[str, str]:
        """The starting checkpoint of each node of the first level run."""
        nodes = self.levels[0]
        if self.cfg.experts.init == "knee" or nodes[0].level == 0:
            return {n.id: decision["checkpoint"] for n in nodes}
        per = decision.get("intervals") or {}
        out = {}
        for n in nodes:
            ckpt = (per.get(n.interval.key) or {}).get("checkpoint")
            if ckpt is None:
                raise ValueError(f"esgf.experts.init = \"per_interval\": the decision has no checkpoint for {n.interval} "
                                 "(the pretrain's val_loss_by_interval does not cover it)")
            out[n.id] = ckpt
        return out

    def _record(self, node: Node, init: str, status: str, best: Chosen | None) -> None:
        tree = self.state.data.setdefault("tree", {})
        tree.update(split=self.flow.split, edges=self.flow.edges(), init=self.cfg.experts.init)
        first = node.level == self.levels[0][0].level
        tree.setdefault("nodes", {})[node.id] = {
            "level": node.level, "index": node.index, "interval": node.interval.key,
            "parent": "decision" if first else node.parent_id, "init": init, "job": node.id, "status": status,
            "best": None if best is None else {"checkpoint": best.checkpoint, "step": best.step, "val_loss": best.val_loss}}

    def run(self, decision: dict) -> list[Chosen] | None:
        """Fine-tune every level; the leaves' best checkpoints in interval order, or None when a
        node failed for good (`self.failed` names the job keys)."""
        control = self.control(decision)
        extra = [control] if control else []
        inits, best = self._first_inits(decision), {}
        for level in self.levels:
            specs = [node_spec(self.rundir, n, inits[n.id], self.steps, self.workers(level)) for n in level]
            for n in level:
                self._record(n, inits[n.id], "running", None)
            self.state.event(f"tree level {level[0].level}: {len(specs)} fine-tune(s) of {self.steps} steps"
                             + (", beside the equal-compute control" if control else ""))
            self.state.save()
            result = self.tracker.run(specs + extra, self.poll, on_poll=self.on_poll, wait_for=[s.key for s in specs])
            self.failed = [s.key for s in specs if result[s.key] != "succeeded"]
            for n, spec in zip(level, specs):
                best[n.id] = None if n.id in self.failed else best_checkpoint(RunDir(spec.run_url), n.interval, self.cfg, n.id)
                self._record(n, inits[n.id], result[spec.key], best[n.id])
            self.state.save()
            if self.failed:
                return None
            inits = {child.id: best[child.parent_id].checkpoint for child in self._children(level)}
            for n in level:
                self.state.event(f"{n.id} {n.interval} done: best checkpoint step {best[n.id].step} "
                                 f"(val loss {best[n.id].val_loss:.4g})")
        if control:
            self._finish_control(control)
        return [best[n.id] for n in self.levels[-1]]

    def _children(self, level: list[Node]) -> list[Node]:
        k = level[0].level + 1
        return self.flow.tree()[k] if k < len(self.flow.tree()) else []

    def _finish_control(self, control: JobSpec) -> None:
        status = self.tracker.run([control], self.poll, on_poll=self.on_poll)[control.key]
        record = {"run": control.run_url, "init": control.init, "steps": control.steps, "status": status, "best": None}
        if status == "succeeded":
            b = best_checkpoint(RunDir(control.run_url), FULL_RANGE, self.cfg, CONTROL)
            record["best"] = {"checkpoint": b.checkpoint, "step": b.step, "val_loss": b.val_loss}
            self.state.event(f"equal-compute control done ({control.steps} steps): best checkpoint step {b.step} "
                             f"(val loss {b.val_loss:.4g})")
        else:
            self.state.event(f"the equal-compute control failed ({control.run_url}); the bundle does not need it",
                             logging.ERROR)
        self.state.data.setdefault("tree", {})["control"] = record
        self.state.save()

    def manifest_tree(self, leaves: list[Chosen]) -> dict:
        """What the bundle records of the tree: its split, and every node with its start and best."""
        nodes = self.state.data.get("tree", {}).get("nodes", {})
        return {"split": self.flow.split, "edges": self.flow.edges(), "depth": self.flow.bisection_depth,
                "init": self.cfg.experts.init, "steps_per_node": self.steps,
                "nodes": [{"id": nid, **rec} for nid, rec in sorted(nodes.items(), key=lambda kv: (kv[1]["level"], kv[1]["index"]))],
                "leaves": [leaf.node for leaf in leaves]}
