"""The end of a run: the final evaluation and checkpoint, the summary, the model handed to the user.

Functions of the ``Trainer`` (``dtrain/train/trainer.py``), kept here so that the trainer reads as the
loop: ``outcome`` is called by every rank when training stops, ``finish`` writes what the user gets
(``model.pt``, the best one with ``--early-stop``; the portable ``model.pt2``; ``summary.json``).
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from dtrain import dist, portable
from dtrain.checkpoint import model_sha256
from dtrain.policy import stop_reason
from dtrain.train import regularize
from dtrain.train.evaluate import evaluate

if TYPE_CHECKING:
    from dtrain.train.trainer import Trainer

log = logging.getLogger(__name__)


def outcome(self: Trainer, state: Any, idle: bool) -> dict[str, Any]:
    """The end of training: a final evaluation if the last one is stale, the final checkpoint, the hash."""
    cfg, feed, stats = self.cfg, self.feed, self.stats
    final_eval = self.final_eval
    if final_eval is None:
        if feed is not None:  # every file's held-out rows, the files read at start and since
            entries = [f for seg in feed.segments for f in seg]
            final_eval = evaluate(self.model, self.stream(self.dataset.file_partitions(entries, "val")),
                                  [f.val for f in entries], cfg, stats)
        else:
            final_eval = evaluate(self.model, self.stream(self.val_parts), self.val_sizes, cfg, stats)
    self.checkpoint(sync=True)
    hashes = dist.allgather_object(model_sha256(self.model.state_dict()), name="model-hash")
    result = {
        "final_loss": self.last_loss, "eval_loss": final_eval.get("eval_loss"),
        "eval_accuracy": final_eval.get("eval_accuracy"), "eval_r2": final_eval.get("eval_r2"),
        "model_sha256": hashes[0], "ranks_identical": len(set(hashes)) == 1, "syncs": self.step.combine.syncs,
        "world_size": self.world, "sharded_step": self.step.sharded is not None,
        "stop_reason": stop_reason(online=self.online, samples=state.samples, max_samples=self.max_samples,
                                   global_step=state.global_step, max_steps=cfg.train.max_steps, idle=idle,
                                   early_stopped=self.early_stopped, diverged=self.diverged),
    }
    if feed is not None:
        result.update(files_consumed=feed.files_done(state.epoch, state.row), files_seen=feed.num_files)
    if self.online and stats.task == "classification" and self.total.rows:
        result["progressive_accuracy"] = self.total.correct / self.total.rows
        result["progressive_loss"] = self.total.loss / self.total.rows
    return result


def finish(self: Trainer, outcome: dict[str, Any]) -> dict[str, Any]:
    """The run directory's model and summary; returns the summary."""
    state, run_dir = self.state, self.run_dir
    wall = time.perf_counter() - self.t_start
    summary = {
        "steps": state.global_step, "epochs": 1 if self.follow else state.epoch + (state.step > 0),
        "samples": state.samples,
        "world_size": outcome.pop("world_size"), "wall_seconds": wall, "samples_per_sec": state.samples / wall,
        "mode": self.cfg.train.mode, "task": self.stats.task, **outcome,
        **self.coord.report(),  # checkpoint failures, if any
        "zero_weights": regularize.zero_share(list(self.model.parameters())),  # --l1's exact zeros
    }
    model = self.model.state_dict()
    if state.best_model is not None:  # --early-stop: model.pt (and model.pt2) the best evaluated model
        summary.update(best_step=state.early["best_step"], best_value=state.early["best"],
                       monitor=state.early["metric"])
        run_dir.save_model(model, "model-last.pt")
        model = state.best_model
    run_dir.save_model(model)
    if run_dir.enabled:  # the portable model.pt2 (dtrain/portable.py): raw features in, labels out
        try:
            portable.save_run_artifact(run_dir.path, model, self.stats, self.cfg)
        except OSError as e:  # model.pt is saved (or its fallback named): the artifact can be made from it
            log.warning("could not write %s/model.pt2 (%s); dtrain.load(RUN_DIR) rebuilds the model from "
                        "model.pt", run_dir.path, e)
    run_dir.save_summary(summary)
    run_dir.close()
    if dist.is_main():
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "model_sha256"}))
    return summary
