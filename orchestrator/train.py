"""``rime train CONFIG``: the stages (cma, refine-rl) in sequence on one set of Ray learner actors.

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
from typing import Any, NamedTuple

from rime_data.pipeline import PipelineConfig

from .config import Config, dump_config
from .pairs import PairStream, StreamPosition
from .tracking import run_dir_uri, tracking_uri_or_none, use_experiment

STATE = "state.json"


class StageSettings(NamedTuple):
    learner_cfg: dict  # the stage's loss settings, as the learners take them
    lr: float
    warmup_steps: int
    steps: int
    embedding_lr: float  # the token embedding's rate; 0 = lr


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


def announce_adapter(cfg: Config, model_path: str) -> dict[str, tuple]:
    """Say so when the start model carries a transition adapter whose settings differ from ``plume.*``:
    the learners replace it with a fresh one of the configured shape (an ablation from a CoT model means
    what it says), so its weights do not carry over. Returns the differing settings (saved, configured)."""
    from rime_model import Embedder
    from rime_model.latent import adapter_differences

    saved = Embedder.saved_settings(model_path).get("latent_adapter")
    diff = adapter_differences(saved, cfg.plume.adapter()) if saved else {}
    if diff:
        print("[rime] plume: the start model's transition adapter differs from the config ("
              + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
              + "); the learners start a fresh adapter of the configured shape, its weights do not carry over")
    return diff


def check_rl_objective(cfg: Config) -> None:
    """Run the configured verl estimator and policy loss on hand-made inputs (verl is too slow to import
    in config validation): a name verl lists but rime cannot feed fails here with its key, not after
    every rollout and reward actor has started and the first batch is scored."""
    import torch

    from rewards.advantages import check_estimator
    from rime_model.policy_loss import PolicyLossConfig, policy_loss

    from .config import ConfigError

    rl = cfg.refine_rl
    try:
        check_estimator(rl.estimator)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lp = torch.zeros(2, 3)
    try:
        policy_loss(lp, lp, lp, torch.tensor([1.0, -1.0]), torch.ones(2, 3),
                    PolicyLossConfig(policy_loss=rl.policy_loss, loss_agg_mode=rl.loss_agg_mode, kl_type=rl.kl_type,
                                     kl_coef=rl.kl_coef, loss_scale_factor=cfg.rollout.max_new_tokens + 2))
    except Exception as e:  # noqa: BLE001 - verl raises ValueError/NotImplementedError/TypeError by name
        raise ConfigError(f"refine_rl.policy_loss/kl_type: {rl.policy_loss!r} with kl_type {rl.kl_type!r} fails in verl "
                          f"({type(e).__name__}: {str(e)[:160]}); vanilla, gspo, clip_cov, kl_cov, gpg are verl's "
                          "common policy losses, low_var_kl, kl, abs, mse its KL estimators") from None


class Trainer:
    """One run: Ray, learners, data stream, tracking, checkpoints, evals."""

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.state = prepare_run_dir(cfg, resume, overwrite) or {
            "mlflow_run_id": None, "step": 0, "position": asdict(StreamPosition()), "checkpoint": None,
            "baseline_done": False, "finished": False, "stage": None, "stage_step": 0, "stages_done": [],
            "stage_models": {},
        }
        dump_config(cfg, self.run_dir / "config.yaml")
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._owns_ray = False  # set by _start_ray: stop Ray at the end only if this trainer started it

    # ------------------------------------------------------------------ plumbing
    def _save_state(self) -> None:
        _write_json_atomic(self.run_dir / STATE, self.state)

    def _start_ray(self) -> None:
        """Connect to ``cluster.address`` or start a local cluster, unless the caller already runs Ray (then
        that session is used and left running: ``_stop_ray`` only stops what this trainer started)."""
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self._owns_ray = not ray.is_initialized()
        if not self._owns_ray:
            return
        if self.cfg.cluster.address:
            ray.init(address=self.cfg.cluster.address, log_to_driver=False)
        else:
            # address="local": always a fresh in-process cluster, never one another process left behind.
            ray.init(address="local", num_cpus=self.cfg.cluster.num_cpus or None, include_dashboard=False, log_to_driver=False)

    def _stop_ray(self) -> None:
        import ray

        if self._owns_ray:
            ray.shutdown()

    def _start_mlflow(self):
        import mlflow

        uri = tracking_uri_or_none(self.cfg.tracking.uri) or run_dir_uri(self.run_dir)
        use_experiment(uri, self.cfg.tracking.experiment)
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
        flat.update({f"eval/rewrite_{k}": v for k, v in result.rewrite_stats.items()})
        for r in result.rewrite_samples[:6]:
            print(f"[rime]   {r['task']:10s} rewrite {r['rewrite']!r} (ideal {r['ideal']!r})")
        self.mlflow.log_metrics(flat, step=step)
        self.mlflow.log_artifact(str(report), artifact_path="eval")
        return {p: agg["all"] for p, agg in result.pairs.items()}

    def _checkpoint(self, group, position: StreamPosition) -> None:
        tag = f"step{self.state['step']}"
        t = time.perf_counter()
        meta = {"position": asdict(position), "stage": self.state["stage"], "stage_step": self.state["stage_step"],
                "step": self.state["step"]}
        group.call("save_checkpoint", str(self.ckpt_dir), tag, meta)
        self.state.update(checkpoint=tag, checkpoint_meta=meta, position=asdict(position))
        self._save_state()
        tags = sorted((p for p in self.ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")),
                      key=lambda p: int(p.name[4:]))
        for old in tags[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        self.mlflow.log_metric("time/checkpoint_s", time.perf_counter() - t, step=self.state["step"])

    def _check_placement(self) -> None:
        """Fail before any tracking or eval work when the cluster can never host every role of the run."""
        import ray

        from .learner_group import DATA_TASK_CPUS, learner_request
        from .placement import check_fits
        from .rl_actors import rl_requests

        if self.cfg.cluster.autoscaling:
            print(f"[rime] cluster.autoscaling: the roles are not checked against the nodes present now; placement "
                  f"waits up to cluster.placement_timeout_s={self.cfg.cluster.placement_timeout_s:g}s for the autoscaler")
            return
        roles = [learner_request(self.cfg)] + (rl_requests(self.cfg) if "refine-rl" in self.cfg.run.stages else [])
        try:
            check_fits(roles, ray.cluster_resources(), reserve_cpus=DATA_TASK_CPUS)
        except Exception:
            self._stop_ray()
            raise

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        import ray

        from .learner_group import LearnerGroup

        cfg = self.cfg
        if "refine-rl" in cfg.run.stages:
            check_rl_objective(cfg)  # seconds, before data, model or actors
        self.data_dir = ensure_data(cfg)
        self.model_path = resolve_model(cfg)
        if "plume" in cfg.run.stages:
            announce_adapter(cfg, self.model_path)
        self._start_ray()
        self._check_placement()
        self.mlflow = self._start_mlflow()
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "mlflow_run_id": self.state["mlflow_run_id"]}
        try:
            if cfg.eval.before_training and not self.state["baseline_done"]:
                summary["baseline"] = self._evaluate(self.model_path, "baseline", 0)
                self.state["baseline_done"] = True
                self._save_state()
            group = LearnerGroup(cfg, self.model_path, self._stage_settings("cma").learner_cfg)
            try:
                summary.update(self._stages(group))
            finally:
                group.shutdown()
        finally:
            self.mlflow.end_run()
            self._stop_ray()
        _write_json_atomic(self.run_dir / "summary.json", summary)
        return summary

    def _stage_settings(self, stage: str) -> StageSettings:
        """What the learners need to run ``stage`` and how long it runs."""
        cfg = self.cfg
        if stage == "cma":
            c = cfg.cma
            return StageSettings({"lambda_cma": c.lambda_cma, "temperature": c.temperature, "ce_weight": c.ce_weight},
                                 cfg.learners.lr, cfg.learners.warmup_steps, c.steps, c.embedding_lr)
        if stage == "plume":
            pc = cfg.plume
            return StageSettings({"segments": pc.segments, "temperature": pc.temperature, "ce_weight": pc.ce_weight,
                                  "disc_weight": pc.disc_weight, "lambda_bal": pc.lambda_bal,
                                  "target_layout": pc.target_layout, "latent_steps": pc.latent_steps},
                                 pc.lr, pc.warmup_steps, self._plume_schedule().total_steps, pc.embedding_lr)
        from .refine_rl import stage_config

        rl = cfg.refine_rl
        return StageSettings(stage_config(cfg), rl.lr, rl.warmup_steps, rl.steps, rl.embedding_lr)

    def _plume_schedule(self):
        return self.cfg.plume.schedule()

    def _stages(self, group) -> dict:
        """Run the configured stages in order on the same learners; a resume re-enters the current one."""
        st, out, stages = self.state, {"stages": {}}, self.cfg.run.stages
        pending_load = st["checkpoint"]  # learners start from the base model; a resume loads this first
        if pending_load:  # roll back to what the checkpoint holds; later work (steps, evals) is redone
            meta = st["checkpoint_meta"]
            st.update(step=meta["step"], stage=meta["stage"], stage_step=meta["stage_step"], position=meta["position"],
                      stages_done=list(stages[: stages.index(meta["stage"])]))
        else:
            st.update(step=0, stage=None, stage_step=0, stages_done=[], position=asdict(StreamPosition()))
        prev_model = self.model_path
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            final_dir = self.run_dir / ("final" if last else f"stages/{stage}")
            if stage in st["stages_done"]:
                prev_model = str(final_dir)
                continue
            if st["stage"] != stage:
                st.update(stage=stage, stage_step=0, position=asdict(StreamPosition()))
            start_model = st["stage_models"].setdefault(stage, prev_model)
            self._save_state()
            ss = self._stage_settings(stage)
            group.call("begin_stage", stage, ss.learner_cfg, ss.lr, ss.warmup_steps, start_model, embedding_lr=ss.embedding_lr)
            if pending_load:  # same loss and scheduler layout first, then weights + optimizer + scheduler state
                self._load(group, pending_load)
                pending_load = None
            print(f"[rime] stage {stage}: {ss.steps} steps from {start_model}")
            if stage == "cma":
                out.update(self._run_cma(group))
            elif stage == "plume":
                out.update(self._run_plume(group))
            else:
                out.update(self._run_refine_rl(group, start_model))
            group.call("save_embedder", str(final_dir))
            out["stages"][stage] = self._evaluate(str(final_dir), "final" if last else f"after-{stage}", st["step"])
            st["stages_done"].append(stage)
            self._save_state()
            prev_model = str(final_dir)
        out["final"] = out["stages"].get(self.cfg.run.stages[-1]) or self._evaluate(prev_model, "final", st["step"])
        out["checksums"] = group.call("param_checksum")
        if self.cfg.tracking.log_model:
            from .mlflow_model import log_embedder_model

            out["model_uri"] = log_embedder_model(prev_model)
        out.update(steps=st["step"], final_model=prev_model)
        st["finished"] = True
        self._save_state()
        return out

    def _load(self, group, tag: str) -> None:
        client = group.call("load_checkpoint", str(self.ckpt_dir), tag)[0]
        self.state["position"] = client["position"]
        print(f"[rime] resumed from {tag} at step {self.state['step']} (stage {self.state['stage']} step "
              f"{self.state['stage_step']}), data position {client['position']}")

    def _stream(self, by_task: bool) -> PairStream:
        from rime_model import Embedder

        pipeline = PipelineConfig(reserved_tokens=Embedder.reserved_tokens_of(self.model_path))
        stream = PairStream(self.data_dir, self.cfg.data.train_split, self.cfg.run.seed, self.cfg.data.shuffle_buffer,
                            self.run_dir / "data_errors.jsonl", pipeline=pipeline, group_by_task=by_task)
        stream.pos = StreamPosition(**self.state["position"])
        return stream

    def _after_step(self, group, metrics: dict, position: StreamPosition, steps: int) -> None:
        """Log, then checkpoint / evaluate on schedule (never on a stage's last step: the stage end does)."""
        st, cfg = self.state, self.cfg
        self.mlflow.log_metrics(metrics, step=st["step"])
        if st["stage_step"] == steps:
            self._checkpoint(group, position)
            return
        if st["stage_step"] % cfg.checkpoint.every_steps == 0:
            self._checkpoint(group, position)
        if cfg.eval.every_steps and st["stage_step"] % cfg.eval.every_steps == 0:
            group.call("save_embedder", str(self.run_dir / "eval_model"))
            self._evaluate(str(self.run_dir / "eval_model"), f"step{st['step']}", st["step"])

    def _shards(self, pairs: list[dict], n_ranks: int) -> list[list[list[dict]]]:
        """Rank r's micro-batches of the step's global batch (rank-major, then accumulation step)."""
        lc = self.cfg.learners
        mb, acc = lc.micro_batch_size, lc.grad_accum_steps
        return [[pairs[(r * acc + a) * mb:(r * acc + a + 1) * mb] for a in range(acc)] for r in range(n_ranks)]

    def _run_cma(self, group) -> dict:
        def log(step: int, m: dict) -> str:
            return (f"cma step {step}/{self.cfg.cma.steps} loss {m['train/loss']:.3f} (nce_disc {m['train/nce_disc']:.3f}, "
                    f"nce_gen {m['train/nce_gen']:.3f}, ce {m['train/ce']:.3f})")

        return self._supervised_steps(group, self.cfg.data.batch_by_task, self.cfg.cma.steps, log)

    def _run_plume(self, group) -> dict:
        """PLUME's curriculum: each step's phase comes from the schedule and the stage step (so a resume
        lands in the same phase); a new curriculum stage resets the optimizer state and warm-up."""
        from rime_model.curriculum import split_segments

        pc, st = self.cfg.plume, self.state
        schedule = self._plume_schedule()
        st.setdefault("plume_rows_short_reasoning", 0)

        def before(step: int, pairs: list[dict]) -> tuple[tuple, dict]:
            phase = schedule.at(step)
            if step == 0 and pc.first_stage and pc.probe_queries_per_task:
                self._probe_explicit_reasoning(group, "on the start model")  # stage 0 skipped: probe what it starts from
            if schedule.stage_changes_at(step):
                if phase.stage == 1 and pc.probe_queries_per_task:
                    self._probe_explicit_reasoning(group, "after stage 0")
                group.call("reset_optimizer", pc.lr, pc.warmup_steps, embedding_lr=pc.embedding_lr)
                print(f"[rime] plume curriculum stage {phase.stage}: {phase.replaced}/{pc.segments} segments latent "
                      f"({phase.latent_steps} latent steps); optimizer state reset")
            st["plume_rows_short_reasoning"] += sum(not split_segments(p["q_reasoning"], pc.segments)[1] for p in pairs)
            return (phase.to_dict(),), {"plume/stage": phase.stage, "plume/latent_steps": phase.latent_steps,
                                        "plume/keep_answer": float(phase.keep_answer),
                                        "data/rows_short_reasoning": st["plume_rows_short_reasoning"]}

        def log(step: int, m: dict) -> str:
            return (f"plume step {step}/{schedule.total_steps} (curriculum stage {int(m['plume/stage'])}, "
                    f"{int(m['plume/latent_steps'])} latent, answer {'on' if m['plume/keep_answer'] else 'off'}) "
                    f"loss {m['train/loss']:.3f} (ce {m['train/ce']:.3f}, nce_gen {m['train/nce_gen']:.3f}, "
                    f"nce_disc {m['train/nce_disc']:.3f}, bal {m['train/balance']:.4f})")

        out = self._supervised_steps(group, pc.batch_by_task, schedule.total_steps, log, before)
        if schedule.end_stage == 0 and pc.probe_queries_per_task:  # an explicit-reasoning run: probe what it made
            self._probe_explicit_reasoning(group, "after stage 0")
        if st["plume_rows_short_reasoning"]:
            print(f"[rime] plume: {st['plume_rows_short_reasoning']} training row(s) had fewer than {pc.segments} "
                  "reasoning segments (padded with empty segments; counted in data/rows_short_reasoning)")
        return out

    def _probe_explicit_reasoning(self, group, after: str) -> dict:
        """End of curriculum stage 0 (or the start, when it is skipped): can the model write the reasoning
        the next stages turn latent, and does the embedding after it retrieve?
        Logs ``plume/explicit_*`` and writes ``eval/plume-explicit.json``."""
        from rime_model import load_embedder

        from .plume_probe import explicit_reasoning_probe

        pc, t = self.cfg.plume, time.perf_counter()
        model_dir = self.run_dir / "stages" / "plume-explicit"
        group.call("save_embedder", str(model_dir))
        res = explicit_reasoning_probe(load_embedder(str(model_dir)), self.data_dir, self.cfg.data.eval_split,
                                       pc.probe_queries_per_task, pc.segments, pc.probe_max_new_tokens,
                                       self.cfg.eval.batch_size, latent_steps=pc.latent_steps)
        path = self.run_dir / "eval" / "plume-explicit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
        if res["metrics"]:
            self.mlflow.log_metrics(res["metrics"], step=self.state["step"])
        self.mlflow.log_artifact(str(path), artifact_path="eval")
        segs = " ".join(f"{v:.2f}" for k, v in res["metrics"].items() if "segment" in k)
        print(f"[rime] plume explicit-reasoning probe {after} ({res['n']} queries, {res['skipped']} skipped, {res['no_reasoning']} without reasoning, "
              f"{time.perf_counter() - t:.0f}s): answer acc {res['metrics'].get('plume/explicit_answer_acc', float('nan')):.3f}, "
              f"segments exact {segs}, explicit->latent hit@1 {res['metrics'].get('plume/explicit_latent_hit1', float('nan')):.3f}")
        for smp in res["samples"][:2]:
            print(f"[rime]   {smp['task']}: {smp['reasoning'][:160]!r} => {smp['answer']!r} (ideal {smp['ideal'][:160]!r})")
        return res

    def _supervised_steps(self, group, by_task: bool, steps: int, log, before=None) -> dict:
        """The learner-only stages' loop (cma, plume): a global batch of pairs from Ray Data, sharded
        over the ranks, one ``train_step`` each, metrics to MLflow, checkpoints and evals on schedule.
        ``before(stage_step, pairs)`` returns extra ``train_step`` args and metrics for that step."""
        st = self.state
        per_rank = self.cfg.learners.micro_batch_size * self.cfg.learners.grad_accum_steps
        out: dict[str, Any] = {}
        stream = self._stream(by_task)
        try:
            while st["stage_step"] < steps:
                t0 = time.perf_counter()
                pairs = stream.next_batch(per_rank * group.size)
                t_data = time.perf_counter() - t0
                extra_args, extra_metrics = before(st["stage_step"], pairs) if before else ((), {})
                terms = group.call("train_step", per_rank=[(mbs, *extra_args) for mbs in self._shards(pairs, group.size)])
                st["step"] += 1
                st["stage_step"] += 1
                dt = time.perf_counter() - t0
                metrics = {f"train/{k}": sum(t[k] for t in terms) / len(terms) for k in terms[0] if k != "pairs"}
                metrics.update(extra_metrics)
                metrics.update({"perf/samples_per_s": len(pairs) / dt, "perf/step_time_s": dt, "perf/data_time_s": t_data,
                                "data/bad_rows": stream.bad_rows, "data/epoch": stream.pos.epoch,
                                "data/dropped_remainder_pairs": stream.dropped_pairs})
                if st["stage_step"] % 10 == 0 or st["stage_step"] == 1:
                    print(f"[rime] {log(st['stage_step'], metrics)} {metrics['perf/samples_per_s']:.1f} pairs/s")
                self._after_step(group, metrics, stream.pos, steps)
                out["final_loss"] = metrics["train/loss"]
            out["bad_rows"] = stream.bad_rows
            return out
        finally:
            stream.close()

    def _run_refine_rl(self, group, start_model: str) -> dict:
        from .learner_group import DATA_TASK_CPUS
        from .refine_rl import RefineRL

        cfg, st = self.cfg, self.state
        stream = self._stream(cfg.refine_rl.batch_by_task)
        rl = RefineRL(cfg, group, stream, start_model, reserve_cpus=DATA_TASK_CPUS)
        self.refine_rl = rl  # monitoring hook for tests
        history: list[float] = []
        try:
            rl.sync_weights(st["stage_step"])  # a resumed stage starts from the learners' weights, not the folder's
            while st["stage_step"] < cfg.refine_rl.steps:
                metrics = rl.step(st["stage_step"])
                st["step"] += 1
                st["stage_step"] += 1
                history.append(metrics["reward/reward_mean"])
                if st["stage_step"] % 5 == 0 or st["stage_step"] == 1:
                    print(f"[rime] refine-rl step {st['stage_step']}/{cfg.refine_rl.steps} reward {metrics['reward/reward_mean']:.3f} "
                          f"(acc {metrics['reward/acc_mean']:.2f}, well-formed {metrics['rollout/well_formed_frac']:.2f}, "
                          f"len {metrics['rollout/rewrite_tokens_mean']:.1f}) kl {metrics.get('train/kl', 0.0):.4f} "
                          f"time roll/rew/learn/sync {metrics['time/rollout_s']:.1f}/{metrics['time/reward_s']:.1f}/"
                          f"{metrics['time/learn_s']:.1f}/{metrics['time/sync_s']:.2f}s")
                self._after_step(group, metrics, rl.trained_position, cfg.refine_rl.steps)
            return {"rl_reward_history": history, "bad_rows": stream.bad_rows}
        finally:
            rl.shutdown()
            stream.close()


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) the stages of ``cfg``; returns the run summary."""
    return Trainer(cfg, resume, overwrite).run()
