"""The cluster policy server: a vLLM engine in a Ray actor, with the same interface as the
transformers backend (`propose`, `update_weights`, `join_weight_sync` / `receive_weights`,
`version`, `stats`).

Written against vLLM 0.33.0 (`pip install -e .[vllm]`, pinned), which serves Qwen3-VL:
- images go in as multimodal inputs (`multi_modal_data={"image": PIL image}`) with the chat
  template's single image placeholder, which vLLM's Qwen3-VL processor expands; the engine admits
  one image and no video per prompt, so it profiles memory for what it will be given;
- PhysCode-only sampling through `SamplingParams(allowed_token_ids=..., min_tokens=L,
  max_tokens=L)`: exactly L PhysCode tokens per candidate, n=B candidates per prompt (greedy, at
  temperature 0, draws one and repeats it: SamplingParams refuses n > 1 without sampling);
- log-probabilities are `cumulative_logprob` with `logprobs_mode="processed_logprobs"`: those of the
  distribution sampled from, after the PhysCode whitelist, the temperature and top-p (top-k and
  penalties off), which is the definition the transformers backend and GRPO use
  (ipr_dist/models/policy.py: sampling_logprobs);
- checkpoints with the embedded model's frame adapter (a second visual path vLLM's Qwen3-VL does not
  have) are refused: they are served by the transformers backend;
- new weights from the learner: by default through vLLM's own weight-transfer engine
  (`weight_transfer_config` with the NCCL backend; each engine its own group with learner rank 0,
  which sends through vLLM's trainer-side NCCL engine, in bfloat16), in checkpoint format, so vLLM
  re-applies its own weight processing; the object-store fallback writes the state dict to a local
  safetensors file and has every worker `reload_weights` from it (the msgpack RPC channel carries
  only the path: it cannot carry typed tensors). Either way the encoder and prefix caches are reset
  after the update, so no cached vision feature or KV block of the old weights is reused;
- a dead engine (vLLM's EngineDeadError) ends this actor's process, so Ray restarts the server from
  its checkpoint and the driver has it rejoin the weight sync.
Placement: one engine per actor, `num_gpus=tensor_parallel_size`; with tensor parallelism the
engine's workers are processes of this actor (the `mp` executor) on the GPUs Ray gave it.
Not run on this machine (no GPU, no vLLM wheel); tests/test_policy.py covers what runs without the
engine (sampling request, engine arguments, the dead-engine exit) and scripts/gpu_check.sh the rest
of the GPU path.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray

from ipr_dist.models.policy import PHYSCODE_TOKENS, Proposals, chat_prompt

VLLM_VERSION = "0.33.0"


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): the object-store fallback's reload from a file."""

    def reload_from_file(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
        self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)


def sampling_kwargs(token_ids: list[int], candidates: int, length: int, temperature: float, top_p: float,
                    seed: int | None = None) -> dict:
    """SamplingParams for B candidates of exactly L PhysCode tokens, with their log-probabilities.
    Greedy (temperature 0) asks for one sequence: the caller repeats it B times."""
    greedy = temperature <= 0
    return dict(n=1 if greedy else candidates, temperature=temperature, top_p=1.0 if greedy else top_p, top_k=0,
                repetition_penalty=1.0,
                max_tokens=length, min_tokens=length, allowed_token_ids=list(token_ids), logprobs=0, seed=seed,
                skip_special_tokens=False)


OVERSAMPLE = 8  # distinct first codes: draws per candidate of the first code


def first_occurrences(tokens: list[int], logprobs: list[float], candidates: int) -> list[tuple[int, float]]:
    """The first `candidates` distinct tokens of i.i.d. draws, in the order they first occur, with their
    log-probabilities: successive sampling without replacement, the same distribution as Gumbel-top-k
    (the transformers backend's), as long as that many distinct tokens occur among the draws; when fewer
    do, the ones found repeat in turn."""
    seen: dict[int, float] = {}
    for t, lp in zip(tokens, logprobs):
        if t not in seen:
            seen[t] = lp
            if len(seen) == candidates:
                break
    found = list(seen.items())
    return [found[i % len(found)] for i in range(candidates)]


def engine_kwargs(path: str, tensor_parallel_size: int, gpu_memory_utilization: float, max_model_len: int,
                  seed: int) -> dict:
    """The vLLM engine's arguments: one image and no video per prompt, log-probabilities of the distribution
    sampled from (after the PhysCode whitelist, temperature and top-p: the learner's, see
    ipr_dist/models/policy.py: sampling_logprobs), the NCCL
    weight-transfer engine and the fallback's worker extension."""
    return dict(model=path, tensor_parallel_size=tensor_parallel_size, seed=seed,
                distributed_executor_backend="mp" if tensor_parallel_size > 1 else None,
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                limit_mm_per_prompt={"image": 1, "video": 0}, logprobs_mode="processed_logprobs",
                weight_transfer_config={"backend": "nccl"},
                worker_extension_cls="serving.vllm_backend.WeightLoader")


def servable_meta(path: str, codes: int) -> dict:
    """The checkpoint's PhysCode token map, after checking vLLM can serve it: aligned, for this
    codebook, and without the embedded model's frame adapter (a second visual path vLLM's Qwen3-VL
    does not have)."""
    from ipr_dist.models.policy import FRAME_ADAPTER

    meta_path = Path(path) / PHYSCODE_TOKENS
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path}: no {PHYSCODE_TOKENS}; serve an aligned checkpoint (`ipr policy align`)")
    if (Path(path) / FRAME_ADAPTER).is_file():
        raise ValueError(f"{path}: has the embedded tiny model's frame adapter ({FRAME_ADAPTER}), which vLLM's "
                         "Qwen3-VL cannot run; serve it with policy.backend: transformers, or align a released "
                         "Qwen3-VL (policy.model_path)")
    meta = json.loads(meta_path.read_text())
    if meta["codes"] != codes:
        raise ValueError(f"{path}: PhysCode tokens for K={meta['codes']}, the run's codebook has {codes}")
    return meta


def exit_if_engine_dead(exc: BaseException) -> None:
    """A dead engine cannot serve again: end the process so Ray restarts the actor (a live actor around
    a dead engine would answer every call with an error forever)."""
    if type(exc).__name__ == "EngineDeadError":
        print(f"policy server: the vLLM engine died ({exc}); exiting so Ray restarts this server",
              file=sys.stderr, flush=True)
        os._exit(1)


@ray.remote
class VLLMPolicyServer:
    def __init__(self, policy, codes: int, length: int, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.85, max_model_len: int = 4096, seed: int = 0):
        from ipr_dist.run_layout import as_ref

        # An object-store run's checkpoint is downloaded to this node for the engine to load, and
        # deleted once the engine holds the weights.
        with as_ref(policy).open() as path:
            if path is None:
                raise FileNotFoundError(f"{policy}: no checkpoint; serve an aligned run (`ipr policy align`)")
            self._start(str(path), codes, length, tensor_parallel_size, gpu_memory_utilization, max_model_len, seed)

    def _start(self, path: str, codes: int, length: int, tensor_parallel_size: int, gpu_memory_utilization: float,
               max_model_len: int, seed: int) -> None:
        from transformers import AutoTokenizer

        meta = servable_meta(path, codes)
        from vllm import LLM

        self.token_ids = meta["token_ids"]
        self.code_of = {t: k for k, t in enumerate(self.token_ids)}
        self.length = length
        self.tensor_parallel_size = tensor_parallel_size
        self.version_ = meta.get("version", 0)
        self.joined = False
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        from vllm.config import WeightTransferConfig

        kwargs = engine_kwargs(path, tensor_parallel_size, gpu_memory_utilization, max_model_len, seed)
        kwargs["weight_transfer_config"] = WeightTransferConfig(**kwargs["weight_transfer_config"])
        self.llm = LLM(**kwargs)

    def _generate(self, prompts: list[dict], params) -> list:
        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:
            exit_if_engine_dead(exc)
            raise

    def propose(self, frames, goals: list[str], candidates: int, temperature: float = 0.7,
                top_p: float = 0.9, distinct_first: bool = False) -> Proposals:
        from PIL import Image
        from vllm import SamplingParams

        prompts = [{"prompt": chat_prompt(self.tokenizer, g),
                    "multi_modal_data": {"image": Image.fromarray(np.asarray(f, np.uint8))}}
                   for f, g in zip(frames, goals)]
        if distinct_first and temperature > 0 and candidates > 1:
            return self._propose_distinct_first(prompts, candidates, temperature, top_p)
        outs = self._generate(prompts, SamplingParams(**sampling_kwargs(self.token_ids, candidates, self.length,
                                                                        temperature, top_p)))
        codes = np.array([[[self.code_of[t] for t in c.token_ids] for c in o.outputs] for o in outs], np.int64)
        logprobs = np.array([[c.cumulative_logprob for c in o.outputs] for o in outs], np.float32)
        if codes.shape[1] < candidates:  # greedy: one sequence stands for the B candidates
            codes, logprobs = np.repeat(codes, candidates, 1), np.repeat(logprobs, candidates, 1)
        return Proposals(codes, logprobs, self.version_)

    def _propose_distinct_first(self, prompts: list[dict], candidates: int, temperature: float,
                                top_p: float) -> Proposals:
        """B sequences per prompt that start with B different codes (PhysCodePolicy.propose's
        `distinct_first`): first codes from OVERSAMPLE x B one-token draws at T without the nucleus, the
        first B distinct kept (`first_occurrences`); then each prompt with its first code goes on for the
        other L - 1 codes as usual. Log-probabilities: the first code's at T plus the rest's."""
        from vllm import SamplingParams

        first = SamplingParams(**sampling_kwargs(self.token_ids, OVERSAMPLE * candidates, 1, temperature, 1.0))
        starts = [first_occurrences([c.token_ids[0] for c in o.outputs], [c.cumulative_logprob for c in o.outputs],
                                    candidates) for o in self._generate(prompts, first)]
        codes = np.array([[[self.code_of[t]] for t, _ in s] for s in starts], np.int64)  # (N, B, 1)
        logprobs = np.array([[lp for _, lp in s] for s in starts], np.float32)
        if self.length > 1:
            rest = [{**p, "prompt": p["prompt"] + self.tokenizer.convert_ids_to_tokens(t)}
                    for p, s in zip(prompts, starts) for t, _ in s]
            outs = self._generate(rest, SamplingParams(**sampling_kwargs(self.token_ids, 1, self.length - 1,
                                                                         temperature, top_p)))
            tail = np.array([[self.code_of[t] for t in o.outputs[0].token_ids] for o in outs], np.int64)
            codes = np.concatenate([codes, tail.reshape(len(prompts), candidates, -1)], -1)
            logprobs = logprobs + np.array([o.outputs[0].cumulative_logprob for o in outs],
                                           np.float32).reshape(len(prompts), candidates)
        return Proposals(codes, logprobs, self.version_)

    # --- weights --------------------------------------------------------------------------------
    def join_weight_sync(self, host: str, port: int, timeout_s: float) -> None:
        """Join learner rank 0's NCCL group through vLLM's weight-transfer engine (the engine's TP workers
        take ranks 1..TP; blocks until the learner joins too)."""
        try:
            self.llm.init_weight_transfer_engine(dict(init_info=dict(
                master_address=host, master_port=port, rank_offset=1, world_size=self.tensor_parallel_size + 1)))
        except Exception as exc:
            exit_if_engine_dead(exc)
            raise
        self.joined = True

    def weight_sync_joined(self) -> bool:
        return self.joined

    def weight_sync_world(self) -> int:
        return self.tensor_parallel_size + 1

    def receive_weights(self, version: int, meta: dict) -> int:
        """Receive learner rank 0's broadcast (`meta`: names, dtype_names, shapes of what it sends) in
        checkpoint format, then drop every cache computed with the old weights."""
        if not self.joined:
            raise RuntimeError("this policy server has not joined the weight-sync group")
        try:
            self.llm.start_weight_update(is_checkpoint_format=True)
            self.llm.update_weights(dict(update_info=dict(**meta, packed=True)))
            self.llm.finish_weight_update()
        except Exception as exc:
            self.joined = False
            exit_if_engine_dead(exc)
            raise
        self._reset_caches()
        self.version_ = version
        return version

    def update_weights(self, state: dict, version: int) -> int:
        """The object-store fallback: the state dict into a local safetensors file that every worker
        reloads from (only the path crosses vLLM's RPC channel)."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="ipr-weights-") as folder:
            path = os.path.join(folder, "model.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, path)
            try:
                self.llm.collective_rpc("reload_from_file", args=(path,))
            except Exception as exc:
                exit_if_engine_dead(exc)
                raise
        self._reset_caches()
        self.version_ = version
        return version

    def _reset_caches(self) -> None:
        self.llm.reset_encoder_cache()  # vision features of the old weights
        self.llm.reset_prefix_cache()  # KV blocks of the old weights

    def version(self) -> int:
        return self.version_

    def stats(self) -> dict:
        return {"version": self.version_, "device": "cuda", "codes": len(self.token_ids), "backend": "vllm",
                "weight_sync_joined": self.joined}
