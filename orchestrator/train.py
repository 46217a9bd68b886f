"""``rime train CONFIG``: the stage loop on Ray (CMA now; Refine-RL and PLUME join it).

The driver owns the order of work, verl-style: it streams pairs from Ray Data, hands each
learner its shard of the step's batch through the object store, gathers loss terms, logs them to
MLflow, checkpoints through DeepSpeed and evaluates with ``rime eval``'s code. Everything a
resume needs (MLflow run id, step, data position, last checkpoint tag) is in ``state.json``,
written atomically only after every rank finished its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import Config, dump_config
from .pairs import PairStream, StreamPosition
from .tracking import run_dir_uri

STATE = "state.json"


class RunDirError(RuntimeError):
    """The run directory's state does not match what was asked (new run vs resume)."""


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> dict | None:
    """Create or reopen the run dir; returns the saved state when resuming."""
    run_dir = cfg.run_dir
    state_file = run_dir / STATE
    if resume:
        if not state_file.is_file():
            raise RunDirError(f"--resume: no {state_file}; start the run without --resume first")
        return json.loads(state_file.read_text())
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"run dir {run_dir} exists; pass --resume to continue it, --overwrite to start over, "
                              "or set run.name to a new name")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def ensure_data(cfg: Config) -> Path:
    """The dataset folder; generated with ``rime data synth`` settings when missing."""
    from rime_data.synth import write_synth

    path = Path(cfg.data.path)
    needed = [cfg.data.train_split, cfg.data.eval_split]
    if all((path / s / "queries.parquet").is_file() for s in needed):
        return path
    sizes = {"train": cfg.data.synth_train, "val": cfg.data.synth_val, "test": cfg.data.synth_test}
    if not all(sizes.get(s, 0) > 0 for s in needed):
        raise FileNotFoundError(f"data.path: {path} lacks splits {needed} and data.synth_* sizes are 0; "
                                "generate it with `rime data synth` or set data.synth_train/test")
    print(f"[rime] generating procedural data into {path} ({sizes} queries per task)")
    write_synth(path, {k: v for k, v in sizes.items() if v > 0}, seed=cfg.run.seed, tasks=cfg.data.synth_tasks)
    return path


def resolve_model(cfg: Config) -> str:
    """A folder every learner can load: zoo models from the cache, hf: checkpoints saved once with rime's tokens."""
    from rime_model import load_embedder
    from rime_model.zoo import BUILDERS, ensure_zoo_model

    spec = cfg.model.spec
    if spec in BUILDERS:
        return str(ensure_zoo_model(spec, seed=cfg.run.seed))
    if Path(spec, "rime_embedder.json").is_file():
        return spec
    base = cfg.run_dir / "base_model"
    if not (base / "rime_embedder.json").is_file():
        load_embedder(spec).save(base)
    return str(base)


class Trainer:
    """One run: Ray, learners, data stream, tracking, checkpoints, evals."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.state = prepare_run_dir(cfg, resume, overwrite) or {
            "mlflow_run_id": None, "step": 0, "position": asdict(StreamPosition()), "checkpoint": None,
            "baseline_done": False, "finished": False,
        }
        dump_config(cfg, self.run_dir / "config.yaml")
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ plumbing
    def _save_state(self) -> None:
        _write_json_atomic(self.run_dir / STATE, self.state)

    def _start_ray(self) -> None:
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if ray.is_initialized():
            return
        if self.cfg.cluster.address:
            ray.init(address=self.cfg.cluster.address, log_to_driver=False)
        else:
            # address="local": always a fresh in-process cluster, never one another process left behind.
            ray.init(address="local", num_cpus=self.cfg.cluster.num_cpus or None, include_dashboard=False, log_to_driver=False)

    def _start_mlflow(self):
        import mlflow

        uri = self.cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or run_dir_uri(self.run_dir)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.cfg.tracking.experiment)
        run = mlflow.start_run(run_id=self.state["mlflow_run_id"], run_name=None if self.state["mlflow_run_id"] else self.cfg.run.name)
        if not self.state["mlflow_run_id"]:
            self.state["mlflow_run_id"] = run.info.run_id
            mlflow.log_params(self.cfg.flat())
            mlflow.log_artifact(str(self.run_dir / "config.yaml"))
            self._save_state()
        print(f"[rime] mlflow run {run.info.run_id} at {uri}")
        return mlflow

    def _evaluate(self, model_dir: str, tag: str, step: int) -> dict:
        from rime_model import GenerationConfig, load_embedder

        from .evaluate import evaluate, format_table, write_report

        ec = self.cfg.eval
        t = time.perf_counter()
        result = evaluate(load_embedder(model_dir), self.data_dir, split=self.cfg.data.eval_split,
                          query_modes=ec.query_modes, cand_modes=ec.cand_modes, batch_size=ec.batch_size,
                          generation=GenerationConfig(max_new_tokens=ec.max_new_tokens),
                          max_queries_per_task=ec.max_queries_per_task)
        report = write_report(result, self.run_dir / "eval" / f"{tag}.json", {"tag": tag, "step": step})
        print(f"[rime] eval {tag} (step {step}, {time.perf_counter() - t:.0f}s):\n{format_table(result)}")
        flat = {f"eval/{k}".replace("@", "_at_"): v for k, v in result.flat_metrics().items() if k.count("/") == 1}
        if result.rewrite_tokens_mean is not None:
            flat["eval/rewrite_tokens_mean"] = result.rewrite_tokens_mean
        self.mlflow.log_metrics(flat, step=step)
        self.mlflow.log_artifact(str(report), artifact_path="eval")
        return {p: agg["all"] for p, agg in result.pairs.items()}

    def _checkpoint(self, group, stream: PairStream) -> None:
        tag = f"step{self.state['step']}"
        t = time.perf_counter()
        group.call("save_checkpoint", str(self.ckpt_dir), tag, {"position": asdict(stream.pos)})
        self.state.update(checkpoint=tag, position=asdict(stream.pos))
        self._save_state()
        tags = sorted((p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                      key=lambda p: int(p.name[4:]))
        for old in tags[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.mlflow.log_metric("time/checkpoint_s", time.perf_counter() - t, step=self.state["step"])

    def _check_placement(self) -> None:
        """Fail before any tracking or eval work when the cluster can never host the learners."""
        import ray

        from .learner_group import DATA_TASK_CPUS, learner_request
        from .placement import check_fits

        try:
            check_fits([learner_request(self.cfg)], ray.cluster_resources(), reserve_cpus=DATA_TASK_CPUS)
        except Exception:
            ray.shutdown()
            raise

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        import ray

        from .learner_group import LearnerGroup

        cfg = self.cfg
        self.data_dir = ensure_data(cfg)
        model_path = resolve_model(cfg)
        self._start_ray()
        self._check_placement()
        self.mlflow = self._start_mlflow()
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "mlflow_run_id": self.state["mlflow_run_id"]}
        try:
            if cfg.eval.before_training and not self.state["baseline_done"]:
                summary["baseline"] = self._evaluate(model_path, "baseline", 0)
                self.state["baseline_done"] = True
                self._save_state()
            stage = {"lambda_cma": cfg.cma.lambda_cma, "temperature": cfg.cma.temperature, "ce_weight": cfg.cma.ce_weight}
            group = LearnerGroup(cfg, model_path, stage)
            try:
                summary.update(self._train_loop(group))
            finally:
                group.shutdown()
        finally:
            self.mlflow.end_run()
            ray.shutdown()
        _write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _train_loop(self, group) -> dict:
        cfg = self.cfg
        stream = PairStream(self.data_dir, cfg.data.train_split, cfg.run.seed, cfg.data.shuffle_buffer,
                            self.run_dir / "data_errors.jsonl", group_by_task=cfg.data.batch_by_task)
        if self.state["checkpoint"]:
            client = group.call("load_checkpoint", str(self.ckpt_dir), self.state["checkpoint"])[0]
            stream.pos = StreamPosition(**client["position"])
            print(f"[rime] resumed from {self.state['checkpoint']} at step {self.state['step']}, data position {stream.pos}")
        try:
            return self._steps(group, stream)
        finally:
            stream.close()

    def _steps(self, group, stream: PairStream) -> dict:
        cfg, lc = self.cfg, self.cfg.learners
        per_rank = lc.micro_batch_size * lc.grad_accum_steps
        out: dict[str, Any] = {}
        while self.state["step"] < cfg.cma.steps:
            t0 = time.perf_counter()
            pairs = stream.next_batch(per_rank * group.size)
            t_data = time.perf_counter() - t0
            shards = [
                ([pairs[(r * lc.grad_accum_steps + a) * lc.micro_batch_size:(r * lc.grad_accum_steps + a + 1) * lc.micro_batch_size]
                  for a in range(lc.grad_accum_steps)],)
                for r in range(group.size)
            ]
            terms = group.call("train_step", per_rank=shards)
            self.state["step"] += 1
            step = self.state["step"]
            dt = time.perf_counter() - t0
            metrics = {f"train/{k}": sum(t[k] for t in terms) / len(terms) for k in terms[0] if k != "pairs"}
            metrics.update({"perf/samples_per_s": len(pairs) / dt, "perf/step_time_s": dt, "perf/data_time_s": t_data,
                            "data/bad_rows": stream.bad_rows, "data/epoch": stream.pos.epoch,
                            "data/dropped_remainder_pairs": stream.dropped_pairs})
            self.mlflow.log_metrics(metrics, step=step)
            if step % 10 == 0 or step == 1:
                print(f"[rime] step {step}/{cfg.cma.steps} loss {metrics['train/loss']:.3f} "
                      f"(nce_disc {metrics['train/nce_disc']:.3f}, nce_gen {metrics['train/nce_gen']:.3f}, ce {metrics['train/ce']:.3f}) "
                      f"{metrics['perf/samples_per_s']:.1f} pairs/s")
            if step % cfg.checkpoint.every_steps == 0 and step < cfg.cma.steps:
                self._checkpoint(group, stream)
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < cfg.cma.steps:
                group.call("save_embedder", str(self.run_dir / "eval_model"))
                self._evaluate(str(self.run_dir / "eval_model"), f"step{step}", step)
            out["final_loss"] = metrics["train/loss"]
        final = self.run_dir / "final"
        group.call("save_embedder", str(final))
        self._checkpoint(group, stream)
        out["checksums"] = group.call("param_checksum")
        out["final"] = self._evaluate(str(final), "final", self.state["step"])
        if cfg.tracking.log_model:
            from .mlflow_model import log_embedder_model

            out["model_uri"] = log_embedder_model(str(final))
        out.update(steps=self.state["step"], bad_rows=stream.bad_rows, final_model=str(final))
        self.state["finished"] = True
        self._save_state()
        return out


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) the stages of ``cfg``; returns the run summary."""
    return Trainer(cfg, resume, overwrite).run()
