"""Ray Serve deployment of the embedder: ``/v1/embeddings`` (OpenAI shape), ``/v1/models``, ``/health``.

Each mode has its own ``@serve.batch`` queue and its own worker thread, so cheap disc requests are
batched with each other and never wait behind a generating gen batch (torch releases the GIL while it
computes). A batch is bounded by items and by tokens (``max_batch_tokens``, ``actors.serve_batching``).
Overload is refused, not queued: past ``max_queued_requests`` per caller Serve answers 429 with
``Retry-After`` (``backpressure_config``). A replica is ready once it has embedded one warm-up batch
per served mode: ``/health`` answers 503 until then and requests that reach it meanwhile wait for it.
Optional API keys (``actors.serve_auth``); Prometheus metrics per mode (``actors.serve_metrics``).
Client errors are 4xx JSON bodies naming the field; the replica keeps serving.
"""

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rime_model.choices import MODES
from rime_model.inputs import InputError

from .embedding_api import ApiError, Limits, ServedModel, parse_body, parse_request, response
from .serve_auth import KeyCheck, unauthorized_body
from .serve_batching import BatchBudget, QueuedItem, batch_cost, item_tokens
from .serve_metrics import ServiceMetrics

app = FastAPI(title="rime embeddings", version="1")  # (no `from __future__ import annotations` here: FastAPI reads
# the route signatures' real types, and a string "Request" would turn into a required query parameter -> 422)
logger = logging.getLogger("ray.serve")

# per mode: max_batch_size, batch_wait_timeout_s (the Serve config's disc_batch / gen_batch / latent_batch)
BATCH_DEFAULTS = {"disc": (32, 0.005), "gen": (8, 0.02), "latent": (16, 0.01)}
WARMUP_WAIT_S = 300.0  # how long a request that reached a warming replica waits before a 503


def _error(status: int, message: str, kind: str = "server_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment(
    name="EmbedderServer",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=256,  # cheap: they wait in the replica's batch queues (bench/serve.py's burst)
    max_queued_requests=64,  # costly: the proxy's router keeps retrying queued requests
    backpressure_config={"status_code": 429, "retry_after_s": 1},
)
@serve.ingress(app)
class EmbedderServer:
    """One replica: the embedder, one batch queue per mode (disc, gen, latent), request validation."""

    def __init__(
        self,
        model: str,
        model_name: str = "",
        torch_threads: int = 1,
        limits: dict | None = None,
        disc_batch: dict | None = None,
        gen_batch: dict | None = None,
        max_new_tokens: int = 32,
        latent_batch: dict | None = None,
        latent_steps: int | None = None,
        modes: list[str] | None = None,
        max_batch_tokens: int | None = None,
        api_key_sha256: list[str] | None = None,
        warmup: bool = True,
    ):
        import torch

        from rime_model import GenerationConfig, load_embedder

        bad = [m for m in modes or () if m not in MODES]
        if bad or modes == []:
            raise ValueError(f"args.modes: {modes!r}; give a non-empty list from {list(MODES)}")
        torch.set_num_threads(torch_threads)
        # CUDA only where Ray gave this replica a GPU (ray_actor_options.num_gpus): Ray does not hide the
        # node's GPUs from an actor that asked for none, and an unaccounted model there would crowd the
        # GPUs Ray handed to training.
        import ray

        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else None
        self.emb = load_embedder(model, device=device)  # a models:/ URI is downloaded here, on the replica's node
        self.model_name = model_name or model
        self.limits = Limits(**(limits or {}))
        self.generation = GenerationConfig(max_new_tokens=max_new_tokens)
        self.latent_steps = self.emb.latent_steps if latent_steps is None else int(latent_steps)
        self.served = ServedModel(self.emb.dim, tuple(self.emb.matryoshka_dims), tuple(modes or MODES))
        self.keys = KeyCheck.from_args_and_env(api_key_sha256)
        self.pools = {m: ThreadPoolExecutor(1, thread_name_prefix=m) for m in MODES}
        self.queues = {"disc": self._disc_batch, "gen": self._gen_batch, "latent": self._latent_batch}
        self.budgets: dict[str, BatchBudget] = {}
        for mode, cfg in (("disc", disc_batch), ("gen", gen_batch), ("latent", latent_batch)):
            size, wait = BATCH_DEFAULTS[mode]
            budget = BatchBudget(int((cfg or {}).get("max_batch_size", size)), max_batch_tokens)
            self.budgets[mode] = budget
            self.queues[mode].set_max_batch_size(budget.budget)
            self.queues[mode].set_batch_wait_timeout_s(float((cfg or {}).get("batch_wait_timeout_s", wait)))
        self.metrics = ServiceMetrics()
        self.waiting = dict.fromkeys(MODES, 0)  # items queued per mode, not yet in a batch
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        if warmup:
            threading.Thread(target=self._warm_up, name="warmup", daemon=True).start()
        else:
            self.ready.set()

    # ------------------------------------------------------------------ readiness
    def _warm_up(self) -> None:
        """One batch per served mode (a text item and an image item), on the mode's own worker thread: the
        first call pays lazy initialisation (kernels, caches) that a user request should not."""
        from PIL import Image

        items = [{"text": "warm-up"}, {"image": Image.new("RGB", (56, 56), (128, 128, 128))}]
        try:
            for mode in self.served.modes:
                self.pools[mode].submit(self._run_model, mode, items).result()
            self.ready.set()
            logger.info("replica ready: warmed up %s", list(self.served.modes))
        except Exception as e:  # noqa: BLE001 - reported by /health and check_health, which restarts the replica
            self.warmup_error = f"{type(e).__name__}: {e}"
            logger.exception("warm-up failed")

    async def _wait_ready(self) -> bool:
        deadline = time.monotonic() + WARMUP_WAIT_S
        while not self.ready.is_set() and self.warmup_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.ready.is_set()

    def check_health(self) -> None:
        """Serve's replica health check: a replica whose warm-up failed is replaced."""
        if self.warmup_error is not None:
            raise RuntimeError(f"warm-up failed: {self.warmup_error}")

    # ------------------------------------------------------------------ batch queues
    def _run_model(self, mode: str, items: list[dict]) -> tuple[np.ndarray, list | None]:
        if mode == "disc":
            return self.emb.embed(items, mode="disc", batch_size=len(items)).vectors, None
        if mode == "latent":
            return self.emb.embed(items, mode="latent", batch_size=len(items), steps=self.latent_steps).vectors, None
        res = self.emb.embed(items, mode="gen", batch_size=len(items), generation=self.generation)
        return res.vectors, res.rewrites

    async def _run_batch(self, mode: str, queued: list[QueuedItem]) -> list[tuple[np.ndarray, Any]]:
        self.waiting[mode] -= len(queued)
        self.metrics.queue_depth.set(self.waiting[mode], tags={"mode": mode})
        self.metrics.batch_size.observe(len(queued), tags={"mode": mode})
        loop = asyncio.get_running_loop()
        vectors, rewrites = await loop.run_in_executor(self.pools[mode], self._run_model, mode, [q.item for q in queued])
        if rewrites is not None:
            self.metrics.rewrite_tokens.inc(sum(r.num_tokens for r in rewrites), tags={"mode": mode})
        return list(zip(vectors, rewrites or [None] * len(queued)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=batch_cost)
    async def _disc_batch(self, queued: list[QueuedItem]) -> list[tuple[np.ndarray, Any]]:
        return await self._run_batch("disc", queued)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=batch_cost)
    async def _gen_batch(self, queued: list[QueuedItem]) -> list[tuple[np.ndarray, Any]]:
        return await self._run_batch("gen", queued)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def _latent_batch(self, queued: list[QueuedItem]) -> list[tuple[np.ndarray, Any]]:
        return await self._run_batch("latent", queued)

    def _prepare(self, items: list, mode: str) -> list[QueuedItem]:
        """Items decoded once (text, RGB image, instruction) and costed in tokens; the first bad one is a 4xx
        naming it."""
        budget = self.budgets[mode]
        out = []
        for i, item in enumerate(items):
            try:
                ((text, image, instruction),) = self.emb.prepare([item])
            except InputError as e:
                raise ApiError(400, f"input[{i}].{e.field}", str(e).split(": ", 1)[-1]) from e
            decoded = {"text": text, "image": image, "instruction": instruction}
            tokens = item_tokens(self.emb.enc, decoded)
            if not budget.fits(tokens):
                raise ApiError(
                    413,
                    f"input[{i}]",
                    f"{tokens} tokens exceed max_batch_tokens={budget.max_batch_tokens}; shorten it, use a smaller image "
                    "or raise max_batch_tokens in the Serve config",
                )
            out.append(QueuedItem(decoded, tokens, budget.cost(tokens)))
        return out

    # ------------------------------------------------------------------ routes
    def _unauthorized(self, request: Request) -> JSONResponse | None:
        header = request.headers.get("authorization")
        if self.keys.allows(header):
            return None
        return JSONResponse(unauthorized_body(header is not None), status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        start, mode = time.perf_counter(), "unknown"

        def answer(resp: JSONResponse, n: int = 0) -> JSONResponse:
            self.metrics.answered(mode, resp.status_code, time.perf_counter() - start, n)
            return resp

        denied = self._unauthorized(request)
        if denied is not None:
            return answer(denied)
        try:
            req = parse_request(parse_body(await request.body(), self.limits), self.limits, self.served)
            mode = req.mode
            # images are decoded in a thread, so decoding does not stall the event loop that every other
            # request's batching runs on; text-only requests skip the thread hop
            if any(it.get("image") is not None for it in req.items):
                queued = await asyncio.to_thread(self._prepare, req.items, mode)
            else:
                queued = self._prepare(req.items, mode)
        except ApiError as e:
            return answer(JSONResponse(e.body(), status_code=e.status))
        if not await self._wait_ready():
            why = self.warmup_error or f"still warming up after {WARMUP_WAIT_S:.0f}s"
            return answer(_error(503, f"this replica is not ready ({why}); retry", headers={"Retry-After": "5"}))
        self.waiting[mode] += len(queued)
        self.metrics.queue_depth.set(self.waiting[mode], tags={"mode": mode})
        try:
            outs = await asyncio.gather(*[self.queues[mode](q) for q in queued])
        except Exception as e:  # noqa: BLE001 - a model failure: every request of the batch gets a JSON 500
            logger.exception("embedding batch failed")
            return answer(
                _error(
                    500, f"the model failed on this batch ({type(e).__name__}: {str(e)[:200]}); the replica keeps serving, retry"
                )
            )
        vectors = np.stack([o[0] for o in outs])
        if req.dimensions is not None:
            from rime_model.embedder import truncate

            vectors = truncate(vectors, req.dimensions)
        rewrites = [o[1] for o in outs] if mode == "gen" else None
        tokens = sum(q.tokens for q in queued)
        return answer(JSONResponse(response(list(vectors), req, self.model_name, rewrites, tokens)), len(queued))

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.model_name,
                        "object": "model",
                        "owned_by": "rime",
                        "dimensions": self.emb.dim,
                        "matryoshka_dims": list(self.emb.matryoshka_dims),
                        "modes": list(self.served.modes),
                        "latent_steps": self.latent_steps,
                        "latent_adapter": self.emb.latent_adapter is not None,
                    }
                ],
            }
        )

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """Open (no key): load balancers and Kubernetes probes call it. 200 only once warmed up."""
        if self.ready.is_set():
            return JSONResponse({"status": "ok"})
        if self.warmup_error is not None:
            return JSONResponse({"status": "failed", "error": self.warmup_error}, status_code=503)
        return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "1"})


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (``import_path: actors.serve_app:build_app``); ``args`` are the
    constructor's keyword arguments (``model`` required)."""
    if "model" not in args:
        raise ValueError("args.model: required (zoo name, hf:<repo-or-path>, saved folder or mlflow models:/ URI)")
    return EmbedderServer.bind(**args)
