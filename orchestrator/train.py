"""``rime train CONFIG``: the configured stages in sequence on one set of Ray learner actors.

The driver owns the order of work, verl-style: one step loop runs any registered stage
(``orchestrator.stages``) and owns what every stage shares: step counters, the progress bar, MLflow,
DeepSpeed checkpoints, scheduled evals with ``rime eval``'s code and resume. Everything a resume needs is
in ``state.json`` (``run_state.RunState``), written atomically only after every rank finished its
checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rime_data.pipeline import PipelineConfig

from .config import Config, dump_config
from .logs import PACKAGES, attach_run_log, detach_run_log, quiet_ray_data
from .pair_mix import MixedPairStream
from .pairs import PairStream, StreamPosition
from .run_state import CheckpointMeta, RunDirError, RunState, prepare_run_dir, write_json_atomic
from .stages import STAGES, Stage, StageContext
from .tracking import run_dir_uri, tracking_uri_or_none, use_experiment

log = logging.getLogger(__name__)

__all__ = ["RunDirError", "Trainer", "ensure_data", "resolve_model", "train"]


def _style_of(split_dir: Path) -> str:
    """The generator style a synth split was written with (styled splits record it in provenance.jsonl)."""
    prov = split_dir / "provenance.jsonl"
    if not prov.is_file():
        return "classic"
    with open(prov) as f:
        first = f.readline()
    return json.loads(first).get("style", "classic") if first.strip() else "classic"


def ensure_data(cfg: Config) -> Path:
    """The dataset folder; generated with ``rime data synth`` settings when missing. With ``data.mix`` the
    training data comes from the mixture's folders (each must hold the train split) and data.path needs
    only the eval split."""
    from rime_data.synth import write_synth

    dc = cfg.data
    path = Path(dc.path)
    for m in dc.mix:
        if not (Path(m.path) / dc.train_split / "queries.parquet").is_file():
            raise FileNotFoundError(
                f"data.mix: {m.path} has no {dc.train_split}/queries.parquet; point it at a rime dataset folder "
                "(`rime data import-train`, `rime data synth`)"
            )
    needed = [dc.eval_split] if dc.mix else [dc.train_split, dc.eval_split]
    if all((path / s / "queries.parquet").is_file() for s in needed):
        have = _style_of(path / dc.train_split) if not dc.mix else dc.synth_style
        if have != dc.synth_style and dc.train_split == "train":
            raise FileExistsError(
                f"data.path: {path} holds {have} synth data but data.synth_style is {dc.synth_style}; "
                "point data.path at another folder or delete this one to regenerate it"
            )
        return path
    present = sorted(p.parent.name for p in path.glob("*/queries.parquet"))
    if present:  # the user's data: never generate over it
        raise FileNotFoundError(
            f"data.path: {path} holds splits {present} but lacks {[s for s in needed if s not in present]}; "
            "add them (`rime data import-mmeb --split test`, `rime data import-train`), set data.train_split / "
            "data.eval_split to splits it has, or train on it through data.mix with another data.path to evaluate on"
        )
    sizes = {"train": dc.synth_train, "val": dc.synth_val, "test": dc.synth_test}
    if not all(sizes.get(s, 0) > 0 for s in needed):
        raise FileNotFoundError(
            f"data.path: {path} lacks splits {needed} and data.synth_* sizes are 0; "
            "generate it with `rime data synth` or set data.synth_train/test"
        )
    log.info(f"generating procedural {dc.synth_style} data into {path} ({sizes} queries per task)")
    write_synth(path, {k: v for k, v in sizes.items() if v > 0}, seed=cfg.run.seed, tasks=dc.synth_tasks, style=dc.synth_style)
    return path


def ensure_transfer_data(cfg: Config) -> Path | None:
    """``data.transfer_path``'s eval split, generated in the transfer style when missing (None: not configured)."""
    from rime_data.synth import write_synth

    dc = cfg.data
    if not dc.transfer_path:
        return None
    path = Path(dc.transfer_path)
    if not (path / dc.eval_split / "queries.parquet").is_file():
        log.info(f"generating the transfer split into {path} ({dc.synth_test} queries per task)")
        write_synth(path, {dc.eval_split: dc.synth_test}, seed=cfg.run.seed + 1, tasks=dc.synth_tasks, style="transfer")
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
    """One run: Ray, learners, data stream, tracking, checkpoints, evals; the stages do the steps."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False, verbose: bool = False):
        self.cfg, self.run_dir, self.verbose = cfg, cfg.run_dir, verbose
        self.state = prepare_run_dir(cfg.run_dir, resume, overwrite) or RunState()
        dump_config(cfg, self.run_dir / "config.yaml")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._owns_ray = False  # set by _start_ray: stop Ray at the end only if this trainer started it
        self.stage: Stage | None = None  # the running stage (monitoring hook for tests)
        self.transfer_dir: Path | None = None
        self.transfer_results: dict[str, dict] = {}  # eval tag -> transfer-split results

    # ------------------------------------------------------------------ plumbing
    def _save_state(self) -> None:
        self.state.save(self.run_dir)

    def _start_ray(self) -> None:
        """Connect to ``cluster.address`` or start a local cluster, unless the caller already runs Ray (then
        that session is used and left running: ``_stop_ray`` only stops what this trainer started)."""
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            if self.cfg.cluster.address:
                ray.init(address=self.cfg.cluster.address, log_to_driver=False)
            else:
                # address="local": always a fresh in-process cluster, never one another process left behind.
                ray.init(
                    address="local", num_cpus=self.cfg.cluster.num_cpus or None, include_dashboard=False, log_to_driver=False
                )
        quiet_ray_data(self.verbose)

    def _stop_ray(self) -> None:
        import ray

        if self._owns_ray:
            ray.shutdown()

    def _start_mlflow(self):
        import mlflow

        uri = tracking_uri_or_none(self.cfg.tracking.uri) or run_dir_uri(self.run_dir)
        use_experiment(uri, self.cfg.tracking.experiment)
        st = self.state
        run = mlflow.start_run(run_id=st.mlflow_run_id, run_name=None if st.mlflow_run_id else self.cfg.run.name)
        if not st.mlflow_run_id:
            st.mlflow_run_id = run.info.run_id
            mlflow.log_params(self.cfg.flat())
            mlflow.log_artifact(str(self.run_dir / "config.yaml"))
            self._save_state()
        log.info(f"mlflow run {run.info.run_id} at {uri}")
        return mlflow

    def _evaluate(self, model_dir: str, tag: str, step: int) -> dict:
        """``rime eval`` on the eval split, and on the transfer split when configured (``eval_transfer/*``)."""
        from rime_model import load_embedder

        emb = load_embedder(model_dir)
        out = self._evaluate_on(emb, self.data_dir, tag, step, "eval")
        if self.transfer_dir is not None:
            self.transfer_results[tag] = self._evaluate_on(emb, self.transfer_dir, f"{tag}-transfer", step, "eval_transfer")
        return out

    def _evaluate_on(self, emb, data_dir: Path, tag: str, step: int, prefix: str) -> dict:
        from rime_model import GenerationConfig

        from .eval_report import format_table, write_report
        from .evaluate import evaluate

        ec = self.cfg.eval
        t = time.perf_counter()
        result = evaluate(
            emb,
            data_dir,
            split=self.cfg.data.eval_split,
            query_modes=ec.query_modes,
            cand_modes=ec.cand_modes,
            batch_size=ec.batch_size,
            generation=GenerationConfig(max_new_tokens=ec.max_new_tokens),
            max_queries_per_task=ec.max_queries_per_task,
        )
        report = write_report(result, self.run_dir / "eval" / f"{tag}.json", {"tag": tag, "step": step})
        log.info(f"eval {tag} on {data_dir} (step {step}, {time.perf_counter() - t:.0f}s):\n{format_table(result)}")
        flat = {f"{prefix}/{k}".replace("@", "_at_"): v for k, v in result.flat_metrics().items() if k.count("/") == 1}
        if result.rewrite_tokens_mean is not None:
            flat[f"{prefix}/rewrite_tokens_mean"] = result.rewrite_tokens_mean
        flat.update({f"{prefix}/rewrite_{k}": v for k, v in result.rewrite_stats.items()})
        for r in result.rewrite_samples[:6]:
            log.info(f"  {r['task']:10s} rewrite {r['rewrite']!r} (ideal {r['ideal']!r})")
        self.mlflow.log_metrics(flat, step=step)
        self.mlflow.log_artifact(str(report), artifact_path="eval")
        return {p: agg["all"] for p, agg in result.pairs.items()}

    def _checkpoint(self, group, position: StreamPosition) -> None:
        st = self.state
        tag = f"step{st.step}"
        t = time.perf_counter()
        meta = CheckpointMeta(st.step, st.stage or "", st.stage_step, copy.deepcopy(position))
        group.call("save_checkpoint", str(self.ckpt_dir), tag, asdict(meta))
        st.checkpoint, st.checkpoint_meta, st.position = tag, meta, meta.position
        self._save_state()
        tags = sorted(
            (p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")), key=lambda p: int(p.name[4:])
        )
        for old in tags[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.mlflow.log_metric("time/checkpoint_s", time.perf_counter() - t, step=st.step)

    def _check_placement(self) -> None:
        """Fail before any tracking or eval work when the cluster can never host every role of the run."""
        import ray

        from .learner_group import learner_request
        from .placement import DATA_TASK_CPUS, check_fits

        if self.cfg.cluster.autoscaling:
            log.info(
                f"cluster.autoscaling: the roles are not checked against the nodes present now; placement "
                f"waits up to cluster.placement_timeout_s={self.cfg.cluster.placement_timeout_s:g}s for the autoscaler"
            )
            return
        roles = [learner_request(self.cfg)] + [r for s in self.cfg.run.stages for r in STAGES[s].roles(self.cfg)]
        try:
            check_fits(roles, ray.cluster_resources(), reserve_cpus=DATA_TASK_CPUS)
        except Exception:
            self._stop_ray()
            raise

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        from .learner_group import LearnerGroup

        cfg = self.cfg
        run_log = attach_run_log(self.run_dir / "train.log")
        try:
            for name in cfg.run.stages:
                STAGES[name].preflight(cfg)  # seconds, before data, model or actors
            self.data_dir = ensure_data(cfg)
            self.transfer_dir = ensure_transfer_data(cfg)
            self.model_path = resolve_model(cfg)
            for name in cfg.run.stages:
                STAGES[name].check_start_model(cfg, self.model_path)
            self._start_ray()
            self._check_placement()
            self.mlflow = self._start_mlflow()
            summary: dict[str, Any] = {"run_dir": str(self.run_dir), "mlflow_run_id": self.state.mlflow_run_id}
            try:
                if cfg.eval.before_training and not self.state.baseline_done:
                    summary["baseline"] = self._evaluate(self.model_path, "baseline", 0)
                    if "baseline" in self.transfer_results:
                        summary["baseline_transfer"] = self.transfer_results["baseline"]
                    self.state.baseline_done = True
                    self._save_state()
                options = {k: v for s in cfg.run.stages for k, v in STAGES[s].learner_options(cfg).items()}
                group = LearnerGroup(cfg, self.model_path, STAGES[cfg.run.stages[0]].settings(cfg).loss_cfg, **options)
                try:
                    summary.update(self._stages(group))
                finally:
                    group.shutdown()
            finally:
                self.mlflow.end_run()
                self._stop_ray()
            write_json_atomic(self.run_dir / "summary.json", summary)
            return summary
        finally:
            detach_run_log(run_log)

    def _stages(self, group) -> dict:
        """Run the configured stages in order on the same learners; a resume re-enters the current one."""
        st, out, stages = self.state, {"stages": {}}, self.cfg.run.stages
        pending_load = st.checkpoint  # learners start from the base model; a resume loads this first
        if pending_load:  # roll back to what the checkpoint holds; later work (steps, evals) is redone
            meta = st.checkpoint_meta
            st.step, st.stage, st.stage_step, st.position = meta.step, meta.stage, meta.stage_step, meta.position
            st.stages_done = list(stages[: stages.index(meta.stage)])
        else:
            st.step, st.stage, st.stage_step, st.stages_done, st.position = 0, None, 0, [], StreamPosition()
        prev_model = self.model_path
        for i, name in enumerate(stages):
            last = i == len(stages) - 1
            final_dir = self.run_dir / ("final" if last else f"stages/{name}")
            if name in st.stages_done:
                prev_model = str(final_dir)
                continue
            if st.stage != name:
                st.stage, st.stage_step, st.position = name, 0, StreamPosition()
            start_model = st.stage_models.setdefault(name, prev_model)
            self._save_state()
            ss = STAGES[name].settings(self.cfg)
            group.call("begin_stage", name, ss.loss_cfg, ss.lr, ss.warmup_steps, start_model, embedding_lr=ss.embedding_lr)
            if pending_load:  # same loss and scheduler layout first, then weights + optimizer + scheduler state
                self._load(group, pending_load)
                pending_load = None
            log.info(f"stage {name}: {ss.steps} steps from {start_model}")
            out.update(self._run_stage(name, group, start_model, ss.steps))
            group.call("save_embedder", str(final_dir))
            out["stages"][name] = self._evaluate(str(final_dir), "final" if last else f"after-{name}", st.step)
            st.stages_done.append(name)
            self._save_state()
            prev_model = str(final_dir)
        out["final"] = out["stages"].get(stages[-1]) or self._evaluate(prev_model, "final", st.step)
        if self.transfer_results:
            out["final_transfer"] = self.transfer_results.get("final")
        out["checksums"] = group.call("param_checksum")
        if self.cfg.tracking.log_model:
            from .mlflow_model import log_embedder_model

            out["model_uri"] = log_embedder_model(prev_model)
        out.update(steps=st.step, final_model=prev_model)
        st.finished = True
        self._save_state()
        return out

    def _run_stage(self, name: str, group, start_model: str, steps: int) -> dict:
        """The one step loop: any stage, its steps from the state's stage step to ``steps``."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        st = self.state
        ctx = StageContext(
            cfg=self.cfg,
            learners=group,
            run_dir=self.run_dir,
            data_dir=self.data_dir,
            state=st,
            start_model=start_model,
            open_stream=self._stream,
            log_metrics=lambda m, step: self.mlflow.log_metrics(m, step=step),
            log_artifact=lambda path, where: self.mlflow.log_artifact(path, artifact_path=where),
        )
        stage = self.stage = STAGES[name](ctx)
        loggers = [logging.getLogger(p) for p in PACKAGES]
        try:
            stage.start()
            # disable=None: a bar on a terminal only; logs and CI get the stage's log lines
            with (
                logging_redirect_tqdm(loggers),
                tqdm(total=steps, initial=st.stage_step, desc=name, unit="step", disable=None, dynamic_ncols=True) as bar,
            ):
                while st.stage_step < steps:
                    metrics = stage.step(st.stage_step)
                    st.step += 1
                    st.stage_step += 1
                    bar.update(1)
                    bar.set_postfix(stage.postfix(metrics), refresh=False)
                    if st.stage_step % stage.log_every == 0 or st.stage_step == 1:
                        log.info(stage.log_line(st.stage_step, metrics))
                    self._after_step(group, metrics, stage.position, steps)
            return stage.end()
        finally:
            stage.close()

    def _load(self, group, tag: str) -> None:
        client = group.call("load_checkpoint", str(self.ckpt_dir), tag)[0]
        self.state.position = StreamPosition(**client["position"])
        log.info(
            f"resumed from {tag} at step {self.state.step} (stage {self.state.stage} step "
            f"{self.state.stage_step}), data position {client['position']}"
        )

    def _stream(self, by_task: bool) -> PairStream | MixedPairStream:
        """The training pairs at the run's data position: data.path's train split, or the data.mix mixture."""
        from rime_model import Embedder

        pipeline = PipelineConfig(reserved_tokens=Embedder.reserved_tokens_of(self.model_path))
        dc = self.cfg.data

        def one(path: str | Path) -> PairStream:
            errors = self.run_dir / "data_errors.jsonl"
            args = (dc.train_split, self.cfg.run.seed, dc.shuffle_buffer, errors)
            return PairStream(path, *args, pipeline=pipeline, group_by_task=by_task)

        stream: PairStream | MixedPairStream
        if dc.mix:
            parts = [one(m.path) for m in dc.mix]
            stream = MixedPairStream(parts, [m.weight for m in dc.mix], self.cfg.run.seed, [m.path for m in dc.mix])
        else:
            stream = one(self.data_dir)
        stream.pos = copy.deepcopy(self.state.position)
        return stream

    def _after_step(self, group, metrics: dict, position: StreamPosition, steps: int) -> None:
        """Log, then checkpoint / evaluate on schedule (never on a stage's last step: the stage end does)."""
        st, cfg = self.state, self.cfg
        self.mlflow.log_metrics(metrics, step=st.step)
        if st.stage_step == steps:
            self._checkpoint(group, position)
            return
        if st.stage_step % cfg.checkpoint.every_steps == 0:
            self._checkpoint(group, position)
        if cfg.eval.every_steps and st.stage_step % cfg.eval.every_steps == 0:
            group.call("save_embedder", str(self.run_dir / "eval_model"))
            self._evaluate(str(self.run_dir / "eval_model"), f"step{st.step}", st.step)


def train(cfg: Config, resume: bool = False, overwrite: bool = False, verbose: bool = False) -> dict:
    """Run (or resume) the stages of ``cfg``; returns the run summary."""
    return Trainer(cfg, resume, overwrite, verbose).run()
