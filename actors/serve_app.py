"""Ray Serve deployment of the embedder: ``/v1/embeddings`` (OpenAI shape), ``/v1/models``, ``/health``.

Each mode has its own ``@serve.batch`` queue and its own worker thread, so cheap disc requests
are batched with each other and never wait behind a generating gen batch (torch releases the
GIL while it computes). Batch sizes, wait timeouts and limits come from the application args;
replicas and autoscaling from the Serve config (``serve.yaml``). Client errors are 4xx JSON
bodies naming the field; the replica keeps serving.
"""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rime_model.inputs import InputError

from .embedding_api import ApiError, Limits, parse_body, parse_request, response

app = FastAPI(title="rime embeddings", version="1")
logger = logging.getLogger("ray.serve")


@serve.deployment(name="EmbedderServer", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
@serve.ingress(app)
class EmbedderServer:
    """One replica: the embedder, one batch queue per mode (disc, gen, latent), and request validation."""

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
    ):
        import torch

        from rime_model import GenerationConfig, load_embedder

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
        self.pools = {m: ThreadPoolExecutor(1, thread_name_prefix=m) for m in ("disc", "gen", "latent")}
        for method, cfg in (
            (self._disc_batch, disc_batch or {}),
            (self._gen_batch, gen_batch or {}),
            (self._latent_batch, latent_batch or {}),
        ):
            method.set_max_batch_size(int(cfg.get("max_batch_size", 16)))
            method.set_batch_wait_timeout_s(float(cfg.get("batch_wait_timeout_s", 0.01)))
        from ray.serve.metrics import Counter

        self.requests = Counter("rime_embedding_requests", description="embedding requests", tag_keys=("mode", "status"))
        self.items = Counter("rime_embedding_items", description="items embedded", tag_keys=("mode",))

    # ------------------------------------------------------------------ batch queues
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _disc_batch(self, items: list[dict]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(self.pools["disc"], lambda: self.emb.embed(items, mode="disc", batch_size=len(items)))
        return list(res.vectors)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _gen_batch(self, items: list[dict]) -> list[tuple[np.ndarray, Any]]:
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(
            self.pools["gen"], lambda: self.emb.embed(items, mode="gen", batch_size=len(items), generation=self.generation)
        )
        return list(zip(res.vectors, res.rewrites))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _latent_batch(self, items: list[dict]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        res = await loop.run_in_executor(
            self.pools["latent"], lambda: self.emb.embed(items, mode="latent", batch_size=len(items), steps=self.latent_steps)
        )
        return list(res.vectors)

    def _prepare(self, items: list) -> list[dict]:
        """Items decoded once (text, RGB image, instruction); the first bad one is a 400 naming it."""
        out = []
        for i, item in enumerate(items):
            try:
                ((text, image, instruction),) = self.emb.prepare([item])
            except InputError as e:
                raise ApiError(400, f"input[{i}].{e.field}", str(e).split(": ", 1)[-1]) from e
            out.append({"text": text, "image": image, "instruction": instruction})
        return out

    # ------------------------------------------------------------------ routes
    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        mode = "unknown"
        try:
            req = parse_request(parse_body(await request.body(), self.limits), self.limits)
            mode = req.mode
            # decode + validate before queueing, so a bad item fails only its request; in a thread, so image
            # decoding does not stall the event loop that every other request's batching runs on
            req.items = await asyncio.to_thread(self._prepare, req.items)
        except ApiError as e:
            self.requests.inc(tags={"mode": mode, "status": str(e.status)})
            return JSONResponse(e.body(), status_code=e.status)
        try:
            if req.mode in ("disc", "latent"):
                queue = self._disc_batch if req.mode == "disc" else self._latent_batch
                vectors = await asyncio.gather(*[queue(it) for it in req.items])
                rewrites = None
            else:
                outs = await asyncio.gather(*[self._gen_batch(it) for it in req.items])
                vectors, rewrites = [o[0] for o in outs], [o[1] for o in outs]
        except Exception as e:  # noqa: BLE001 - a model failure: every request of the batch gets a JSON 500
            logger.exception("embedding batch failed")
            self.requests.inc(tags={"mode": mode, "status": "500"})
            return JSONResponse(
                {
                    "error": {
                        "message": f"the model failed on this batch ({type(e).__name__}: {str(e)[:200]}); "
                        "the replica keeps serving, retry",
                        "type": "server_error",
                        "param": None,
                        "code": 500,
                    }
                },
                status_code=500,
            )
        tokens = sum(len(self.emb.enc.token_ids(it.get("text") or "")) for it in req.items)
        self.requests.inc(tags={"mode": mode, "status": "200"})
        self.items.inc(len(req.items), tags={"mode": mode})
        return JSONResponse(response(vectors, req, self.model_name, rewrites, tokens))

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "owned_by": "rime",
                    "dimensions": self.emb.dim,
                    "modes": ["disc", "gen", "latent"],
                    "latent_steps": self.latent_steps,
                    "latent_adapter": self.emb.latent_adapter is not None,
                }
            ],
        }

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}


def build_app(args: dict) -> serve.Application:
    """Serve config entry point (``import_path: actors.serve_app:build_app``); ``args`` are the
    constructor's keyword arguments (``model`` required)."""
    if "model" not in args:
        raise ValueError("args.model: required (zoo name, hf:<repo-or-path>, saved folder or mlflow models:/ URI)")
    return EmbedderServer.bind(**args)
